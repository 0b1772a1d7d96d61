"""A WMT14-sized rehearsal corpus in the hub's `wmt/wmt14` layout, for the data stages at full size offline.

    python -m tools.make_wmt_like --out /tmp/wmt14-like            # 4,508,785 + 3,000 + 3,003 pairs
    python -m tools.make_wmt_like --out /tmp/wmt-small --train-pairs 100000

The hub cannot be reached from every machine, so this writes what `datasets` reads from the hub:

    <out>/README.md                                  YAML `configs:`: config `de-en` (the default), its splits
    <out>/de-en/train-0000i-of-0000n.parquet         one column `translation` of {de, en} (datasets' `Translation`)
    <out>/de-en/validation-00000-of-00001.parquet
    <out>/de-en/test-00000-of-00001.parquet
    <out>/generator.json                             the arguments and what came out (types, lengths, tail)

and `pipeline/download.py` reads it with `-S data.dataset=<out>` alone (`data.config` may stay `de-en`, the
default, or be null: the README names `de-en` as the default config).

What is WMT14-like (the parameters are the command line's; they are stated, not fitted to the real corpus,
which cannot be reached from here):
- sizes: 4,508,785 training pairs, 3,000 validation, 3,003 test (the hub's split sizes);
- words per English sentence: lognormal with mean `--mean-words` 23 and log-sd `--sigma` 0.65 (median 18.6;
  P(> 250 words) = 3.2e-5, about 145 sentences at full size), plus `--junk-share` 1e-5 of "crawl junk" lines of
  500-3,000 words (log-uniform), longer than sentencepiece's 4,192-byte sentence limit and binarise's max_len;
- German length = English length · exp(N(-0.08, 0.15²)): correlated, about 7% fewer words;
- words: a two-regime Zipf law (Ferrer-i-Cancho and Solé 2001) over `--vocab-size` 2,000,000 types per
  language, frequency ∝ rank^-1 (`--zipf`) up to rank 10,000 (`--zipf-knee`), ∝ rank^-1.6 (`--zipf-tail`) beyond:
  the top 10,000 words are 86% of the running words, and 100M words (WMT14's English side) show 1.04M
  types (a single exponent of 1 would put 35% of the words beyond rank 10,000 and BPE would cut sentences
  into twice WMT14's ~28 tokens). Each language
  with its own syllables (onset + vowel group, a final coda; German: umlauts, ß, sch, capitalised nouns, longer
  words), frequent words short. Syllables alternate consonant and vowel runs, so distinct syllable sequences
  are distinct words. About 1 in 10 words is followed by a comma; sentences start with a capital, end with ".".
  The two sides are not translations of each other: a model learns nothing from them but their statistics.

Vectorised with numpy (Zipf ranks by inverse CDF, words gathered from one byte table, no Python per word
after the vocabulary) and written with pyarrow one row group at a time, so memory stays bounded whatever
`--train-pairs` is. The same `--seed` gives the same bytes: each row group draws from its own seed sequence.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.common.files import atomic_path

CONFIG = "de-en"
LANGS = ("de", "en")  # the struct's field order on the hub
SPLITS = {"train": 0, "validation": 1, "test": 2}  # name -> seed-sequence key
# datasets' schema metadata for a `Translation(languages=["de", "en"])` column: read back as that feature.
HF_METADATA = {
    b"huggingface": json.dumps(
        {"info": {"features": {"translation": {"languages": list(LANGS), "_type": "Translation"}}}}
    ).encode()
}
SCHEMA = pa.schema([("translation", pa.struct([(lang, pa.string()) for lang in LANGS]))], metadata=HF_METADATA)


def items(text: str) -> list[str]:
    return text.split()


# Syllable inventories: onsets and codas of consonant letters only, nuclei of vowel letters only (so a word's
# maximal consonant/vowel runs are its syllables: distinct sequences are distinct words).
SHAPES = {
    "en": dict(
        onsets=items(
            "b c d f g h j k l m n p r s t v w z bl br ch cl cr dr fl fr gl gr pl pr sc sh sk sl sm sn sp st "
            "str sw th tr tw wh wr ph thr spr"
        ),
        nuclei=items("a e i o u y ai ea ee oa oo ou ie au"),
        codas=items("- s t d n r l ng nd st ck th rs ll x ts nt ss ght rd"),
        syllables=(0.0, 0.3),  # mean extra syllables: a + b · log10(rank + 1)
        capitalised=0.0,
    ),
    "de": dict(
        onsets=items(
            "b d f g h j k l m n p r s t w z bl br ch dr fl fr gl gr kl kn kr pf pl sch schl schm schn "
            "schr schw sp st str tr zw"
        ),
        nuclei=items("a e i o u ä ö ü ei ie au eu äu ee aa"),
        codas=items("- n r s t ch cht ng nd ft st ck rt ß l m tz ns nk rn lt"),
        syllables=(0.2, 0.4),
        capitalised=0.3,  # nouns
    ),
}


@dataclass(frozen=True)
class Shape:
    """What the corpus looks like (the module docstring says why these values); the first ones are options."""

    mean_words: float = 23.0
    sigma: float = 0.65
    junk_share: float = 1e-5
    junk_words: tuple[int, int] = (500, 3000)
    ratio_mu: float = -0.08
    ratio_sigma: float = 0.15
    zipf: float = 1.0
    zipf_knee: int = 10_000
    zipf_tail: float = 1.6
    vocab_size: int = 2_000_000
    comma_share: float = 0.1


def vocabulary(lang: str, size: int, seed: int) -> list[str]:
    """`size` distinct words of `lang`, most frequent first: short words at the top ranks, as in real text."""
    shape = SHAPES[lang]
    rng = np.random.default_rng([seed, 100 + list(SHAPES).index(lang)])
    onsets, nuclei, codas = (np.array(shape[k], dtype=object) for k in ("onsets", "nuclei", "codas"))
    a, b = shape["syllables"]
    extra = rng.poisson(a + b * np.log10(np.arange(size) + 1.0))
    words: list[str] = [""] * size
    seen: set[str] = set()
    pending = np.arange(size)
    while len(pending):
        # Syllables of every pending word, drawn at once; a word that already exists is redrawn one longer.
        k = extra[pending] + 1
        parts = pick(rng, onsets, k.sum()) + pick(rng, nuclei, k.sum())
        ends = pick(rng, codas, len(pending))
        caps = rng.random(len(pending)) < shape["capitalised"]
        bounds = np.concatenate([[0], np.cumsum(k)])
        retry = []
        for j, i in enumerate(pending.tolist()):
            word = "".join(parts[bounds[j] : bounds[j + 1]]) + ends[j].strip("-")
            word = word.capitalize() if caps[j] else word
            if word in seen:
                retry.append(i)
                extra[i] += 1
            else:
                seen.add(word)
                words[i] = word
        pending = np.array(retry, dtype=np.int64)
    return words


def pick(rng: np.random.Generator, items: np.ndarray, n: int) -> np.ndarray:
    """n items drawn with weight 3^-(letters - 1): single letters are common, clusters rarer ("-" is none)."""
    weights = 3.0 ** -np.array([len(i.strip("-")) - 1 for i in items], dtype=np.float64)
    return items[rng.choice(len(items), size=n, p=weights / weights.sum())]


class WordTable:
    """Every word of one language twice, as `word + " "` and `word + ", "`, back to back in one byte array."""

    def __init__(self, words: list[str]):
        encoded = [w.encode("utf-8") for w in words]
        entries = [w + b" " for w in encoded] + [w + b", " for w in encoded]
        self.size = len(words)
        self.lengths = np.fromiter(map(len, entries), dtype=np.int64, count=len(entries))
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]])
        self.blob = np.frombuffer(b"".join(entries), dtype=np.uint8)

    def sentences(self, tokens: np.ndarray, words_per_sentence: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """UTF-8 bytes and int64 offsets of sentences made of `tokens` (entry ids), first letter capitalised,
        the last word's trailing space replaced by a full stop."""
        lengths = self.lengths[tokens]
        ends = np.cumsum(lengths)  # (n_tokens,) end of each token in the output
        # Ragged gather: output byte j of token i comes from blob[starts[i] + j - (ends[i] - lengths[i])].
        shift = np.repeat(self.starts[tokens] - (ends - lengths), lengths)
        data = self.blob[np.arange(len(shift), dtype=np.int64) + shift]
        offsets = np.zeros(len(words_per_sentence) + 1, dtype=np.int32)  # a row group holds < 2 GiB of text
        offsets[1:] = ends[np.cumsum(words_per_sentence) - 1]
        data[offsets[1:] - 1] = ord(".")  # the last token of a sentence never carries a comma: its end is " "
        first = data[offsets[:-1]]
        data[offsets[:-1]] = np.where((first >= ord("a")) & (first <= ord("z")), first - 32, first)
        return data, offsets


def zipf_cdf(size: int, exponent: float, knee: int | None = None, tail: float | None = None) -> np.ndarray:
    """Cumulative probabilities of ranks 1..size: ∝ rank^-exponent, and beyond `knee` ∝ rank^-tail (continuous at
    the knee)."""
    rank = np.arange(1, size + 1, dtype=np.float64)
    p = rank**-exponent
    if knee is not None and tail is not None:
        beyond = rank > knee
        p[beyond] = float(knee) ** (tail - exponent) * rank[beyond] ** -tail
    cdf = np.cumsum(p)
    return cdf / cdf[-1]


def draw_ranks(rng: np.random.Generator, cdf: np.ndarray, n: int) -> np.ndarray:
    """n i.i.d. Zipf ranks (0-based) by inverse CDF. Sorted uniforms make the lookups cache-friendly (3x
    faster); a random permutation of an i.i.d. sample is again an i.i.d. sample."""
    u = np.sort(rng.random(n))
    return rng.permutation(np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1))


def sentence_lengths(rng: np.random.Generator, n: int, shape: Shape) -> tuple[np.ndarray, np.ndarray]:
    """(English words, German words) per pair."""
    mu = math.log(shape.mean_words) - shape.sigma**2 / 2  # lognormal mean = exp(mu + sigma^2 / 2)
    en = np.maximum(1, np.rint(rng.lognormal(mu, shape.sigma, n))).astype(np.int64)
    junk = rng.random(n) < shape.junk_share
    lo, hi = np.log(shape.junk_words)
    en[junk] = np.rint(np.exp(rng.uniform(lo, hi, int(junk.sum())))).astype(np.int64)
    de = np.maximum(1, np.rint(en * np.exp(rng.normal(shape.ratio_mu, shape.ratio_sigma, n)))).astype(np.int64)
    return en, de


class Generator:
    """The corpus of one seed: vocabularies built once, then any number of row groups."""

    def __init__(self, shape: Shape, seed: int):
        self.shape, self.seed = shape, seed
        self.cdf = zipf_cdf(shape.vocab_size, shape.zipf, shape.zipf_knee, shape.zipf_tail)
        self.tables = {lang: WordTable(vocabulary(lang, shape.vocab_size, seed)) for lang in LANGS}
        self.type_counts = {lang: np.zeros(shape.vocab_size, dtype=np.int64) for lang in LANGS}
        self.word_counts = {lang: [] for lang in LANGS}

    def row_group(self, split: str, index: int, n: int) -> pa.Table:
        rng = np.random.default_rng([self.seed, SPLITS[split], index])
        words = dict(zip(("en", "de"), sentence_lengths(rng, n, self.shape), strict=True))
        columns = {}
        for lang in LANGS:
            ranks = draw_ranks(rng, self.cdf, int(words[lang].sum()))
            self.type_counts[lang] += np.bincount(ranks, minlength=self.shape.vocab_size)
            self.word_counts[lang].append(words[lang])
            comma = rng.random(len(ranks)) < self.shape.comma_share
            comma[np.cumsum(words[lang]) - 1] = False  # the last word ends the sentence
            data, offsets = self.tables[lang].sentences(ranks + comma * self.shape.vocab_size, words[lang])
            columns[lang] = pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data))
        struct = pa.StructArray.from_arrays([columns[lang] for lang in LANGS], names=list(LANGS))
        return pa.Table.from_arrays([struct], schema=SCHEMA)

    def write_split(self, folder: Path, split: str, pairs: int, row_group: int, shard_pairs: int) -> list[str]:
        shards = max(1, math.ceil(pairs / shard_pairs))
        names, group = [], 0
        for s in range(shards):
            name = f"{split}-{s:05d}-of-{shards:05d}.parquet"
            first, last = s * pairs // shards, (s + 1) * pairs // shards
            with pq.ParquetWriter(folder / name, SCHEMA, compression="snappy") as writer:
                for start in range(first, last, row_group):
                    writer.write_table(self.row_group(split, group, min(row_group, last - start)))
                    group += 1
            names.append(name)
        return names


def readme(splits: dict[str, int], args: argparse.Namespace) -> str:
    files = "".join(f"  - split: {s}\n    path: {CONFIG}/{s}-*\n" for s in splits)
    sizes = ", ".join(f"{s} {n:,}" for s, n in splits.items())
    return (
        f"---\nconfigs:\n- config_name: {CONFIG}\n  default: true\n  data_files:\n{files}---\n"
        f"# A WMT14-sized synthetic En-De corpus (not a translation corpus)\n\n"
        f"Made by `tools/make_wmt_like.py --seed {args.seed}` in the hub's `wmt/wmt14` layout ({sizes} pairs).\n"
        f"See that file's docstring for what it imitates; `generator.json` has the arguments and statistics.\n"
    )


def statistics(gen: Generator, splits: dict[str, int]) -> dict:
    """What came out, per language: types seen, words per sentence, the long tail (no timings: the folder's
    bytes depend on the arguments alone)."""
    stats = {"splits": splits, "shape": asdict(gen.shape), "seed": gen.seed}
    for lang in LANGS:
        words = np.concatenate(gen.word_counts[lang])
        stats[lang] = {
            "types_seen": int(np.count_nonzero(gen.type_counts[lang])),
            "vocabulary": gen.shape.vocab_size,
            "words": int(words.sum()),
            "mean_words": round(float(words.mean()), 3),
            "median_words": float(np.median(words)),
            "max_words": int(words.max()),
            "over_250_words": int((words > 250).sum()),
        }
    return stats


def generate(out: Path, args: argparse.Namespace, shape: Shape) -> dict:
    """Write the whole folder atomically; returns the statistics (also written as generator.json)."""
    gen = Generator(shape, args.seed)
    splits = {"train": args.train_pairs, "validation": args.valid_pairs, "test": args.test_pairs}
    with atomic_path(out) as tmp:
        (tmp / CONFIG).mkdir(parents=True)
        for split, pairs in splits.items():
            gen.write_split(tmp / CONFIG, split, pairs, args.row_group, args.shard_pairs)
        (tmp / "README.md").write_text(readme(splits, args), encoding="utf-8")
        stats = statistics(gen, splits)
        (tmp / "generator.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    return stats


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Shape]:
    d = Shape()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder to write (replaced atomically)")
    p.add_argument("--train-pairs", type=int, default=4_508_785)
    p.add_argument("--valid-pairs", type=int, default=3_000)
    p.add_argument("--test-pairs", type=int, default=3_003)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--mean-words", type=float, default=d.mean_words, help="mean words per English sentence")
    p.add_argument("--sigma", type=float, default=d.sigma, help="log-sd of the lognormal sentence length")
    p.add_argument("--junk-share", type=float, default=d.junk_share, help="share of 500-3,000-word lines")
    p.add_argument("--zipf", type=float, default=d.zipf, help="Zipf exponent of word frequencies, head")
    p.add_argument("--zipf-knee", type=int, default=d.zipf_knee, help="rank where the tail exponent takes over")
    p.add_argument("--zipf-tail", type=float, default=d.zipf_tail, help="Zipf exponent beyond the knee")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size, help="word types per language")
    p.add_argument("--row-group", type=int, default=50_000, help="pairs per parquet row group (memory)")
    p.add_argument("--shard-pairs", type=int, default=1_600_000, help="pairs per parquet file (hub: 3 files)")
    args = p.parse_args(argv)
    for name in ("train_pairs", "valid_pairs", "test_pairs", "vocab_size", "row_group", "shard_pairs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    shape = Shape(
        args.mean_words, args.sigma, args.junk_share, zipf=args.zipf, zipf_knee=args.zipf_knee,
        zipf_tail=args.zipf_tail, vocab_size=args.vocab_size,
    )  # fmt: skip
    return args, shape


def main(argv: list[str] | None = None) -> None:
    args, shape = parse_args(argv)
    start = time.perf_counter()
    stats = generate(args.out, args, shape)
    sizes = ", ".join(f"{s} {n:,}" for s, n in stats["splits"].items())
    print(f"{args.out}: {sizes} pairs in {time.perf_counter() - start:.1f} s")
    for lang in LANGS:
        s = stats[lang]
        print(f"  {lang}: {s['words']:,} words, {s['types_seen']:,} types seen of {s['vocabulary']:,}, "
              f"{s['mean_words']} words a sentence (median {s['median_words']:g}, max {s['max_words']:,}, "
              f"{s['over_250_words']:,} over 250)")  # fmt: skip


if __name__ == "__main__":
    main()
