"""tools/make_wmt_like.py: the hub's wmt14 layout that the download stage reads, the same bytes for the same seed,
and the statistics it promises (lengths, Zipf types, the long tail) against values derived from its parameters."""

import json
import math
import statistics

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import download as dl
from pipeline.common.params import DataParams
from tools import make_wmt_like as gen

SMALL = ["--train-pairs", "1500", "--valid-pairs", "30", "--test-pairs", "33", "--vocab-size", "20000"]


def make(folder, *extra):
    gen.main(["--out", str(folder), *SMALL, "--row-group", "400", "--shard-pairs", "1000", *extra])
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make(tmp_path_factory.mktemp("wmt") / "wmt14-like")


def file_bytes(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("config", ["de-en", None])
def test_download_reads_the_layout_into_the_right_split_sizes(corpus, tmp_path, config):
    # data.config as in conf/config.yaml (de-en, the hub's) or null: the README makes de-en the default.
    stats = dl.download(DataParams(dataset=str(corpus), config=config), tmp_path / "raw")
    assert [stats[s]["pairs"] for s in ("train", "valid", "test")] == [1500, 30, 33]
    en = (tmp_path / "raw" / "test.en").read_text(encoding="utf-8").split("\n")[:-1]
    assert len(en) == 33 and all(line[0].isupper() and line.endswith(".") for line in en)
    assert sorted(p.name for p in (corpus / "de-en").iterdir()) == [
        "test-00000-of-00001.parquet",
        "train-00000-of-00002.parquet",  # --shard-pairs 1000: 1,500 pairs in two files, like the hub's three
        "train-00001-of-00002.parquet",
        "validation-00000-of-00001.parquet",
    ]


def test_same_seed_same_bytes_other_seed_differs(corpus, tmp_path):
    assert file_bytes(make(tmp_path / "again")) == file_bytes(corpus)
    other = file_bytes(make(tmp_path / "other", "--seed", "2"))
    assert other.keys() == file_bytes(corpus).keys()
    assert all(other[k] != v for k, v in file_bytes(corpus).items() if k.endswith(".parquet"))


def test_generator_json_counts_what_was_written(corpus):
    stats = json.loads((corpus / "generator.json").read_text())
    assert stats["splits"] == {"train": 1500, "validation": 30, "test": 33}
    rows = [
        r for f in sorted((corpus / "de-en").glob("*.parquet")) for r in pq.read_table(f)["translation"].to_pylist()
    ]
    assert len(rows) == 1563
    for lang in ("en", "de"):
        words = [len(r[lang].split()) for r in rows]
        assert stats[lang]["words"] == sum(words) and stats[lang]["max_words"] == max(words)
        assert stats[lang]["over_250_words"] == sum(n > 250 for n in words)
        assert 0 < stats[lang]["types_seen"] <= 20000


def test_sentence_lengths_follow_the_stated_lognormal():
    shape = gen.Shape(junk_share=0.0)
    en, de = gen.sentence_lengths(np.random.default_rng(0), 4000, shape)
    mu = math.log(23.0) - 0.65**2 / 2
    assert en.mean() == pytest.approx(23.0, rel=0.04)  # the lognormal's mean; rounding moves it by < 0.1%
    assert np.median(en) == pytest.approx(math.exp(mu), abs=1.0)  # 18.6
    # German: English · exp(N(-0.08, 0.15²)), so about exp(-0.08 + 0.01125) = 0.93 of the words, and correlated.
    assert de.mean() / en.mean() == pytest.approx(math.exp(-0.08 + 0.15**2 / 2), abs=0.02)
    assert np.corrcoef(np.log(en), np.log(de))[0, 1] > 0.85
    # The share over 100 words is the lognormal's tail: 1 - Φ((ln 100 - mu) / 0.65) = 0.49%.
    tail = 1 - statistics.NormalDist().cdf((math.log(100) - mu) / 0.65)
    assert (en > 100).mean() == pytest.approx(tail, rel=0.5)


def test_the_long_tail_exists():
    # 1M sentences: the lognormal alone puts 3.2e-5 of them over 250 words, the junk lines (1e-5) 500-3,000.
    en, _ = gen.sentence_lengths(np.random.default_rng(1), 1_000_000, gen.Shape())
    assert 20 <= (en > 250).sum() <= 70  # expected 32 + 10
    assert 500 <= en.max() <= 3000 and 2 <= (en >= 500).sum() <= 25


def test_zipf_types_grow_as_the_law_says():
    cdf = gen.zipf_cdf(100_000, 1.0)
    p = np.diff(cdf, prepend=0.0)
    assert p[0] / p[1] == pytest.approx(2.0)  # exponent 1: frequency ∝ 1 / rank
    ranks = gen.draw_ranks(np.random.default_rng(2), cdf, 400_000)
    for n in (50_000, 400_000):
        expected = float(np.sum(1 - (1 - p) ** n))  # types seen at least once in n draws
        assert len(np.unique(ranks[:n])) == pytest.approx(expected, rel=0.02)
    counts = np.bincount(ranks, minlength=100_000)
    assert counts[0] / counts[1] == pytest.approx(2.0, rel=0.05)
    assert not np.all(np.diff(ranks) >= 0)


def test_two_regime_zipf_changes_exponent_at_the_knee():
    p = np.diff(gen.zipf_cdf(50_000, 1.0, knee=1000, tail=1.6), prepend=0.0)
    assert p[99] / p[199] == pytest.approx(2.0)  # ranks 100 and 200: exponent 1
    assert p[1999] / p[3999] == pytest.approx(2**1.6)  # ranks 2,000 and 4,000: exponent 1.6
    assert p[999] / p[1000] == pytest.approx((1001 / 1000) ** 1.6)  # no jump at the knee
    # At the defaults, 100M words (WMT14's English side) show about a million types: sum of 1 - exp(-N p).
    s = gen.Shape()
    p = np.diff(gen.zipf_cdf(s.vocab_size, s.zipf, s.zipf_knee, s.zipf_tail), prepend=0.0)
    assert 1_000_000 <= np.sum(-np.expm1(-100e6 * p)) <= 1_100_000


def test_vocabularies_are_distinct_words_of_their_own_letters():
    en, de = gen.vocabulary("en", 20000, 1), gen.vocabulary("de", 20000, 1)
    assert len(set(en)) == len(en) == 20000 and len(set(de)) == 20000
    assert not any(c in "äöüß" for w in en for c in w)
    assert sum(any(c in "äöüß" for c in w) for w in de) > 5000 and sum(w[0].isupper() for w in de) > 4000
    assert len(set(en) & set(de)) < 1000
    # Frequent words are short: the top 100 ranks average fewer letters than the last 1,000.
    assert np.mean([len(w) for w in en[:100]]) < np.mean([len(w) for w in en[-1000:]]) - 2
    assert gen.Shape().vocab_size >= 1_000_000


def test_sentences_are_made_of_the_vocabulary():
    words = gen.vocabulary("de", 500, 3)
    table = gen.WordTable(words)
    tokens = np.array([5, 7, 500 + 9, 11, 0, 2])  # 9 with its comma; sentences of 4 and 2 words
    data, offsets = table.sentences(tokens, np.array([4, 2]))
    text = data.tobytes().decode("utf-8")
    first = f"{words[5]} {words[7]} {words[9]}, {words[11]}."
    second = f"{words[0]} {words[2]}."
    assert text == first[0].upper() + first[1:] + second[0].upper() + second[1:]
    assert offsets.tolist() == [0, len(first.encode()), len(first.encode()) + len(second.encode())]
