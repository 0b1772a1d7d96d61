"""pipeline.paper_bleu: get_ende_bleu.sh's tokenised, ##AT##-compound-split BLEU.

Every expected token string below is derived by hand from the Perl scripts' rules (replace-unicode-punctuation.perl,
tokenizer.perl -l de/en with escaping, `s{(\\S)-(\\S)}{$1 ##AT##-##AT## $2}g`), not copied from the code's output.
"""

import math

import pytest
from sacrebleu.metrics import BLEU

from pipeline.common.paper_bleu import _split_compounds, bleu_paper, paper_tokenize


@pytest.mark.parametrize(
    ("line", "lang", "expected"),
    [
        # replace-unicode-punctuation: “ -> " (it has no rule for „, which stays); tokenizer.perl pads every char
        # that is not alnum, space, . ' ` , - (so : „ "), splits the final period of "gut." (not a prefix, next
        # token " not lower-case), then escapes " -> &quot;.
        ("Er sagte: „Das ist gut.“", "de", "Er sagte : „ Das ist gut . &quot;"),
        # ” -> " as well; an opening " is escaped the same way.
        ("”Ja”, sagte er.", "de", "&quot; Ja &quot; , sagte er ."),
        # de: the catch-all apostrophe rule s/\'/ \' /g, then ' -> &apos;.
        ("Peter's Auto ist rot.", "de", "Peter &apos; s Auto ist rot ."),
        # en: the contraction rule ([alpha])'([alpha]) -> $1 '$2 keeps 's on the right token.
        ("Peter's car is red.", "en", "Peter &apos;s car is red ."),
        # & is padded (not alnum) and escaped at the end: &amp;.
        ("Müller & Söhne", "de", "Müller &amp; Söhne"),
        # , and . between digits stay: the comma rules need a non-digit on one side; "1.000,5" does not end in ".".
        ("Es kostet 1.000,5 Euro.", "de", "Es kostet 1.000,5 Euro ."),
        ("It costs 1,000.5 euros.", "en", "It costs 1,000.5 euros ."),
        # the tokeniser (no -a) keeps the compound; the ##AT## rule matches n-M, resumes after M at "ain-Gebiet"
        # and matches n-G: both hyphens split (the non-overlap only shows with one-char parts, see a-b-c).
        ("Das Rhein-Main-Gebiet wächst.", "de", "Das Rhein ##AT##-##AT## Main ##AT##-##AT## Gebiet wächst ."),
        # usw is in nonbreaking_prefix.de: as the last word it keeps its period (tokenizer.perl before 2018-11);
        # "Äpfel," -> "Äpfel ,": the comma has a non-digit on its left.
        ("Wir kaufen Äpfel, Birnen usw.", "de", "Wir kaufen Äpfel , Birnen usw."),
        # z.B: the prefix contains a period and a letter, so it keeps its period; the final "Äpfel." splits.
        ("Obst, z.B. Äpfel.", "de", "Obst , z.B. Äpfel ."),
        # Dr is a prefix and keeps its period before an upper-case word; "kam" is not and splits before "Dann".
        ("Dr. Müller kam. Dann ging er.", "de", "Dr. Müller kam . Dann ging er ."),
        # a-b-c: non-overlapping /g; the first match consumes b.
        ("a-b-c", "de", "a ##AT##-##AT## b-c"),
    ],
)
def test_paper_tokenize(line, lang, expected):
    assert paper_tokenize(line, lang) == expected


def test_split_compounds_is_perl_non_overlapping():
    # match a-b, resume at "-c-d": "-" then "c" is no match, then c-d matches.
    assert _split_compounds("a-b-c-d") == "a ##AT##-##AT## b-c ##AT##-##AT## d"
    # a hyphen needs a non-space on both sides.
    assert _split_compounds("a - b -c d-") == "a - b -c d-"
    # Perl's byte-mode \S takes any non-ASCII char (here ü) as a neighbour.
    assert _split_compounds("Süd-ü") == "Süd ##AT##-##AT## ü"


def test_without_normalisation_the_closing_quote_stays():
    # the 2017 script had no replace-unicode-punctuation: “ is padded, not turned into &quot;.
    assert paper_tokenize("„Gut“", "de", normalize=False) == "„ Gut “"


def test_identical_hypotheses_and_references_score_100():
    lines = ["Er sagte: „Das ist gut.“", "Das Rhein-Main-Gebiet wächst schnell und stark.", "Dr. Müller kam spät."]
    result = bleu_paper(lines, lines, "de")
    assert result["bleu_paper"] == 100.0
    assert bleu_paper(lines, lines, "de", normalize=False)["bleu_paper"] == 100.0
    note = result["bleu_paper_note"]
    assert "get_ende_bleu.sh" in note and "NOT sacreBLEU" in note
    assert "tok:none" in note and "smooth:none" in note and "sacremoses 0.2.0" in note


def test_pre_tokenised_references_only_get_the_compound_split():
    hyps = ['"Ja", sagte er zum Rhein-Main-Gebiet.']
    # as in newstest2014.tok.de: tokenised and escaped, no ##AT## yet.
    refs = ["&quot; Ja &quot; , sagte er zum Rhein-Main-Gebiet ."]
    assert bleu_paper(hyps, refs, "de", refs_tokenized=True)["bleu_paper"] == 100.0
    # tokenising it again would escape the escapes (&amp;quot ;).
    assert bleu_paper(hyps, refs, "de")["bleu_paper"] < 100.0


def test_pre_tokenised_references_are_not_normalised():
    # the script normalises the hypothesis only: its “ becomes &quot;, the tokenised reference keeps “.
    hyps = ["„Das ist gut“, sagte er heute Abend."]
    refs = ["„ Das ist gut “ , sagte er heute Abend ."]
    assert bleu_paper(hyps, refs, "de", refs_tokenized=True)["bleu_paper"] < 100.0
    assert bleu_paper(hyps, refs, "de", refs_tokenized=True, normalize=False)["bleu_paper"] == 100.0


def test_differs_from_sacrebleu_13a_on_quotes():
    hyps = ["„Das ist gut“, sagte er heute.", "Er kaufte Äpfel, Birnen usw. für 1.000,5 Euro."]
    refs = ['"Das ist gut", sagte er heute.', "Er kaufte Äpfel, Birnen usw. für 1.000,5 Euro."]
    paper = bleu_paper(hyps, refs, "de")["bleu_paper"]
    sacre = BLEU().corpus_score(hyps, [refs]).score
    assert abs(paper - sacre) > 1.0


def test_bleu_by_hand():
    # hyp: the cat sat on the mat   ref: the cat sat on a mat   (6 tokens each, BP = 1)
    # 1-grams: the x2 (ref has 1, clipped to 1), cat, sat, on, mat  -> 5/6
    # 2-grams: the cat, cat sat, sat on | on the, the mat           -> 3/5
    # 3-grams: the cat sat, cat sat on | sat on the, on the mat     -> 2/4
    # 4-grams: the cat sat on | cat sat on the, sat on the mat      -> 1/3
    # BLEU = (5/6 * 3/5 * 2/4 * 1/3) ** (1/4) = (1/12) ** 0.25 = 0.53728
    result = bleu_paper(["the cat sat on the mat"], ["the cat sat on a mat"], "en")
    assert result["bleu_paper"] == round(100 * (1 / 12) ** 0.25, 2) == 53.73


def test_brevity_penalty_by_hand():
    # hyp: the cat sat on (4 tokens, every n-gram in the ref: precisions 4/4 3/3 2/2 1/1)
    # ref: the cat sat on the mat (6 tokens): BP = exp(1 - 6/4) = exp(-0.5) = 0.60653
    result = bleu_paper(["the cat sat on"], ["the cat sat on the mat"], "en")
    assert result["bleu_paper"] == round(100 * math.exp(-0.5), 2) == 60.65


def test_a_zero_precision_gives_zero_as_multi_bleu_does():
    # hyp: a b c d   ref: a b d c   1-grams 4/4, 2-grams 1/3 (a b), 3-grams 0/2, 4-grams 0/1.
    # multi-bleu.perl: log(0) -> -9999999999, BLEU 0. sacreBLEU's default `exp` smoothing would not give 0.
    assert bleu_paper(["a b c d"], ["a b d c"], "en")["bleu_paper"] == 0.0
    assert BLEU(tokenize="none").corpus_score(["a b c d"], [["a b d c"]]).score > 0


def test_line_counts_must_match():
    with pytest.raises(ValueError, match="line-aligned"):
        bleu_paper(["a"], ["a", "b"], "de")
