"""Sweeps in DVC's queue (docs/sweeps.md): in a copy of this repository, two `smoke` experiments that differ in one
key are queued with `dvc exp run --queue`, run by `dvc queue start`, and each is found with its scores in
`dvc exp show --json` and as one MLflow parent run, named by the experiment, in the repository's mlflow.db.

The key is `decode.split`: only decode and score depend on it, so the second experiment restores the other
stages from DVC's run-cache (which the queue's temporary workspaces share) and MLflow links them to the first
experiment's runs. (A beam change may leave an undertrained model's hypotheses byte-identical, and DVC then
restores `score` too, leaving no score run; a change of split changes them for sure.)
"""

import json
import time

import mlflow
import pytest
from helpers_repo import REPO, STAGES, copy_repository, dvc_env, ran, run

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (REPO / "pipeline" / "train.py").exists(), reason="the train stage is not merged yet"),
]

# decode.split of each experiment. The smoke preset shrunk further than test_e2e's SMALL: 40 updates, the last 2 of
# the checkpoints (updates 20 and 40) averaged; lr_factor 0.5 learns enough in them for a chrF above 0.
POINTS = {"sweep-test": "test", "sweep-valid": "valid"}
SWEEP = ["-S", "preset=smoke", "-S", "train.max_updates=40", "-S", "train.checkpoint_every_updates=20"]
SWEEP += ["-S", "train.validate_every_updates=20", "-S", "train.warmup=20", "-S", "train.lr_factor=0.5"]
SWEEP += ["-S", "average.last=2"]


def wait_for_queue(repo, env, timeout=480) -> str:
    """Poll `dvc queue status` until nothing is queued or running; its last output."""
    deadline = time.time() + timeout
    while True:
        status = run(repo, env, "dvc", "queue", "status")
        if not any(line.split()[-1:] in (["Queued"], ["Running"]) for line in status.splitlines()):
            return status
        assert time.time() < deadline, f"the queue did not finish in {timeout} s:\n{status}"
        time.sleep(5)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    repo = tmp_path_factory.mktemp("sweep") / "repo"
    repo.mkdir()
    copy_repository(repo)
    env = dvc_env()
    for name, split in POINTS.items():
        run(repo, env, "dvc", "exp", "run", "--queue", *SWEEP, "-S", f"decode.split={split}", "-n", name)
    queued = {"status": run(repo, env, "git", "status", "--porcelain"), "params": (repo / "params.yaml").read_text()}
    try:
        run(repo, env, "dvc", "queue", "start", "-j", "1")
        status = wait_for_queue(repo, env)
        logs = {name: run(repo, env, "dvc", "queue", "logs", name) for name in POINTS}
    finally:
        run(repo, env, "dvc", "queue", "stop", "--kill")  # no worker outlives a failed test
    show = json.loads(run(repo, env, "dvc", "exp", "show", "--json"))
    mlflow.set_tracking_uri(f"sqlite:///{repo}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["transformer-smoke"], output_format="list")
    return {"repo": repo, "queued": queued, "status": status, "logs": logs, "show": show, "runs": runs}


def experiments(show: list[dict]) -> dict[str, dict]:
    """Experiment name -> its data (params, metrics) in `dvc exp show --json`."""
    return {r["name"]: r["data"] for row in show for exp in row.get("experiments") or [] for r in exp["revs"]}


def test_both_experiments_succeed_the_second_reusing_the_first_stages(sweep):
    states = {line.split()[1]: line.split()[-1] for line in sweep["status"].splitlines() if len(line.split()) > 2}
    assert {name: states.get(name) for name in POINTS} == dict.fromkeys(POINTS, "Success"), sweep["status"]
    first, second = (sweep["logs"][name] for name in POINTS)
    assert ran(first) == list(STAGES)
    assert ran(second) == ["decode", "score"]
    for stage in ("download", "learn_bpe", "binarise", "train", "curve", "average"):
        assert f"Stage '{stage}' is cached - skipping run" in second


def test_dvc_exp_show_lists_each_experiment_with_its_params_and_scores(sweep):
    exps = experiments(sweep["show"])
    assert set(POINTS) <= set(exps)
    for name, split in POINTS.items():
        params = exps[name]["params"]["params.yaml"]["data"]
        assert params["decode"]["split"] == split and params["preset"] == "smoke"
        score = exps[name]["metrics"]["metrics/score.json"]["data"]  # git-tracked metrics, in the experiment's commit
        assert 0 <= score["bleu"] <= 100 and score["bleu_signature"].startswith("nrefs:1|case:mixed")
    chrf = [exps[name]["metrics"]["metrics/score.json"]["data"]["chrf"] for name in POINTS]
    assert chrf[0] != chrf[1] and all(c > 0 for c in chrf)


def test_mlflow_has_one_parent_per_experiment_named_by_it_with_its_scores(sweep):
    runs, exps = sweep["runs"], experiments(sweep["show"])
    parents = {r.info.run_name: r for r in runs if r.data.tags.get("kind") == "pipeline"}
    assert sorted(parents) == sorted(POINTS)
    for name, split in POINTS.items():
        parent = parents[name]
        assert parent.data.tags["dvc_experiment"] == name and parent.info.status == "FINISHED"
        assert parent.data.params["decode.split"] == split  # the compare view of the parents: params and scores
        score = exps[name]["metrics"]["metrics/score.json"]["data"]
        assert parent.data.metrics["bleu"] == pytest.approx(score["bleu"])
        assert parent.data.metrics["chrf"] == pytest.approx(score["chrf"])
        children = {
            r.data.tags["stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
        }
        assert sorted(children) == sorted(STAGES)
        assert children["decode"].data.params["decode.split"] == split
        assert children["decode"].data.tags["cached"] == "false"
    # The second experiment's restored stages link the runs of the first that made their outputs.
    first = {
        r.data.tags["stage"]: r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parents["sweep-test"].info.run_id
    }
    second = {
        r.data.tags["stage"]: r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parents["sweep-valid"].info.run_id
    }
    for stage in ("train", "average"):
        assert second[stage].data.tags["cached"] == "true"
        assert second[stage].data.tags["linked_run_id"] == first[stage].info.run_id


def test_the_store_is_the_repositorys_and_the_workspace_is_untouched(sweep):
    repo = sweep["repo"]
    assert (repo / "mlflow.db").is_file() and (repo / "mlruns").is_dir()
    assert not list((repo / ".dvc" / "tmp").rglob("mlflow.db"))
    # Queueing composed each experiment's params.yaml and put it back; running wrote only in .dvc/tmp/exps.
    assert run(repo, dvc_env(), "git", "status", "--porcelain") == sweep["queued"]["status"] == ""
    assert (repo / "params.yaml").read_text() == sweep["queued"]["params"]
    assert not any((repo / folder).exists() for folder in ("data", "models", "outputs", "metrics", "plots"))
