"""The embedded corpus (corpus/make_sample.py) and the binarised on-disk format (transformer/corpus.py)."""

import importlib.util
import json
import pickle
import random
import sys

import numpy as np
import pytest
from conftest import REPO

from transformer.corpus import (
    EOS_ID,
    CorpusError,
    ParallelCorpus,
    SideWriter,
    token_dtype,
    write_meta,
)

SAMPLE = REPO / "corpus" / "sample-en-de"


def load_generator():
    spec = importlib.util.spec_from_file_location("make_sample", REPO / "corpus" / "make_sample.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_sample"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gen = load_generator()


def read(split):
    return [json.loads(line) for line in (SAMPLE / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


# --- the embedded corpus -------------------------------------------------------------------------------


def test_sample_sizes_distinct_and_disjoint():
    splits = {s: read(s) for s in ("train", "validation", "test")}
    assert {s: len(p) for s, p in splits.items()} == {"train": 4000, "validation": 200, "test": 200}
    every = [p["en"] for pairs in splits.values() for p in pairs]
    assert len(set(every)) == len(every)
    train = {p["en"] for p in splits["train"]} | {p["de"] for p in splits["train"]}
    for split in ("validation", "test"):
        assert not any(p["en"] in train or p["de"] in train for p in splits[split])
    assert sum(f.stat().st_size for f in SAMPLE.glob("*.jsonl")) <= 1_000_000


def test_sample_sentence_lengths_and_vocabulary():
    pairs = read("train")
    for p in pairs:
        assert set(p) == {"en", "de"}
        assert all(4 <= len(p[k].split()) <= 15 for k in p)
        assert p["de"][0].isupper() and p["de"].endswith(".")
    en_vocab = {w for p in pairs for w in p["en"].lower().rstrip(".").replace(",", "").split()}
    assert 150 <= len(en_vocab) <= 600  # modest: a tiny model must learn it in minutes


def test_generator_reproduces_the_committed_files():
    splits = gen.generate(2017, 4000, 200, 200)
    for split, pairs in splits.items():
        assert pairs == read(split)


def test_german_articles_agree_in_gender_case_and_number():
    by_en = {n.en: n for n in gen.NOUNS}
    rng = random.Random(0)

    def de(noun, case, plural=False, article="a"):
        return " ".join(gen.noun_phrase(rng, by_en[noun], case, plural, article, adj_p=0).de)

    assert de("man", gen.NOM) == "ein Mann"
    assert de("man", gen.ACC) == "einen Mann"
    assert de("woman", gen.DAT) == "einer Frau"
    assert de("book", gen.DAT, article="the") == "dem Buch"
    assert de("boy", gen.ACC, article="the") == "den Jungen"  # weak noun
    assert de("student", gen.DAT) == "einem Studenten"
    assert de("child", gen.DAT, plural=True, article="the") == "den Kindern"  # dative plural -n
    assert de("car", gen.DAT, plural=True, article="the") == "den Autos"  # but not after -s


def test_german_adjective_endings():
    rng = random.Random(0)
    young = next(a for a in gen.ADJECTIVES if a.en == "young")
    gen_adjs, gen.ADJECTIVES = gen.ADJECTIVES, [young]
    try:
        man = next(n for n in gen.NOUNS if n.en == "man")

        def de(case, plural=False, article="a"):
            return " ".join(gen.noun_phrase(rng, man, case, plural, article, adj_p=1.0).de)

        assert de(gen.NOM) == "ein junger Mann"  # mixed declension
        assert de(gen.ACC) == "einen jungen Mann"
        assert de(gen.NOM, article="the") == "der junge Mann"  # weak declension
        assert de(gen.DAT, plural=True, article="the") == "den jungen Männern"
        assert de(gen.NOM, plural=True, article="some").split()[1:] == ["junge", "Männer"]  # strong
    finally:
        gen.ADJECTIVES = gen_adjs


def test_contractions_and_subordinate_clause_word_order():
    np_ = gen.Phrase(["the", "park"], ["dem", "Park"])
    assert gen.prepositional("in", "in", np_).de == ["im", "Park"]
    assert gen.prepositional("into", "in", gen.Phrase(["the", "water"], ["das", "Wasser"])).de == [
        "ins",
        "Wasser",
    ]
    assert gen.prepositional("in", "in", gen.Phrase(["a", "park"], ["einem", "Park"])).de == [
        "in",
        "einem",
        "Park",
    ]
    whiles = [p for p in read("train") if " while " in p["en"]]
    assert whiles and all(", während " in p["de"] for p in whiles)


# --- the binarised format --------------------------------------------------------------------------------


def write_corpus(folder, split="train", src=((5, 6, EOS_ID), (7, EOS_ID)), tgt=((8, EOS_ID), (9, 10, 11, EOS_ID))):
    for lang, sentences in (("en", src), ("de", tgt)):
        writer = SideWriter(folder, split, lang, np.uint16)
        # Two appends: the offsets must continue across chunks.
        for part in (sentences[:1], sentences[1:]):
            writer.append(np.array([t for s in part for t in s]), np.array([len(s) for s in part]))
        writer.close()
    meta = {"dtype": "uint16", "vocab_size": 100, "langs": {"source": "en", "target": "de"}}
    write_meta(folder, {**meta, "splits": {split: len(src)}})


def test_round_trip(tmp_path):
    write_corpus(tmp_path)
    corpus = ParallelCorpus.load(tmp_path, "train", "en", "de")
    assert len(corpus) == 2
    src, tgt = corpus[1]
    assert src.dtype == np.int64 and src.tolist() == [7, EOS_ID] and tgt.tolist() == [9, 10, 11, EOS_ID]
    assert corpus.src_lengths.tolist() == [3, 2] and corpus.tgt_lengths.tolist() == [2, 4]
    assert isinstance(corpus.src.tokens, np.memmap)
    assert corpus.meta["vocab_size"] == 100
    assert (tmp_path / "train.en.bin").stat().st_size == 5 * 2  # uint16: two bytes a token
    # Pickled as its location, not its data, and loaded again on the other side.
    clone = pickle.loads(pickle.dumps(corpus))
    assert clone[0][1].tolist() == [8, EOS_ID]


def test_reader_rejects_truncated_and_missing(tmp_path):
    write_corpus(tmp_path)
    with pytest.raises(CorpusError, match="no split 'valid'"):
        ParallelCorpus.load(tmp_path, "valid", "en", "de")
    with pytest.raises(CorpusError, match="not en->fr"):
        ParallelCorpus.load(tmp_path, "train", "en", "fr")
    data = (tmp_path / "train.de.bin").read_bytes()
    (tmp_path / "train.de.bin").write_bytes(data[:-2])
    with pytest.raises(CorpusError, match=r"train.de.bin: 10 bytes, but train.de.idx.npy describes 12"):
        ParallelCorpus.load(tmp_path, "train", "en", "de")
    (tmp_path / "train.de.idx.npy").unlink()
    with pytest.raises(CorpusError, match=r"train.de.idx.npy: not found"):
        ParallelCorpus.load(tmp_path, "train", "en", "de")
    with pytest.raises(CorpusError, match="meta.json: not found"):
        ParallelCorpus.load(tmp_path / "nowhere", "train", "en", "de")


def test_mismatched_sides_and_empty_split(tmp_path):
    write_corpus(tmp_path, tgt=((8, EOS_ID),))
    with pytest.raises(CorpusError, match="2 source and 1 target"):
        ParallelCorpus.load(tmp_path, "train", "en", "de")
    write_corpus(tmp_path, split="test", src=(), tgt=())
    assert len(ParallelCorpus.load(tmp_path, "test", "en", "de")) == 0


def test_dtype_and_writer_checks(tmp_path):
    assert token_dtype(37000) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.int32
    writer = SideWriter(tmp_path, "train", "en", np.uint16)
    with pytest.raises(ValueError, match="outside the range"):
        writer.append(np.array([70000, EOS_ID]), np.array([2]))
    with pytest.raises(ValueError, match="lengths add up to 3"):
        writer.append(np.array([5, EOS_ID]), np.array([3]))
