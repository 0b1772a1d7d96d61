"""Stage `decode`: line-aligned hypotheses in input order; token batching never changes a translation."""

import json
import shutil

import pytest
import torch
from helpers_eval import make_workspace, mlflow_store, write_params

from pipeline import decode as stage
from pipeline.average import average
from pipeline.common.files import read_lines
from pipeline.common.params import AverageParams
from pipeline.common.translator import Translator
from transformer.batching import translation_batches
from transformer.inference import SearchOptions


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    make_workspace(tmp_path, n_test=12)
    average(
        tmp_path / "models" / "checkpoints",
        tmp_path / "data" / "bpe",
        tmp_path / "models" / "average.pt",
        AverageParams(last=3),
        {},
    )
    write_params(tmp_path, mlflow_store())
    # A tiny model: one thread is several times faster than two contending with other jobs.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(threads)


def test_batching_by_tokens_gives_the_same_hypotheses_as_one_by_one(workspace):
    sentences = read_lines(workspace / "data" / "raw" / "test.en")
    options = SearchOptions(beam=3, max_len_b=8, max_tokens=120)
    translator = Translator.from_file(workspace / "models" / "average.pt", options, device="cpu")
    sources = [translator.encode(s) for s in sentences]
    assert len(translation_batches([len(s) for s in sources], 120)) > 1  # several batches, not one
    batched = translator.translate(sentences)
    one_by_one = [translator.translate([s])[0] for s in sentences]
    assert batched == one_by_one
    # And each position holds its own sentence's translation: reversing the input reverses the output.
    assert translator.translate(sentences[::-1]) == batched[::-1]


def test_stage_writes_line_aligned_hypotheses_and_speed(workspace):
    source = workspace / "data" / "raw" / "test.en"
    lines = read_lines(source)
    # An empty line and a Unicode line separator must not shift the alignment.
    lines[3], lines[5] = "", "A dog\u2028runs."
    source.write_text("".join(line + "\n" for line in lines), encoding="utf-8")

    stage.main(["--model", "models/average.pt", "--raw", "data/raw", "--out", "outputs/hyp.txt"])
    hyps = (workspace / "outputs" / "hyp.txt").read_text(encoding="utf-8").split("\n")
    assert hyps[-1] == "" and len(hyps) - 1 == len(lines)
    metrics = json.loads((workspace / "metrics" / "decode.json").read_text())
    assert metrics["sentences"] == len(lines) and metrics["sentences_per_second"] > 0
    assert metrics["device"] == "cpu"


def test_model_file_is_standalone_and_checked(workspace):
    shutil.rmtree(workspace / "data" / "bpe")
    translator = Translator.from_file(workspace / "models" / "average.pt", SearchOptions(beam=1, max_len_b=3))
    assert len(translator.translate(["A man."])) == 1

    blob = torch.load(workspace / "models" / "average.pt", weights_only=True)
    blob["extra"]["bpe"]["model_proto"][100] ^= 1
    torch.save(blob, workspace / "tampered.pt")
    with pytest.raises(ValueError, match="tampered.pt: embedded sentencepiece model does not match"):
        Translator.from_file(workspace / "tampered.pt")


def test_missing_source_is_named(workspace):
    with pytest.raises(FileNotFoundError, match="nope/test.en: file not found"):
        stage.main(["--model", "models/average.pt", "--raw", "nope", "--out", "outputs/hyp.txt"])


def test_device_auto_is_cuda_only_when_torch_sees_a_gpu(monkeypatch):
    from pipeline.common.translator import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device(None) == torch.device("cpu")
    with pytest.raises(ValueError, match="device 'cuda' asked for, but torch sees no CUDA GPU.*decode.device"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda") and resolve_device("cuda:1") == torch.device("cuda:1")


def test_decode_device_param_is_checked_and_reaches_the_translator(workspace, monkeypatch):
    from pipeline.common.params import ParamsError, parse_params

    with pytest.raises(ParamsError, match=r"key 'decode.device'"):
        parse_params({"decode": {"device": "tpu"}})
    seen = []
    original = Translator.from_file

    def spy(path, options=None, device=None, spm_path=None):
        seen.append(device)
        return original(path, options, device="cpu", spm_path=spm_path)

    write_params(workspace, mlflow_store(), decode={"device": "cuda"})
    with monkeypatch.context() as patch:
        patch.setattr(Translator, "from_file", staticmethod(spy))
        stage.main(["--model", "models/average.pt", "--raw", "data/raw", "--out", "outputs/hyp.txt"])
    assert seen == ["cuda"]
    if not torch.cuda.is_available():  # the real path: one clear line, and no hypotheses written
        (workspace / "outputs" / "hyp.txt").unlink()
        with pytest.raises(ValueError, match="torch sees no CUDA GPU"):
            stage.main(["--model", "models/average.pt", "--raw", "data/raw", "--out", "outputs/hyp.txt"])
        assert not (workspace / "outputs" / "hyp.txt").exists()


def test_decode_models_make_an_ensemble_and_two_copies_translate_as_one(workspace):
    """decode.models: the files translated with, their probabilities averaged; two copies of the averaged model
    give its own translations (log((p + p) / 2) = log p, up to rounding that moves no argmax here)."""
    stage.main(["--model", "models/average.pt", "--raw", "data/raw", "--out", "outputs/alone.txt"])
    shutil.copy(workspace / "models" / "average.pt", workspace / "models" / "copy.pt")
    write_params(workspace, mlflow_store(), decode={"models": ["models/average.pt", "models/copy.pt"]})
    stage.main(["--model", "models/average.pt", "--raw", "data/raw", "--out", "outputs/ensemble.txt"])
    assert json.loads((workspace / "metrics" / "decode.json").read_text())["models"] == 2
    alone = (workspace / "outputs" / "alone.txt").read_text(encoding="utf-8")
    assert (workspace / "outputs" / "ensemble.txt").read_text(encoding="utf-8") == alone


def test_the_ctranslate2_engine_decodes_as_the_torch_engine_and_caches_its_conversion(workspace):
    """decode.engine: ctranslate2 converts the averaged model once (a cached step beside it) and, with beam 1 (no
    stop-rule difference: tests/test_ct2.py compares wider beams), writes the torch engine's hypotheses."""
    write_params(workspace, mlflow_store(), decode={"beam": 1})
    stage.main(["--model", "models/average.pt", "--raw", "data/raw", "--out", "outputs/torch.txt"])
    write_params(workspace, mlflow_store(), decode={"beam": 1, "engine": "ctranslate2"})
    stage.main(["--model", "models/average.pt", "--raw", "data/raw", "--out", "outputs/ct2.txt"])
    ct2 = (workspace / "outputs" / "ct2.txt").read_text(encoding="utf-8")
    assert ct2 == (workspace / "outputs" / "torch.txt").read_text(encoding="utf-8")
    assert json.loads((workspace / "metrics" / "decode.json").read_text())["device"].startswith("ctranslate2:cpu")
    [converted] = (workspace / "models" / "ct2").iterdir()
    made = (converted / "model.bin").stat().st_mtime_ns
    stage.main(["--model", "models/average.pt", "--raw", "data/raw", "--out", "outputs/ct2.txt"])
    assert [p.name for p in (workspace / "models" / "ct2").iterdir()] == [converted.name]
    assert (converted / "model.bin").stat().st_mtime_ns == made  # reused, not converted again


def test_engine_params_are_checked_with_their_key(workspace):
    write_params(workspace, mlflow_store(), decode={"engine": "ctranslate2", "compute_type": "float16"})
    with pytest.raises(ValueError, match=r"decode\.compute_type.*float16.*"):
        stage.main(["--model", "models/average.pt", "--raw", "data/raw", "--out", "outputs/hyp.txt"])
    write_params(workspace, mlflow_store(), decode={"compute_type": "int8"})
    with pytest.raises(
        ValueError, match=r"decode\.compute_type 'int8' is CTranslate2's: it needs decode\.engine ctranslate2"
    ):
        stage.main(["--model", "models/average.pt", "--raw", "data/raw", "--out", "outputs/hyp.txt"])
    write_params(workspace, mlflow_store(), decode={"ct2_inter_threads": 2})
    with pytest.raises(ValueError, match=r"decode\.ct2_inter_threads '2' is CTranslate2's"):
        stage.main(["--model", "models/average.pt", "--raw", "data/raw", "--out", "outputs/hyp.txt"])
    shutil.copy(workspace / "models" / "average.pt", workspace / "models" / "copy.pt")
    models = ["models/average.pt", "models/copy.pt"]
    write_params(workspace, mlflow_store(), decode={"engine": "ctranslate2", "models": models})
    with pytest.raises(ValueError, match=r"ensembles need engine torch"):
        stage.main(["--model", "models/average.pt", "--raw", "data/raw", "--out", "outputs/hyp.txt"])
    assert not (workspace / "outputs" / "hyp.txt").exists()
