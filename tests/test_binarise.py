"""binarise: token arrays that decode back to data/raw, eos-terminated, training pairs filtered by reason."""

import errno
import json
import shutil

import numpy as np
import pytest
import sentencepiece as spm
from conftest import REPO

from pipeline import binarise as bz
from pipeline.common.params import BinariseParams, BpeParams, DataParams
from pipeline.download import download
from pipeline.learn_bpe import learn_bpe
from transformer import corpus as corpus_module
from transformer.corpus import EOS_ID, ParallelCorpus, read_meta


def make_raw(folder):
    """data/raw from the embedded corpus, as the download stage writes it."""
    raw = folder / "raw"
    download(DataParams(dataset=str(REPO / "corpus" / "sample-en-de"), config=None), raw)
    return raw


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    raw = make_raw(root)
    learn_bpe(raw, root / "bpe", "en", "de", BpeParams(vocab_size=400))
    return raw, root / "bpe"


def binarise(stages, out, **kw):
    raw, bpe = stages
    # The sample's pairs all lie within a length ratio of 3 (the smoke preset's value).
    return bz.binarise(raw, bpe, out, "en", "de", BinariseParams(**({"workers": 2, "max_len_ratio": 3.0} | kw)))


def test_arrays_decode_back_to_the_raw_text(stages, tmp_path):
    raw, bpe = stages
    stats = binarise(stages, tmp_path / "bin")
    sp = spm.SentencePieceProcessor(model_file=str(bpe / "spm.model"))
    for split in ("train", "valid", "test"):
        corpus = ParallelCorpus.load(tmp_path / "bin", split, "en", "de")
        en = (raw / f"{split}.en").read_text(encoding="utf-8").splitlines()
        de = (raw / f"{split}.de").read_text(encoding="utf-8").splitlines()
        assert len(corpus) == len(en) == stats[split]["pairs"]  # nothing in the sample is filtered
        for i in (0, len(corpus) // 2, len(corpus) - 1):
            src, tgt = corpus[i]
            assert src[-1] == EOS_ID and tgt[-1] == EOS_ID  # eos last, once, and no bos
            assert EOS_ID not in src[:-1] and 2 not in src and 2 not in tgt
            assert sp.decode(src[:-1].tolist()) == en[i] and sp.decode(tgt[:-1].tolist()) == de[i]
        assert stats[split]["tokens"]["en"] == corpus.src_lengths.sum()
        assert stats[split]["mean_tokens"]["de"] == pytest.approx(corpus.tgt_lengths.mean())


def test_meta(stages, tmp_path):
    import hashlib

    _, bpe = stages
    binarise(stages, tmp_path / "bin")
    meta = read_meta(tmp_path / "bin")
    assert meta["vocab_size"] == 400 and meta["dtype"] == "uint16"
    assert meta["langs"] == {"source": "en", "target": "de"}
    assert meta["special_ids"] == {"pad": 0, "unk": 1, "bos": 2, "eos": 3}
    assert meta["spm_model_sha256"] == hashlib.sha256((bpe / "spm.model").read_bytes()).hexdigest()
    assert meta["splits"] == {"train": 4000, "valid": 200, "test": 200}


def test_filter_reasons_by_hand():
    f = bz.Filter(max_len=5, max_len_ratio=1.5)
    reasons = f.reasons(np.array([0, 6, 4, 2, 3, 3]), np.array([3, 1, 1, 3, 3, 5]))
    assert reasons["empty"].tolist() == [True, False, False, False, False, False]
    assert reasons["too_long"].tolist() == [False, True, False, False, False, False]  # 6 > 5
    assert reasons["ratio"].tolist() == [
        False,
        False,
        True,
        False,
        False,
        True,
    ]  # 4/1 and 5/3 > 1.5; 3/2 is not


def test_only_training_pairs_are_filtered(stages, tmp_path):
    raw, bpe = stages
    long_en = " ".join(["dog"] * 100)
    edited = tmp_path / "raw"
    edited.mkdir()
    for f in raw.iterdir():
        text = f.read_text(encoding="utf-8")
        short_de = "Ein kleiner Hund läuft mit einem großen roten Ball durch den grünen Park."
        extra = {"en": f"{long_en}\nA dog.\n", "de": f"{long_en}\n{short_de}\n"}
        (edited / f.name).write_text(text + extra[f.suffix[1:]], encoding="utf-8")
    stats = bz.binarise(edited, bpe, tmp_path / "bin", "en", "de", BinariseParams(max_len=60, max_len_ratio=3.0))
    assert stats["train"]["pairs"] == 4000
    assert stats["train"]["dropped"] == {"empty": 0, "too_long": 1, "ratio": 1}
    assert stats["valid"]["pairs"] == 202 and stats["valid"]["dropped"] == {
        "empty": 0,
        "too_long": 0,
        "ratio": 0,
    }
    valid = ParallelCorpus.load(tmp_path / "bin", "valid", "en", "de")
    assert valid.src_lengths[-2] > 60  # kept: decode and score need every line


@pytest.mark.parametrize("bpe_dropout", [0.0, 0.1], ids=["deterministic", "bpe-dropout"])
def test_workers_do_not_change_the_result(stages, tmp_path, monkeypatch, bpe_dropout):
    # With BPE-dropout the sampled copies too: each chunk's draws are seeded, whichever process encodes it.
    monkeypatch.setattr(bz, "CHUNK", 700)  # several chunks, so order across workers matters
    binarise(stages, tmp_path / "one", workers=1, bpe_dropout=bpe_dropout, sampled_copies=2)
    binarise(stages, tmp_path / "two", workers=2, bpe_dropout=bpe_dropout, sampled_copies=2)
    assert sorted(f.name for f in (tmp_path / "one").iterdir()) == sorted(f.name for f in (tmp_path / "two").iterdir())
    for f in (tmp_path / "one").iterdir():
        assert f.read_bytes() == (tmp_path / "two" / f.name).read_bytes(), f.name


def test_misaligned_raw_names_split_and_counts(stages, tmp_path):
    raw, bpe = stages
    bad = tmp_path / "raw"
    shutil.copytree(raw, bad)
    with open(bad / "test.de", "a", encoding="utf-8") as f:
        f.write("Noch ein Satz.\n")
    with pytest.raises(bz.BinariseError, match=r"split 'test': .*test.en has 200 lines but .*test.de has 201"):
        bz.binarise(bad, bpe, tmp_path / "bin", "en", "de", BinariseParams())


def test_crash_mid_write_keeps_the_previous_output(stages, tmp_path, monkeypatch):
    out = tmp_path / "bin"
    binarise(stages, out, workers=1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []

    def append_then_die(self, tokens, lengths):
        calls.append(self.bin_path.name)
        if len(calls) == 3:  # after train.en and train.de were written, in the middle of valid
            raise OSError("disk full")
        original(self, tokens, lengths)

    original = bz.SideWriter.append
    monkeypatch.setattr(bz.SideWriter, "append", append_then_die)
    with pytest.raises(OSError, match="disk full"):
        binarise(stages, out, workers=1)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["bin"]  # the half-written folder is gone
    monkeypatch.undo()
    # A fresh folder that never completed does not exist at all.
    monkeypatch.setattr(bz.SideWriter, "append", append_then_die)
    calls.clear()
    with pytest.raises(OSError):
        binarise(stages, tmp_path / "fresh", workers=1)
    assert not (tmp_path / "fresh").exists()


def test_cli_writes_metrics(stages, tmp_path, mlflow_tmp_store):
    raw, bpe = stages
    params = tmp_path / "params.yaml"
    params.write_text("binarise:\n  max_len: 64\n  max_len_ratio: 3.0\n  workers: 1\n")
    metrics = tmp_path / "metrics" / "binarise.json"
    bz.main(["--raw", str(raw), "--bpe", str(bpe), "--out", str(tmp_path / "bin"), "--metrics", str(metrics),
             "--params", str(params)])  # fmt: skip
    stats = json.loads(metrics.read_text())
    assert set(stats) == {"train", "valid", "test"} and stats["test"]["pairs"] == 200
    assert set(stats["train"]) == {"pairs", "tokens", "mean_tokens", "unk", "dropped"}


def test_missing_model_is_named(stages, tmp_path):
    raw, _ = stages
    with pytest.raises(bz.BinariseError, match=r"spm.model: not found \(run the learn_bpe stage first\)"):
        bz.binarise(raw, tmp_path, tmp_path / "bin", "en", "de", BinariseParams())


class FillingFile:
    """A file on a disk that fills up: writes to it fail with ENOSPC (what a full disk raises), unnamed."""

    def __init__(self, real):
        self.real = real

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self):
        self.real.close()


def test_a_full_disk_is_named_with_what_to_do_and_leaves_the_old_output(
    stages, tmp_path, monkeypatch, mlflow_tmp_store
):
    raw, bpe = stages
    out = tmp_path / "data" / "bin"
    binarise(stages, out, workers=1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_open = open

    def filling_open(path, mode="r", *args, **kw):  # the disk fills when the valid split is being written
        f = real_open(path, mode, *args, **kw)
        return FillingFile(f) if "valid." in str(path) and "w" in mode else f

    monkeypatch.setattr(corpus_module, "open", filling_open, raising=False)
    with pytest.raises(bz.BinariseError) as e:
        binarise(stages, out, workers=1)
    message = str(e.value)
    assert f"{out / 'valid.en.bin'}: no space left on the device (No space left on device)" in message
    assert (
        "the partial output was removed" in message
        and "Free space on that disk, or point the stage elsewhere" in message
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the complete old output, untouched
    assert sorted(p.name for p in out.parent.iterdir()) == ["bin"]  # no temporary folder left behind
    # Through the CLI: one line, no traceback, and no data/bin where there was none.
    params = tmp_path / "params.yaml"
    params.write_text("binarise:\n  workers: 1\n  max_len_ratio: 3.0\n")
    fresh = tmp_path / "fresh" / "bin"
    with pytest.raises(SystemExit, match=r"^binarise: .*valid.en.bin: no space left on the device"):
        bz.main(["--raw", str(raw), "--bpe", str(bpe), "--out", str(fresh), "--params", str(params),
                 "--metrics", str(tmp_path / "metrics.json")])  # fmt: skip
    assert not fresh.exists() and not (tmp_path / "metrics.json").exists()


def test_a_10000_token_training_line_is_dropped_and_counted(stages, tmp_path):
    raw, bpe = stages
    edited = tmp_path / "raw"
    shutil.copytree(raw, edited)
    for lang, word in (("en", "dog"), ("de", "Hund")):
        with open(edited / f"train.{lang}", "a", encoding="utf-8") as f:
            f.write(" ".join([word] * 10_000) + "\n")
    stats = bz.binarise(edited, bpe, tmp_path / "bin", "en", "de", BinariseParams(max_len_ratio=3.0))  # max_len 250
    assert stats["train"]["pairs"] == 4000 and stats["train"]["dropped"] == {"empty": 0, "too_long": 1, "ratio": 0}


def test_bpe_dropout_copies_are_the_kept_training_pairs_segmented_anew(stages, tmp_path):
    raw, bpe = stages
    edited = tmp_path / "raw"
    shutil.copytree(raw, edited)
    for lang, word in (("en", "dog"), ("de", "Hund")):  # a pair the filter drops: the copies must skip it too
        with open(edited / f"train.{lang}", "a", encoding="utf-8") as f:
            f.write(" ".join([word] * 300) + "\n")
    params = BinariseParams(max_len_ratio=3.0, bpe_dropout=0.1, sampled_copies=3, workers=2)
    stats = bz.binarise(edited, bpe, tmp_path / "bin", "en", "de", params)
    train = ParallelCorpus.load(tmp_path / "bin", "train", "en", "de")
    sampled = ParallelCorpus.load(tmp_path / "bin", "train_sampled", "en", "de")
    n = len(train)
    assert n == 4000 and len(sampled) == 3 * n == stats["train_sampled"]["pairs"]
    meta = read_meta(tmp_path / "bin")
    assert meta["train_copies"] == 3 and meta["splits"]["train_sampled"] == 3 * n
    assert stats["train_sampled"]["copies"] == 3 and stats["train_sampled"]["tokens"]["de"] == sampled.tgt_lengths.sum()
    sp = spm.SentencePieceProcessor(model_file=str(bpe / "spm.model"))
    copies = []
    for k in range(3):
        rows = [sampled[k * n + i] for i in range(n)]
        for i in range(0, n, 7):  # every copy decodes to the deterministic pair's text, in the same order
            for side in (0, 1):
                assert rows[i][side][-1] == EOS_ID and EOS_ID not in rows[i][side][:-1]
                assert sp.decode(rows[i][side][:-1].tolist()) == sp.decode(train[i][side][:-1].tolist())
        changed = np.mean([not np.array_equal(rows[i][0], train[i][0]) for i in range(n)])
        assert changed > 0.3, f"copy {k}: only {changed:.0%} of the source sentences segmented anew"
        copies.append(np.concatenate([r[0] for r in rows]))
    assert not np.array_equal(copies[0], copies[1]) and not np.array_equal(copies[1], copies[2])
    # Dropped merges leave more, shorter pieces: the copies hold more pieces than 3 deterministic encodings.
    assert sampled.src_lengths.sum() > 3 * train.src_lengths.sum()


def test_training_reads_the_sampled_copies_and_tells_the_trainer_how_many(stages, tmp_path):
    from pipeline.common.params import TrainParams
    from pipeline.train import load_data, training_config

    binarise(stages, tmp_path / "bin", bpe_dropout=0.1, sampled_copies=2)
    meta, train, _ = load_data(tmp_path / "bin")
    assert len(train) == 2 * 4000
    assert training_config(TrainParams(), 0.0, meta)["train_copies"] == 2
    binarise(stages, tmp_path / "plain")
    meta, train, _ = load_data(tmp_path / "plain")
    assert len(train) == 4000 and training_config(TrainParams(), 0.0, meta)["train_copies"] == 1
