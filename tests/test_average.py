"""Stage `average`: the mean of the last N checkpoints by update number, as a standalone model file."""

import hashlib
import logging
import os

import mlflow
import pytest
import torch
from helpers_eval import make_workspace, mlflow_store, tiny_model, write_checkpoint, write_params

from pipeline import average as stage
from transformer.checkpoint import load_model


def constant_checkpoints(folder, values_by_update):
    """Checkpoints whose every floating-point parameter is the constant given for its update."""
    model = tiny_model()
    for update, value in values_by_update.items():
        state = {k: torch.full_like(v, value) if v.is_floating_point() else v for k, v in model.state_dict().items()}
        write_checkpoint(folder, update, state, model.cfg.to_dict())
    return model


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    make_workspace(tmp_path, updates=())
    write_params(tmp_path, mlflow_store())
    return tmp_path


def floats(state):
    return [v for v in state.values() if v.is_floating_point()]


def test_stage_averages_three_constant_checkpoints_to_their_mean(workspace):
    # 1, 2, 3 -> 2 in every parameter; and the file is standalone: weights, config and the BPE model.
    model = constant_checkpoints(workspace / "models" / "checkpoints", {100: 1.0, 200: 2.0, 300: 3.0})
    stage.main(["--checkpoints", "models/checkpoints", "--bpe", "data/bpe", "--out", "models/average.pt"])

    blob = torch.load("models/average.pt", weights_only=True)
    assert all(torch.equal(v, torch.full_like(v, 2.0)) for v in floats(blob["model"]))
    assert blob["config"] == model.cfg.to_dict()
    spm_bytes = (workspace / "data" / "bpe" / "spm.model").read_bytes()
    bpe = blob["extra"]["bpe"]
    assert bpe["path"] == os.path.join("data", "bpe", "spm.model")
    assert bpe["sha256"] == hashlib.sha256(spm_bytes).hexdigest()
    assert bpe["model_proto"].numpy().tobytes() == spm_bytes
    assert blob["extra"]["updates"] == [100, 200, 300]

    # The MLflow child run holds the params, the BPE model and a pyfunc model that translates.
    run = mlflow.search_runs(
        experiment_names=[f"eval-{workspace.name}"], filter_string="tags.stage = 'average'", output_format="list"
    )[0]
    assert run.data.params["average.last"] == "3"
    assert run.data.metrics["checkpoints_averaged"] == 3
    client = mlflow.MlflowClient()
    assert [a.path for a in client.list_artifacts(run.info.run_id, "bpe")] == ["bpe/spm.model"]
    translator = mlflow.pyfunc.load_model(run.data.tags["translator_uri"])
    out = translator.predict(["A man is walking.", "Two dogs play."], params={"beam": 2, "max_len_b": 5})
    assert len(out) == 2 and all(isinstance(s, str) for s in out)


def test_last_is_by_update_number_not_mtime(tmp_path):
    folder = tmp_path / "ckpt"
    constant_checkpoints(folder, {100: 1.0, 200: 2.0, 300: 3.0, 400: 4.0})
    # The oldest update gets the newest mtime (as a copy could do): it must still be left out.
    os.utime(folder / "checkpoint_00000100.pt", (4e9, 4e9))
    (folder / "notes.txt").write_text("not a checkpoint")
    chosen = stage.select_last(stage.find_checkpoints(folder), 3)
    assert [u for u, _ in chosen] == [200, 300, 400]


def test_update_numbers_sort_numerically_beyond_the_padding(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name in ("checkpoint_99999999.pt", "checkpoint_100000000.pt", "checkpoint_00000005.pt"):
        (folder / name).write_bytes(b"")
    assert [u for u, _ in stage.find_checkpoints(folder)] == [5, 99999999, 100000000]


def test_fewer_checkpoints_than_requested_uses_all_and_says_so(tmp_path, caplog):
    make_workspace(tmp_path, updates=())
    constant_checkpoints(tmp_path / "ckpt", {10: 1.0, 20: 5.0})
    with caplog.at_level(logging.WARNING, logger="pipeline.average"):
        summary = stage.average(tmp_path / "ckpt", tmp_path / "data" / "bpe", tmp_path / "avg.pt", 5, {})
    assert summary["updates"] == [10, 20]
    assert "only 2 checkpoints" in caplog.text
    model, extra = load_model(tmp_path / "avg.pt")
    assert all(torch.equal(v, torch.full_like(v, 3.0)) for v in floats(model.state_dict()))
    assert extra["checkpoints"] == ["checkpoint_00000010.pt", "checkpoint_00000020.pt"]


def test_clear_errors_for_missing_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint folder not found"):
        stage.find_checkpoints(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint_<update>.pt"):
        stage.find_checkpoints(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="spm.model: sentencepiece model not found"):
        stage.bpe_reference(tmp_path)
