"""Generate corpus/sample-en-de: English-German sentence pairs from a small hand-written bilingual grammar.

    python corpus/make_sample.py            # rewrites corpus/sample-en-de/{train,validation,test}.jsonl

Deterministic (seeded), so the committed files are exactly what this script prints. The grammar covers what
makes En->De translation more than word lookup, with correct German: gender, case (nominative, accusative,
dative) and number agreement of articles and adjectives (weak, mixed and strong endings), weak nouns
(den Jungen), dative plural -n, preposition-article contractions (im, ins, am, zum), verb conjugation,
prepositions that take the dative for a place and the accusative for a direction, coordinated subjects,
and subordinate clauses with the verb at the end (", während ... schläft").
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

NOM, ACC, DAT = 0, 1, 2
DEF_ARTICLE = {"m": ("der", "den", "dem"), "f": ("die", "die", "der"), "n": ("das", "das", "dem")}
DEF_PLURAL = ("die", "die", "den")
INDEF_ARTICLE = {"m": ("ein", "einen", "einem"), "f": ("eine", "eine", "einer"), "n": ("ein", "ein", "einem")}
# Adjective endings by declension, gender (or "pl") and case.
WEAK = {"m": ("e", "en", "en"), "f": ("e", "e", "en"), "n": ("e", "e", "en"), "pl": ("en", "en", "en")}
MIXED = {"m": ("er", "en", "en"), "f": ("e", "e", "en"), "n": ("es", "es", "en")}
STRONG_PLURAL = ("e", "e", "en")
CONTRACTIONS = {("in", "dem"): "im", ("in", "das"): "ins", ("an", "dem"): "am", ("an", "das"): "ans"}
# Plural quantifiers: English, German nominative/accusative, German dative (numerals do not decline).
QUANTIFIERS = [("two", "zwei", "zwei"), ("three", "drei", "drei"), ("several", "mehrere", "mehreren")]


@dataclass(frozen=True)
class Noun:
    en: str
    en_pl: str
    de: str
    de_pl: str
    gender: str
    kinds: frozenset
    weak: bool = False  # weak masculine: -n in every case but the nominative singular
    mass: bool = False  # only "the" and no plural (the water)

    def de_form(self, plural: bool, case: int) -> str:
        if plural:
            if case == DAT and not self.de_pl.endswith(("n", "s")):
                return self.de_pl + "n"
            return self.de_pl
        if self.weak and case != NOM:
            return self.de + ("n" if self.de.endswith("e") else "en")
        return self.de


def nouns(kind: str, rows: str, **flags) -> list[Noun]:
    """Rows of `en en_pl de de_pl gender [weak|mass]`; extra kinds after a comma in the gender column."""
    out = []
    for line in rows.strip().splitlines():
        en, en_pl, de, de_pl, gender, *opts = line.split()
        gender, *more = gender.split(",")
        out.append(
            Noun(en.replace("_", " "), en_pl.replace("_", " "), de, de_pl, gender,
                 frozenset([kind, *more]), weak="weak" in opts, mass="mass" in opts)
        )  # fmt: skip
    return out


PEOPLE = nouns(
    "person",
    """
man men Mann Männer m
woman women Frau Frauen f
child children Kind Kinder n
boy boys Junge Jungen m weak
girl girls Mädchen Mädchen n
worker workers Arbeiter Arbeiter m
musician musicians Musiker Musiker m
teacher teachers Lehrer Lehrer m
tourist tourists Tourist Touristen m weak
student students Student Studenten m weak
cook cooks Koch Köche m
doctor doctors Arzt Ärzte m
""",
)
ANIMALS = nouns(
    "animal",
    """
dog dogs Hund Hunde m
cat cats Katze Katzen f
horse horses Pferd Pferde n
bird birds Vogel Vögel m
cow cows Kuh Kühe f
""",
)
THINGS = nouns(
    "thing",
    """
ball balls Ball Bälle m,toy
book books Buch Bücher n,read
bag bags Tasche Taschen f,carry
guitar guitars Gitarre Gitarren f,carry
umbrella umbrellas Regenschirm Regenschirme m,carry
flag flags Fahne Fahnen f,carry
camera cameras Kamera Kameras f
box boxes Kiste Kisten f,carry
cup cups Tasse Tassen f
newspaper newspapers Zeitung Zeitungen f,read
letter letters Brief Briefe m,read,write
picture pictures Bild Bilder n,art
map maps Karte Karten f,read
stone stones Stein Steine m,toy
bottle bottles Flasche Flaschen f
basket baskets Korb Körbe m,carry
kite kites Drachen Drachen m
""",
)
FOOD = nouns(
    "food",
    """
apple apples Apfel Äpfel m,toy
banana bananas Banane Bananen f
cake cakes Kuchen Kuchen m
sandwich sandwiches Sandwich Sandwiches n
orange oranges Orange Orangen f
sausage sausages Wurst Würste f
""",
)
VEHICLES = nouns(
    "vehicle",
    """
bicycle bicycles Fahrrad Fahrräder n,push
car cars Auto Autos n
sled sleds Schlitten Schlitten m,push
stroller strollers Kinderwagen Kinderwagen m,push
""",
)
CLOTHES = nouns(
    "clothing",
    """
shirt shirts Hemd Hemden n
dress dresses Kleid Kleider n
jacket jackets Jacke Jacken f
hat hats Hut Hüte m
coat coats Mantel Mäntel m
helmet helmets Helm Helme m
sweater sweaters Pullover Pullover m
cap caps Mütze Mützen f
""",
)


@dataclass(frozen=True)
class Place:
    noun: Noun
    static: tuple  # (English preposition, German preposition) for where something happens: dative
    motion: tuple = ()  # (English, German, verbs) for where something goes: accusative
    water: bool = False


def place(en, en_pl, de, de_pl, gender, static, motion=(), water=False, mass=False) -> Place:
    noun = Noun(en, en_pl, de, de_pl, gender, frozenset(["place"]), mass=mass)
    return Place(noun, tuple(static), tuple(motion), water)


WALK, RUN, JUMP, CLIMB, SWIM = "walking", "running", "jumping", "climbing", "swimming"
PLACES = [
    place("street", "streets", "Straße", "Straßen", "f", [("on", "auf")], [("across", "über", {WALK, RUN})]),
    place("park", "parks", "Park", "Parks", "m", [("in", "in")],
          [("through", "durch", {WALK, RUN}), ("into", "in", {WALK, RUN})]),
    place("beach", "beaches", "Strand", "Strände", "m", [("on", "an")], [("across", "über", {WALK, RUN})]),
    place("bench", "benches", "Bank", "Bänke", "f", [("on", "auf"), ("next to", "neben")],
          [("onto", "auf", {JUMP, CLIMB})]),
    place("field", "fields", "Feld", "Felder", "n", [("in", "auf")],
          [("across", "über", {WALK, RUN}), ("through", "durch", {WALK, RUN})]),
    place("garden", "gardens", "Garten", "Gärten", "m", [("in", "in")], [("through", "durch", {WALK, RUN})]),
    place("kitchen", "kitchens", "Küche", "Küchen", "f", [("in", "in")], [("into", "in", {WALK, RUN})]),
    place("room", "rooms", "Zimmer", "Zimmer", "n", [("in", "in")], [("into", "in", {WALK, RUN})]),
    place("city", "cities", "Stadt", "Städte", "f", [("in", "in")], [("through", "durch", {WALK, RUN})]),
    place("house", "houses", "Haus", "Häuser", "n",
          [("in", "in"), ("in front of", "vor"), ("behind", "hinter")], [("into", "in", {WALK, RUN})]),
    place("stage", "stages", "Bühne", "Bühnen", "f", [("on", "auf")], [("onto", "auf", {WALK, RUN, JUMP})]),
    place("wall", "walls", "Mauer", "Mauern", "f",
          [("on", "auf"), ("in front of", "vor"), ("behind", "hinter")], [("onto", "auf", {JUMP, CLIMB})]),
    place("tree", "trees", "Baum", "Bäume", "m", [("under", "unter"), ("next to", "neben")],
          [("up", "auf", {CLIMB})]),
    place("car", "cars", "Auto", "Autos", "n", [("in", "in"), ("next to", "neben"), ("behind", "hinter")],
          [("into", "in", {JUMP})]),
    place("bridge", "bridges", "Brücke", "Brücken", "f", [("on", "auf"), ("under", "unter")],
          [("across", "über", {WALK, RUN})]),
    place("table", "tables", "Tisch", "Tische", "m", [("at", "an"), ("under", "unter")],
          [("onto", "auf", {JUMP})]),
    place("playground", "playgrounds", "Spielplatz", "Spielplätze", "m", [("on", "auf")],
          [("across", "über", {RUN})]),
    place("mountain", "mountains", "Berg", "Berge", "m", [("on", "auf")], [("up", "auf", {WALK, CLIMB})]),
    place("grass", "grass", "Gras", "Gras", "n", [("on", "auf")], [], mass=True),
    place("water", "water", "Wasser", "Wasser", "n", [("in", "in")], [("into", "in", {JUMP, WALK, RUN})],
          water=True, mass=True),
    place("lake", "lakes", "See", "Seen", "m", [("in", "in")],
          [("into", "in", {JUMP}), ("across", "über", {SWIM})], water=True),
    place("river", "rivers", "Fluss", "Flüsse", "m", [("in", "in")],
          [("into", "in", {JUMP}), ("across", "über", {SWIM})], water=True),
]  # fmt: skip


@dataclass(frozen=True)
class Adjective:
    en: str
    de_stem: str  # endings are added to this: "müd" + "e"
    kinds: frozenset


def adjectives(rows: str) -> list[Adjective]:
    out = []
    for line in rows.strip().splitlines():
        en, de, kinds = line.split()
        out.append(Adjective(en, de, frozenset(kinds.split(","))))
    return out


ADJECTIVES = adjectives("""
red rot thing,clothing,vehicle
blue blau thing,clothing,vehicle
green grün thing,clothing,vehicle,place
black schwarz animal,thing,clothing,vehicle
white weiß animal,thing,clothing,vehicle
yellow gelb thing,clothing,vehicle,food
brown braun animal,clothing,thing
young jung person,animal
old alt person,animal,thing,vehicle,place
small klein person,animal,thing,vehicle,place,food
big groß animal,thing,vehicle,place,food
happy fröhlich person
tired müd person,animal
new neu thing,clothing,vehicle
""")


@dataclass(frozen=True)
class Verb:
    en: str  # present participle: "is reading"
    de_sg: str
    de_pl: str
    subjects: frozenset  # person / animal
    objects: frozenset = frozenset()  # noun kinds of its object; empty: intransitive
    en_prep: str = ""  # "playing with a ball"
    de_prep: str = ""  # "spielt mit einem Ball"
    case: int = ACC
    static: bool = True  # takes a place ("in the park")
    water: bool = False  # its places are water


def verb(en, de_sg, de_pl, subjects="person", objects="", en_prep="", de_prep="", case=ACC, **kw) -> Verb:
    split = lambda s: frozenset(s.split(",")) if s else frozenset()  # noqa: E731
    return Verb(en, de_sg, de_pl, split(subjects), split(objects), en_prep, de_prep, case, **kw)


ANY = "person,animal"
VERBS = [
    verb("standing", "steht", "stehen", ANY),
    verb("sitting", "sitzt", "sitzen", ANY),
    verb("waiting", "wartet", "warten", ANY),
    verb("sleeping", "schläft", "schlafen", ANY),
    verb("working", "arbeitet", "arbeiten"),
    verb("dancing", "tanzt", "tanzen"),
    verb("singing", "singt", "singen"),
    verb("laughing", "lacht", "lachen"),
    verb("smiling", "lächelt", "lächeln"),
    verb("playing", "spielt", "spielen", ANY),
    verb(WALK, "geht", "gehen", ANY),
    verb(RUN, "läuft", "laufen", ANY),
    verb(JUMP, "springt", "springen", ANY, static=False),
    verb(CLIMB, "klettert", "klettern", ANY, static=False),
    verb(SWIM, "schwimmt", "schwimmen", ANY, water=True),
    verb("reading", "liest", "lesen", objects="read"),
    verb("holding", "hält", "halten", objects="thing,food"),
    verb("carrying", "trägt", "tragen", objects="carry,food"),
    verb("wearing", "trägt", "tragen", objects="clothing", static=True),
    verb("throwing", "wirft", "werfen", objects="toy"),
    verb("eating", "isst", "essen", ANY, objects="food"),
    verb("buying", "kauft", "kaufen", objects="food,thing"),
    verb("painting", "malt", "malen", objects="art"),
    verb("writing", "schreibt", "schreiben", objects="write"),
    verb("watching", "beobachtet", "beobachten", ANY, objects="person,animal"),
    verb("pushing", "schiebt", "schieben", objects="push"),
    verb("pulling", "zieht", "ziehen", objects="push"),
    verb("washing", "wäscht", "waschen", objects="animal,vehicle"),
    verb("feeding", "füttert", "füttern", objects="animal"),
    verb("hugging", "umarmt", "umarmen", objects="person,animal"),
    verb("looking", "betrachtet", "betrachten", ANY, objects="art,thing,vehicle", en_prep="at"),
    verb("playing", "spielt", "spielen", ANY, objects="toy,animal,person", en_prep="with", de_prep="mit",
         case=DAT),
    verb("talking", "spricht", "sprechen", objects="person", en_prep="to", de_prep="mit", case=DAT),
    verb("waiting", "wartet", "warten", ANY, objects="person", en_prep="for", de_prep="auf", case=ACC),
]  # fmt: skip
NOUNS = PEOPLE + ANIMALS + THINGS + FOOD + VEHICLES + CLOTHES


@dataclass
class Phrase:
    en: list = field(default_factory=list)
    de: list = field(default_factory=list)

    def __add__(self, other: Phrase) -> Phrase:
        return Phrase(self.en + other.en, self.de + other.de)


def a_or_an(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def noun_phrase(rng: random.Random, noun: Noun, case: int, plural=False, article=None, adj_p=0.35) -> Phrase:
    """Determiner (+ adjective) + noun, the German inflected for gender, number and case."""
    adjs = [a for a in ADJECTIVES if a.kinds & noun.kinds]
    adj = rng.choice(adjs) if adjs and rng.random() < adj_p else None
    article = article or ("the" if noun.mass or rng.random() < 0.4 else "a")
    en_noun = noun.en_pl if plural else noun.en
    de_noun = noun.de_form(plural, case)
    if plural and article == "the":
        en, de = ["the"], [DEF_PLURAL[case]]
        ending = WEAK["pl"][case]
    elif plural:
        quant = rng.choice(QUANTIFIERS)
        en, de = [quant[0]], [quant[2] if case == DAT else quant[1]]
        ending = STRONG_PLURAL[case]
    elif article == "the":
        en, de = ["the"], [DEF_ARTICLE[noun.gender][case]]
        ending = WEAK[noun.gender][case]
    else:
        en, de = [a_or_an(adj.en if adj else noun.en)], [INDEF_ARTICLE[noun.gender][case]]
        ending = MIXED[noun.gender][case]
    if adj:
        en.append(adj.en)
        de.append(adj.de_stem + ending)
    return Phrase(en + en_noun.split(), de + [de_noun])


def prepositional(en_prep: str, de_prep: str, np_: Phrase) -> Phrase:
    """Preposition + noun phrase, contracting "in dem" to "im" and so on as German requires."""
    contracted = CONTRACTIONS.get((de_prep, np_.de[0]))
    de = [contracted, *np_.de[1:]] if contracted else [de_prep, *np_.de]
    return Phrase(en_prep.split() + np_.en, de)


def subject(rng: random.Random, kinds: frozenset) -> tuple[Phrase, bool]:
    """A subject noun phrase and whether it is plural (coordinated subjects are)."""
    pool = [n for n in PEOPLE + ANIMALS if n.kinds & kinds]
    if rng.random() < 0.12:
        first, second = rng.sample(pool, 2)
        a, b = noun_phrase(rng, first, NOM, adj_p=0.2), noun_phrase(rng, second, NOM, adj_p=0.2)
        return Phrase(a.en + ["and"] + b.en, a.de + ["und"] + b.de), True
    noun = rng.choice(pool)
    plural = rng.random() < 0.3
    np_ = noun_phrase(rng, noun, NOM, plural)
    if "person" in noun.kinds and rng.random() < 0.25:
        np_ = np_ + attire(rng, plural)
    return np_, plural


def attire(rng: random.Random, plural: bool) -> Phrase:
    """ "in a red shirt" / "with hats": a dative phrase that describes a person."""
    noun = rng.choice(CLOTHES)
    en_prep, de_prep = rng.choice([("in", "in"), ("with", "mit")])
    if plural:
        adj = rng.choice([a for a in ADJECTIVES if "clothing" in a.kinds])
        np_ = Phrase([adj.en, noun.en_pl], [adj.de_stem + STRONG_PLURAL[DAT], noun.de_form(True, DAT)])
    else:
        np_ = noun_phrase(rng, noun, DAT, article="a", adj_p=0.7)
    return prepositional(en_prep, de_prep, np_)


def place_phrase(rng: random.Random, v: Verb) -> Phrase | None:
    """Where the action happens (dative) or, for a verb of motion, where it goes (accusative)."""
    options = []
    for p in PLACES:
        if v.static and p.water == v.water:
            options += [(p, en, de, DAT) for en, de in p.static]
        options += [(p, en, de, ACC) for en, de, verbs in p.motion if v.en in verbs]
    if not options:
        return None
    p, en_prep, de_prep, case = rng.choice(options)
    return prepositional(en_prep, de_prep, noun_phrase(rng, p.noun, case, adj_p=0.2))


def clause(rng: random.Random) -> tuple[Phrase, Phrase, bool]:
    """(subject, rest of the clause with the German verb first, plural): ordered for a main clause."""
    v = rng.choice(VERBS)
    subj, plural = subject(rng, v.subjects)
    en_verb = ["are" if plural else "is", v.en]
    de_verb = v.de_pl if plural else v.de_sg
    rest = Phrase(en_verb, [de_verb])
    if plural and rng.random() < 0.2:
        rest = rest + Phrase(["together"], ["zusammen"])
    if v.objects:
        candidates = [n for n in NOUNS if n.kinds & v.objects]
        obj = noun_phrase(rng, rng.choice(candidates), v.case, plural=rng.random() < 0.2)
        rest = rest + (prepositional(v.en_prep, v.de_prep, obj) if v.de_prep else Phrase(v.en_prep.split(), []) + obj)
    if not v.objects or rng.random() < 0.5:
        where = place_phrase(rng, v)
        if where and (v.static or not v.objects):
            rest = rest + where
    return subj, rest, plural


def sentence(rng: random.Random) -> tuple[str, str]:
    subj, rest, _ = clause(rng)
    main = subj + rest
    r = rng.random()
    if r < 0.12:
        subj2, rest2, _ = clause(rng)
        main = main + Phrase(["and"], ["und"]) + subj2 + rest2
    elif r < 0.24:
        subj2, rest2, _ = clause(rng)
        # Subordinate clause: the finite verb goes to the end (", während ein Hund im Park schläft").
        sub_de = ["während"] + subj2.de + rest2.de[1:] + rest2.de[:1]
        main = Phrase(main.en + ["while"] + subj2.en + rest2.en, main.de[:-1] + [main.de[-1] + ","] + sub_de)
    return render(main.en), render(main.de)


def render(words: list) -> str:
    text = " ".join(words) + "."
    return text[0].upper() + text[1:]


def generate(seed: int, n_train: int, n_valid: int, n_test: int, min_words=4, max_words=15) -> dict:
    """Distinct pairs, shuffled and split: no validation or test sentence occurs in train."""
    rng = random.Random(seed)
    seen, pairs = set(), []
    total = n_train + n_valid + n_test
    while len(pairs) < total:
        en, de = sentence(rng)
        if en in seen or de in seen or not all(min_words <= len(s.split()) <= max_words for s in (en, de)):
            continue
        seen.update((en, de))
        pairs.append({"en": en, "de": de})
    return {
        "test": pairs[:n_test],
        "validation": pairs[n_test : n_test + n_valid],
        "train": pairs[n_test + n_valid :],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "sample-en-de")
    parser.add_argument("--seed", type=int, default=2017)
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--valid", type=int, default=200)
    parser.add_argument("--test", type=int, default=200)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for split, pairs in generate(args.seed, args.train, args.valid, args.test).items():
        lines = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
        (args.out / f"{split}.jsonl").write_text(lines, encoding="utf-8")
        print(f"{split}: {len(pairs)} pairs")


if __name__ == "__main__":
    main()
