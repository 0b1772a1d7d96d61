"""MLflow layout: one parent run per pipeline execution, a child per stage, cached stages still shown."""

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from helpers_eval import mlflow_store, write_params

from pipeline.common import tracking
from pipeline.common.params import load_params

STAGES = ("download", "learn_bpe", "train")


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A DAG of three stages, each writing one file; dvc.lock is kept by `run_stage` as DVC would."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    dag = {"stages": {s: {"cmd": f"run {s}", "outs": [f"{s}.out"]} for s in STAGES}}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(dag, sort_keys=False))
    write_params(tmp_path, mlflow_store())
    return tmp_path


def write_lock_entry(stage, content):
    """What DVC writes to dvc.lock once a stage has finished (or what `dvc checkout` brings back)."""
    with open(f"{stage}.out", "w") as f:
        f.write(content)
    lock = {"stages": {}}
    if os.path.exists("dvc.lock"):
        with open("dvc.lock") as f:
            lock = yaml.safe_load(f)
    md5 = hashlib.md5(content.encode()).hexdigest()
    lock["stages"][stage] = {
        "cmd": f"run {stage}",
        "params": {"params.yaml": {"data.source_lang": "en", "bpe": {"vocab_size": 1000}}},
        "outs": [{"path": f"{stage}.out", "hash": "md5", "md5": md5}],
    }
    with open("dvc.lock", "w") as f:
        yaml.safe_dump(lock, f)


def run_stage(stage, content, execution, monkeypatch, metric=1.0):
    """What a stage does under `dvc repro` number `execution`: its run, its output, then DVC's lock entry."""
    monkeypatch.setattr(tracking, "pipeline_key", lambda: f"test:{execution}")
    params = load_params()
    with tracking.stage_run(stage, params, ("data", "bpe")) as run:
        tracking.log_stage_metrics({"loss": metric, "nested": {"value": 2}, "note": "text is skipped"})
        with open(f"{stage}.out", "w") as f:
            f.write(content)
    write_lock_entry(stage, content)
    return run.info.run_id


def runs_of(workspace):
    return mlflow.search_runs(experiment_names=[f"eval-{workspace.name}"], output_format="list")


def test_one_parent_per_execution_with_a_child_per_stage_and_tags(workspace, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "brisk-lark")
    ids = [run_stage(s, s, 1, monkeypatch) for s in STAGES]
    runs = runs_of(workspace)
    (parent,) = [r for r in runs if r.data.tags["kind"] == "pipeline"]
    children = {r.data.tags["stage"]: r for r in runs if r.data.tags["kind"] == "stage"}
    assert set(children) == set(STAGES) and [children[s].info.run_id for s in STAGES] == ids
    for run in [parent, *children.values()]:
        assert run.data.tags["dvc_experiment"] == "brisk-lark"
        assert len(run.data.tags["git_commit"]) in (40, 7) or run.data.tags["git_commit"] == "unknown"
        assert run.data.tags["preset"] == "smoke"
    assert parent.info.run_name == "brisk-lark"
    # All params on the parent, for MLflow's compare view of a sweep's parents (docs/sweeps.md).
    assert parent.data.params["preset"] == "smoke" and parent.data.params["bpe.vocab_size"] == "37000"
    assert parent.data.params["model.dropout"] == "None" and parent.data.params["train.lr_factor"] == "1.0"
    for child in children.values():
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["cached"] == "false"
        assert child.data.params["bpe.vocab_size"] == "37000"
        assert child.data.params["data.splits.train"] == "train"  # nested sections are flattened
        assert child.data.metrics == {"loss": 1.0, "nested.value": 2.0}


def test_stages_dvc_skipped_appear_under_the_new_parent_linked_to_their_origin(workspace, monkeypatch):
    first = {s: run_stage(s, s, 1, monkeypatch, metric=i) for i, s in enumerate(STAGES)}
    # Second execution: only `train` reruns (say its params changed); DVC skips download and learn_bpe.
    run_stage("train", "train v2", 2, monkeypatch)

    runs = runs_of(workspace)
    parents = [r for r in runs if r.data.tags["kind"] == "pipeline"]
    assert len(parents) == 2
    second = next(p for p in parents if p.data.tags["pipeline_key"] == "test:2")
    children = {r.data.tags["stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == second.info.run_id}
    assert set(children) == set(STAGES)
    assert children["train"].data.tags["cached"] == "false"
    for i, stage in enumerate(STAGES[:2]):
        linked = children[stage]
        assert linked.data.tags["cached"] == "true"
        assert linked.data.tags["linked_run_id"] == first[stage]
        assert linked.data.metrics["loss"] == i
        # Params as dvc.lock recorded them for these outputs, over those the origin run logged.
        assert linked.data.params["data.source_lang"] == "en" and linked.data.params["bpe.vocab_size"] == "1000"
        assert linked.data.params["data.target_lang"] == "de"
        assert linked.data.tags["git_commit"] == second.data.tags["git_commit"]
        assert first[stage] in linked.data.tags["mlflow.note.content"]
        assert linked.info.status == "FINISHED"


def test_cached_stage_links_the_run_of_its_current_outputs_not_the_latest_run(workspace, monkeypatch):
    first = run_stage("download", "a", 1, monkeypatch)
    run_stage("download", "b", 2, monkeypatch)
    # `dvc checkout` / `dvc exp apply` of the first experiment brings back its outputs and lock.
    write_lock_entry("download", "a")
    run_stage("learn_bpe", "bpe", 4, monkeypatch)
    runs = runs_of(workspace)
    fourth = next(r for r in runs if r.data.tags.get("pipeline_key") == "test:4")
    children = {r.data.tags["stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == fourth.info.run_id}
    assert children["download"].data.tags["linked_run_id"] == first


def test_a_stage_that_does_not_log_still_appears_with_its_locked_params(workspace, monkeypatch):
    write_lock_entry("download", "made without MLflow")
    run_stage("learn_bpe", "bpe", 1, monkeypatch)
    runs = runs_of(workspace)
    (linked,) = [r for r in runs if r.data.tags.get("stage") == "download"]
    assert linked.data.tags["cached"] == "true" and "linked_run_id" not in linked.data.tags
    assert linked.data.params == {"data.source_lang": "en", "bpe.vocab_size": "1000"}


def test_a_failing_stage_fails_its_run_and_the_parent(workspace, monkeypatch):
    monkeypatch.setattr(tracking, "pipeline_key", lambda: "test:fail")
    with pytest.raises(RuntimeError, match="boom"), tracking.stage_run("download", load_params(), ()):
        raise RuntimeError("boom")
    runs = runs_of(workspace)
    assert {r.data.tags["kind"]: r.info.status for r in runs} == {"pipeline": "FAILED", "stage": "FAILED"}


def test_pipeline_key_outside_dvc_is_commit_and_params(workspace, monkeypatch):
    monkeypatch.delenv("DVC_STAGE", raising=False)
    key = tracking.pipeline_key()
    assert key.startswith("manual:")
    (workspace / "params.yaml").write_text((workspace / "params.yaml").read_text() + "\n# changed\n")
    assert tracking.pipeline_key() != key


def test_artifacts_of_a_local_store_go_beside_it(tmp_path):
    assert (
        tracking.local_artifact_location(f"sqlite:///{tmp_path}/db/mlflow.db") == (tmp_path / "db" / "mlruns").as_uri()
    )
    assert tracking.local_artifact_location("http://127.0.0.1:5000") is None


# A stage process, as DVC starts it: imports, then (once told to go) opens its run in a store no one has used yet.
STAGE_PROCESS = """
import os, sys, time
from pathlib import Path
from pipeline.common import tracking
from pipeline.common.params import load_params
tracking.pipeline_key = lambda: "test:" + sys.argv[1]
params = load_params()
Path(sys.argv[1] + ".ready").touch()
while not Path("go").exists():
    time.sleep(0.005)
with tracking.stage_run("download", params, ("data",)):
    tracking.log_stage_metrics({"pairs": 1})
"""


def test_stages_of_experiments_run_at_once_share_a_new_store(workspace, tmp_path):
    """`dvc queue start -j 2` on a fresh clone: the first stages of both experiments create mlflow.db together.
    Without the lock one of them fails in MLflow's schema migration ("table experiments already exists")."""
    uri = f"sqlite:///{tmp_path}/fresh/mlflow.db"
    write_params(workspace, uri)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    procs = []
    for i in range(2):
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", STAGE_PROCESS, str(i)],
                cwd=workspace,
                env=env | {"DVC_EXP_NAME": f"exp-{i}"},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    deadline = time.time() + 120
    while not all((workspace / f"{i}.ready").exists() for i in range(2)) and time.time() < deadline:
        assert all(p.poll() is None for p in procs), [p.communicate()[0][-2000:] for p in procs if p.poll()]
        time.sleep(0.05)
    (workspace / "go").touch()
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=[f"eval-{workspace.name}"], output_format="list")
    assert sorted(r.info.run_name for r in runs if r.data.tags["kind"] == "pipeline") == ["exp-0", "exp-1"]
    assert len([r for r in runs if r.data.tags["kind"] == "stage"]) == 2
