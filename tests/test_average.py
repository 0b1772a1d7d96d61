"""Stage `average`: the mean of the last N checkpoints by update number, as a standalone model file."""

import hashlib
import logging
import os
from dataclasses import asdict

import mlflow
import pytest
import torch
from helpers_eval import make_workspace, mlflow_store, tiny_model, write_checkpoint, write_params

from pipeline import average as stage
from pipeline.common.engines import make_translator
from pipeline.common.layout import find_checkpoints
from pipeline.common.params import AverageParams, ParamsError, parse_params
from pipeline.common.pyfunc import PAPER_SEARCH
from transformer.checkpoint import load_model, save_atomic
from transformer.inference import SearchOptions


def constant_checkpoints(folder, values_by_update, elapsed_s=None):
    """Checkpoints whose every floating-point parameter is the constant given for its update; `elapsed_s`, one
    per update, is each one's reading of its stage clock."""
    model = tiny_model()
    for i, (update, value) in enumerate(values_by_update.items()):
        state = {k: torch.full_like(v, value) if v.is_floating_point() else v for k, v in model.state_dict().items()}
        write_checkpoint(folder, update, state, model.cfg.to_dict(), None if elapsed_s is None else elapsed_s[i])
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


def test_stage_averages_three_constant_checkpoints_to_their_mean(workspace, monkeypatch):
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

    # The engine is a load-time choice; per-request settings reach CTranslate2's search too; the conversion goes
    # to a temporary folder, not into the logged model.
    ct2 = mlflow.pyfunc.load_model(
        run.data.tags["translator_uri"], model_config={"engine": "ctranslate2", "compute_type": "float32"}
    )
    assert ct2.unwrap_python_model().translator.device == "ctranslate2:cpu (float32)"
    sentences = ["A man is walking.", "Two dogs play."]
    for params in ({"beam": 2, "max_len_b": 5}, {"beam": 1, "max_len_b": 3}):
        options = SearchOptions(**{**asdict(PAPER_SEARCH), **params})
        direct = make_translator(["models/average.pt"], options, device="cpu", engine="ctranslate2",
                                 compute_type="float32", ct2_folder=workspace / "direct-ct2")  # fmt: skip
        assert ct2.predict(sentences, params=params) == direct.translate(sentences)
    assert not list(workspace.rglob("ct2"))  # only direct-ct2, the direct translator's
    # `mlflow models serve` passes no model_config: MLflow takes the same keys from MLFLOW_PYFUNC_INFERENCE_CONFIG.
    monkeypatch.setenv("MLFLOW_PYFUNC_INFERENCE_CONFIG", '{"engine": "ctranslate2", "compute_type": "float32"}')
    served = mlflow.pyfunc.load_model(run.data.tags["translator_uri"])
    assert served.unwrap_python_model().translator.device == "ctranslate2:cpu (float32)"


def test_last_is_by_update_number_not_mtime(tmp_path):
    folder = tmp_path / "ckpt"
    constant_checkpoints(folder, {100: 1.0, 200: 2.0, 300: 3.0, 400: 4.0})
    # The oldest update gets the newest mtime (as a copy could do): it must still be left out.
    os.utime(folder / "checkpoint_00000100.pt", (4e9, 4e9))
    (folder / "notes.txt").write_text("not a checkpoint")
    chosen = stage.select_last(find_checkpoints(folder), 3)
    assert [u for u, _ in chosen] == [200, 300, 400]


def test_update_numbers_sort_numerically_beyond_the_padding(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name in ("checkpoint_99999999.pt", "checkpoint_100000000.pt", "checkpoint_00000005.pt"):
        (folder / name).write_bytes(b"")
    assert [u for u, _ in find_checkpoints(folder)] == [5, 99999999, 100000000]


def test_fewer_checkpoints_than_requested_uses_all_and_says_so(tmp_path, caplog):
    make_workspace(tmp_path, updates=())
    constant_checkpoints(tmp_path / "ckpt", {10: 1.0, 20: 5.0})
    with caplog.at_level(logging.WARNING, logger="pipeline.average"):
        summary = stage.average(
            tmp_path / "ckpt", tmp_path / "data" / "bpe", tmp_path / "avg.pt", AverageParams(last=5), {}
        )
    assert summary["updates"] == [10, 20]
    assert "only 2 checkpoints" in caplog.text
    model, extra = load_model(tmp_path / "avg.pt")
    assert all(torch.equal(v, torch.full_like(v, 3.0)) for v in floats(model.state_dict()))
    assert extra["checkpoints"] == ["checkpoint_00000010.pt", "checkpoint_00000020.pt"]


def test_clear_errors_for_missing_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint folder not found"):
        find_checkpoints(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint_<update>.pt"):
        find_checkpoints(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="spm.model: sentencepiece model not found"):
        stage.bpe_reference(tmp_path)


# Checkpoints every 2 minutes of a 10-minute stage, update k*100 holding the constant k.
EVERY_2_MINUTES = {100: 1.0, 200: 2.0, 300: 3.0, 400: 4.0, 500: 5.0}
ELAPSED = [120.0, 240.0, 360.0, 480.0, 600.0]


def chosen_updates(folder, **rule):
    return [u for u, _ in stage.select(find_checkpoints(folder), AverageParams(**rule))]


def test_last_minutes_and_last_share_choose_by_training_time(tmp_path):
    constant_checkpoints(tmp_path, EVERY_2_MINUTES, ELAPSED)
    assert chosen_updates(tmp_path, last=None, last_minutes=4.0) == [300, 400, 500]  # minutes 6, 8, 10
    assert chosen_updates(tmp_path, last=None, last_minutes=3.9) == [400, 500]
    assert chosen_updates(tmp_path, last=None, last_share=0.5) == [300, 400, 500]  # the last 5 of 10 minutes
    assert chosen_updates(tmp_path, last=None, last_share=1.0) == [100, 200, 300, 400, 500]
    assert chosen_updates(tmp_path, last=2, last_minutes=4.0) == [400, 500]  # `last` caps the window
    assert chosen_updates(tmp_path, last=2) == [400, 500]  # the paper's rule is unchanged


def test_a_window_spans_a_resumed_stage_whose_clock_started_again(tmp_path):
    # Checkpoints from before the clock was carried over a resume (they are still read): the stage died after
    # update 300 (minute 6) and a new stage resumed from it: its clock reads 100 s and
    # 220 s at updates 400 and 500, i.e. training minutes 6 + 1.67 and 6 + 3.67.
    constant_checkpoints(tmp_path, EVERY_2_MINUTES, [120.0, 240.0, 360.0, 100.0, 220.0])
    minutes = stage.training_minutes(find_checkpoints(tmp_path))
    assert minutes == pytest.approx([2.0, 4.0, 6.0, 6.0 + 100 / 60, 6.0 + 220 / 60])
    assert chosen_updates(tmp_path, last=None, last_minutes=4.0) == [300, 400, 500]  # from minute 5.67


def test_the_stage_averages_the_window(workspace):
    constant_checkpoints(workspace / "models" / "checkpoints", EVERY_2_MINUTES, ELAPSED)
    summary = stage.average(
        workspace / "models" / "checkpoints", workspace / "data" / "bpe", workspace / "avg.pt",
        AverageParams(last=None, last_minutes=4.0), {},
    )  # fmt: skip
    assert summary["updates"] == [300, 400, 500]
    model, _ = load_model(workspace / "avg.pt")
    assert all(torch.equal(v, torch.full_like(v, 4.0)) for v in floats(model.state_dict()))  # (3 + 4 + 5) / 3


def test_a_window_over_checkpoints_without_a_clock_says_what_to_do(tmp_path):
    constant_checkpoints(tmp_path, {100: 1.0, 200: 2.0})
    with pytest.raises(ValueError, match=r"checkpoint_00000100.pt: no 'elapsed_s'.*average.last"):
        chosen_updates(tmp_path, last=None, last_share=0.3)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"last_minutes": 5.0, "last_share": 0.3}, "not both"),
        ({"last": None}, "set last, last_minutes or last_share"),
        ({"last_share": 1.5}, "last_share"),
        ({"last_minutes": 0}, "last_minutes"),
    ],
)
def test_bad_average_rules_name_the_section(section, message):
    with pytest.raises(ParamsError, match=rf"average.*{message}|{message}.*average"):
        parse_params({"average": section})


def test_average_ema_takes_the_checkpoints_moving_averages_instead_of_their_weights(tmp_path):
    # Weights k and moving averages 10k at update 100k: average.ema averages the latter, last 2 -> (20 + 30) / 2.
    make_workspace(tmp_path, updates=())
    model = tiny_model()
    folder = tmp_path / "ckpt"
    for update, value in ((100, 1.0), (200, 2.0), (300, 3.0)):
        state = {k: torch.full_like(v, value) for k, v in model.state_dict().items()}
        ema = {k: torch.full_like(v, 10 * value) for k, v in model.state_dict().items()}
        blob = {"model": state, "ema": ema, "config": model.cfg.to_dict(), "update": update}
        save_atomic(blob, folder / f"checkpoint_{update:08d}.pt")
    bpe = tmp_path / "data" / "bpe"
    summary = stage.average(folder, bpe, tmp_path / "ema.pt", AverageParams(last=2, ema=True), {})
    assert summary["updates"] == [200, 300] and summary["ema"] is True
    averaged, _ = load_model(tmp_path / "ema.pt")
    assert all(torch.equal(v, torch.full_like(v, 25.0)) for v in floats(averaged.state_dict()))
    stage.average(folder, bpe, tmp_path / "plain.pt", AverageParams(last=2), {})
    plain, _ = load_model(tmp_path / "plain.pt")
    assert all(torch.equal(v, torch.full_like(v, 2.5)) for v in floats(plain.state_dict()))
    # Checkpoints of a run without train.ema_decay: the error says what to set.
    write_checkpoint(folder, 400, model.state_dict(), model.cfg.to_dict())
    with pytest.raises(ValueError, match=r"checkpoint_00000400.pt: no 'ema' entry.*train.ema_decay"):
        stage.average(folder, bpe, tmp_path / "x.pt", AverageParams(last=2, ema=True), {})
