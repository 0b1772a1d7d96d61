"""End to end: a copy of this repository runs the whole DAG with `dvc exp run -S preset=smoke`, then proves that
DVC caches what it should, MLflow records every stage, and the logged model translates (in Python and served).

The smoke preset is shrunk further (fewer updates) so the test checks the wiring in a few minutes; `make demo`
runs the preset itself.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
from helpers_repo import REPO, STAGES, ran, run

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (REPO / "pipeline" / "train.py").exists(), reason="the train stage is not merged yet"),
]


@pytest.fixture(scope="module")
def pipeline(dag):
    """tests/conftest.py's `dag`: one experiment, the whole DAG, then a `dvc repro`. (More experiments, queued
    beside it, and what DVC and MLflow make of them: test_sweep.)"""
    return dag


@pytest.fixture(scope="module")
def repo(dag):
    return dag["repo"]


@pytest.fixture(scope="module")
def env(dag):
    return dag["env"]


def test_first_experiment_runs_every_stage_and_scores(pipeline):
    assert ran(pipeline["first"]) == list(STAGES)
    score = pipeline["score"]
    assert 0 <= score["bleu"] <= 100 and score["bleu_signature"].startswith("nrefs:1|case:mixed")
    assert 0 <= score["chrf"] <= 100


def test_a_second_repro_does_nothing(pipeline):
    assert ran(pipeline["again"]) == []


def test_mlflow_has_a_parent_per_experiment_with_every_stage(pipeline, repo):
    runs = pipeline["runs"]
    parents = [r for r in runs if r.data.tags.get("kind") == "pipeline"]
    assert len(parents) == 1  # the `dvc repro` that did nothing made no run
    for parent in parents:
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert sorted(c.data.tags["stage"] for c in children) == sorted(STAGES)
        for r in [parent, *children]:
            assert r.data.tags["dvc_experiment"] == parent.info.run_name
            assert len(r.data.tags["git_commit"]) == 40
        for child in children:
            assert child.data.params, f"{child.data.tags['stage']} has no params"
        assert {"bleu", "chrf"} <= set(parent.data.metrics)
        assert parent.info.status == "FINISHED"


def test_mlflow_holds_the_artifacts(pipeline):
    runs = {r.data.tags.get("stage"): r for r in pipeline["runs"] if r.data.tags.get("cached") == "false"}
    client = mlflow.MlflowClient()

    def paths(stage, folder):
        return [a.path for a in client.list_artifacts(runs[stage].info.run_id, folder)]

    assert "bpe/spm.model" in paths("average", "bpe")
    assert "outputs/hyp.txt" in paths("decode", "outputs")
    assert "metrics/score.json" in paths("score", "metrics")


def test_mlflow_shows_attention_and_sample_translations_at_each_validation(pipeline):
    runs = {r.data.tags.get("stage"): r for r in pipeline["runs"] if r.data.tags.get("cached") == "false"}
    client = mlflow.MlflowClient()
    train, average = runs["train"].info.run_id, runs["average"].info.run_id
    # SMALL validates every 20 of 60 updates; the tiny model has 2 layers, 3 sentences are inspected.
    images = [a.path for a in client.list_artifacts(train, "images")]
    for update in (20, 40, 60):
        for sentence in (1, 2, 3):
            for layer in (1, 2):
                key = f"images/attention~sentence_{sentence}~layer_{layer}+step+{update}+"
                assert sum(p.startswith(key) and p.endswith(".png") for p in images) == 1, key
    table = json.loads(Path(client.download_artifacts(train, "samples.json")).read_text())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert [(r["update"], r["sentence"]) for r in rows] == [(u, s) for u in (20, 40, 60) for s in (1, 2, 3)]
    assert all(r["source"] and r["reference"] for r in rows)
    # The averaged model, at the step of its last checkpoint.
    assert any("+step+60+" in a.path for a in client.list_artifacts(average, "images"))
    assert "samples.json" in [a.path for a in client.list_artifacts(average)]


def test_the_logged_pyfunc_model_translates(pipeline):
    parent = max(
        (r for r in pipeline["runs"] if r.data.tags.get("kind") == "pipeline"), key=lambda r: r.info.start_time
    )
    model = mlflow.pyfunc.load_model(parent.data.tags["translator_uri"])
    out = model.predict(["A man is walking.", "Two dogs."])
    assert len(out) == 2 and all(isinstance(s, str) for s in out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_models_serve_answers_on_localhost(pipeline, repo, env):
    parent = max(
        (r for r in pipeline["runs"] if r.data.tags.get("kind") == "pipeline"), key=lambda r: r.info.start_time
    )
    port = free_port()
    cmd = ["mlflow", "models", "serve", "-m", parent.data.tags["translator_uri"], "--env-manager", "local"]
    cmd += ["-h", "127.0.0.1", "-p", str(port)]
    server_env = env | {"MLFLOW_TRACKING_URI": f"sqlite:///{repo}/mlflow.db"}
    server = subprocess.Popen(
        cmd, cwd=repo, env=server_env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )  # noqa: E501
    try:
        body = json.dumps({"inputs": ["A man is walking."]}).encode()
        for _ in range(120):
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"}
                )  # noqa: E501
                with urllib.request.urlopen(request, timeout=30) as response:
                    answer = json.loads(response.read())
                break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()[-3000:]
                time.sleep(1)
        else:
            pytest.fail("the model server did not answer within 120 s")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    assert len(answer["predictions"]) == 1 and isinstance(answer["predictions"][0], str)


def test_metrics_plots_and_summary(pipeline, repo, env):
    assert "bleu" in run(repo, env, "dvc", "metrics", "show")
    plots = json.loads(run(repo, env, "dvc", "plots", "show", "--json"))
    shown = json.dumps(plots)
    for name, y in (("plots/train.csv", "loss"), ("plots/valid.csv", "valid_loss"), ("plots/bleu_curve.csv", "bleu")):
        assert name in shown and f'"{y}"' in shown
    summary = run(repo, env, sys.executable, "-m", "pipeline.commands.summary")
    assert f"BLEU  {pipeline['score']['bleu']:.2f}   sacreBLEU nrefs:1" in summary
    assert (
        f"mlflow ui --backend-store-uri sqlite:///{repo}/mlflow.db --host 127.0.0.1 --port 5000 --workers 1" in summary
    )
    assert "Model training" in summary


def test_the_smoke_curve_scores_each_kept_checkpoint_at_its_minute(pipeline, repo):
    # No snapshots in the smoke preset: the curve uses the 3 kept checkpoints (updates 20, 40, 60).
    assert json.loads((repo / "models" / "snapshots" / "index.json").read_text()) == []
    rows = (repo / "plots" / "bleu_curve.csv").read_text().splitlines()
    assert rows[0] == "minutes,elapsed_minutes,update,tokens,bleu,chrf,source"
    points = [r.split(",") for r in rows[1:]]
    assert [int(p[2]) for p in points] == [20, 40, 60] and {p[6] for p in points} == {"checkpoint"}
    minutes = [float(p[0]) for p in points]
    assert minutes == sorted(minutes) and all(0 < m < 10 for m in minutes)
    assert (repo / "plots" / "bleu_curve.png").read_bytes()[:4] == b"\x89PNG"


# One module per kind of reach: every stage, the model's stages, training only, beam search only, scoring only,
# data and training. The stages DVC must name come from the import closure (tests/stage_closure.py), which
# test_stage_deps.py holds dvc.yaml to; here DVC itself confirms it.
CHANGED_MODULES = (
    "pipeline/common/params.py",
    "transformer/dropout.py",
    "transformer/progress.py",
    "transformer/beam_search.py",
    "pipeline/common/metrics.py",
    "transformer/corpus.py",
)


def stages_dvc_calls_changed(repo: Path, env: dict) -> set[str]:
    status = json.loads(run(repo, env, "dvc", "status", "--json"))
    return {name.split(":")[-1] for name in status}


def test_a_change_to_a_module_makes_dvc_rerun_exactly_the_stages_that_import_it(pipeline, repo, env):
    from stage_closure import closure, stage_commands

    assert stages_dvc_calls_changed(repo, env) == set()
    commands = stage_commands()
    for module in CHANGED_MODULES:
        path = repo / module
        original = path.read_bytes()
        try:
            path.write_bytes(original + b"\n# a change\n")
            expected = {s for s, m in commands.items() if REPO / module in closure(m)}
            assert stages_dvc_calls_changed(repo, env) == expected, module
        finally:
            path.write_bytes(original)
    assert stages_dvc_calls_changed(repo, env) == set()
    # The reaches the issue asked for, spelled out: training never reruns for beam search.
    train = closure(commands["train"])
    assert REPO / "transformer/dropout.py" in train and REPO / "transformer/beam_search.py" not in train
