"""learn_bpe: a joint model with our fixed special ids, seeded, quiet, and a clear message when too big."""

import subprocess
import sys

import pytest
import sentencepiece as spm
from conftest import REPO
from test_binarise import make_raw

from pipeline.common.params import BpeParams
from pipeline.learn_bpe import BpeError, learn_bpe, main


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return make_raw(tmp_path_factory.mktemp("raw"))


def test_joint_model_with_fixed_special_ids(raw, tmp_path, capfd):
    sample = learn_bpe(raw, tmp_path / "bpe", "en", "de", BpeParams(vocab_size=500))
    assert (sample.total, sample.size, sample.too_long) == (8000, 8000, 0)  # 4,000 pairs, both sides, all used
    model = tmp_path / "bpe" / "spm.model"
    assert sorted(p.name for p in (tmp_path / "bpe").iterdir()) == ["spm.model", "spm.vocab"]
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert sp.get_piece_size() == 500
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2, 3)
    # Joint: words of both languages are whole pieces, neither falls back to unk.
    for sentence in ("A dog is running in the park.", "Ein Hund läuft im Park."):
        ids = sp.encode(sentence)
        assert 1 not in ids and sp.decode(ids) == sentence
    assert "trainer_interface" not in capfd.readouterr().err  # sentencepiece's log is silenced


def pieces(model):
    sp = spm.SentencePieceProcessor(model_file=str(model))
    return [sp.id_to_piece(i) for i in range(sp.get_piece_size())]


def run_cli(raw, out, seed):
    # One process per run, as DVC runs the stage: sentencepiece seeds its generator once per process.
    params = out.parent / f"{out.name}.yaml"
    params.write_text(f"bpe:\n  vocab_size: 300\n  input_sentence_size: 500\n  seed: {seed}\n")
    cmd = [
        sys.executable,
        "-m",
        "pipeline.learn_bpe",
        "--raw",
        str(raw),
        "--out",
        str(out),
        "--params",
        str(params),
    ]
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True)
    return pieces(out / "spm.model")


def test_same_seed_same_model(raw, tmp_path, mlflow_tmp_store):
    # Sampling 500 of the 8,000 sentences makes the seed matter.
    a, b, c = (run_cli(raw, tmp_path / name, seed) for name, seed in (("a", 7), ("b", 7), ("c", 8)))
    assert a == b and a != c
    # Byte for byte, although each was written in its own temporary folder: DVC hashes the file.
    assert (tmp_path / "a" / "spm.model").read_bytes() == (tmp_path / "b" / "spm.model").read_bytes()


def test_vocabulary_too_large_names_the_key_and_keeps_the_old_model(raw, tmp_path):
    out = tmp_path / "bpe"
    learn_bpe(raw, out, "en", "de", BpeParams(vocab_size=300))
    before = (out / "spm.model").read_bytes()
    with pytest.raises(BpeError, match=r"bpe.vocab_size 60000 in params.yaml .* Set bpe.vocab_size <= (\d+)") as e:
        learn_bpe(raw, out, "en", "de", BpeParams(vocab_size=60000))
    limit = int(e.value.args[0].split("<= ")[1].split()[0])
    assert 300 < limit < 60000
    assert (out / "spm.model").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bpe"]  # no temporary left behind


def test_cli_reports_missing_input(tmp_path, monkeypatch, mlflow_tmp_store):
    params = tmp_path / "params.yaml"
    params.write_text("bpe:\n  vocab_size: 300\n")
    with pytest.raises(SystemExit, match=r"train.en: not found \(run the download stage first\)"):
        main(["--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "bpe"), "--params", str(params)])


def test_lines_too_long_for_sentencepiece_are_left_out_and_counted(raw, tmp_path, mlflow_tmp_store, capsys):
    # A 10,000-token training line (50 KB) is past sentencepiece's 4,192-byte max_sentence_length, which it would
    # skip silently at our log level: learn_bpe leaves it out itself and says so. download keeps it, binarise
    # drops it by binarise.max_len and counts it (tests of those stages).
    edited = tmp_path / "raw"
    edited.mkdir()
    for f in raw.iterdir():
        (edited / f.name).write_bytes(f.read_bytes())
    for lang in ("en", "de"):
        with open(edited / f"train.{lang}", "a", encoding="utf-8") as f:
            f.write(" ".join(["wort"] * 10_000) + "\n")
    sample = learn_bpe(edited, tmp_path / "bpe", "en", "de", BpeParams(vocab_size=300))
    assert (sample.total, sample.size, sample.too_long) == (8002, 8002, 2)
    params = tmp_path / "params.yaml"
    params.write_text("bpe:\n  vocab_size: 300\n")
    main(["--raw", str(edited), "--out", str(tmp_path / "bpe2"), "--params", str(params)])
    out = capsys.readouterr().out
    assert "learned from 8,000 of 8,002 training lines" in out and "2 sampled lines longer than 4,192 bytes" in out
    assert (tmp_path / "bpe" / "spm.model").read_bytes() == (tmp_path / "bpe2" / "spm.model").read_bytes()
