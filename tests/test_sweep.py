"""Sweeps in DVC's queue (docs/sweeps.md): beside the experiment that tests/conftest.py's `dag` ran (the whole DAG,
helpers_repo.SMALL), two more are queued with `dvc exp run --queue`, run by `dvc queue start`, and each is found
with its scores in `dvc exp show --json` and as one MLflow parent run, named by the experiment, in the
repository's mlflow.db.

Each changes what fewer stages depend on: `decode.split=valid` reruns decode and score only, restoring the other
stages from the first experiment's run-cache (which the queue's temporary workspaces share); adding
`score.tokenize=intl` then reruns score only, restoring decode from the experiment before it. MLflow links every
restored stage to the run that made its outputs. (A beam change may leave an undertrained model's hypotheses
byte-identical, and DVC then restores `score` too; a change of split changes them for sure.)
"""

import json
import time

import mlflow
import pytest
from helpers_repo import REPO, SMALL, STAGES, ran, run

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (REPO / "pipeline" / "train.py").exists(), reason="the train stage is not merged yet"),
]

# Each experiment's overrides on top of the first experiment's (SMALL), in the order the queue runs them.
POINTS = {
    "sweep-valid": ["-S", "decode.split=valid"],
    "sweep-intl": ["-S", "decode.split=valid", "-S", "score.tokenize=intl"],
}
# What each must run; every other stage is restored.
RUNS = {"sweep-valid": ["decode", "score"], "sweep-intl": ["score"]}


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
def sweep(dag):
    repo, env = dag["repo"], dag["env"]
    before = {
        "status": run(repo, env, "git", "status", "--porcelain"),
        "params": (repo / "params.yaml").read_text(),
        "score": (repo / "metrics" / "score.json").read_text(),
    }
    for name, overrides in POINTS.items():
        run(repo, env, "dvc", "exp", "run", "--queue", *SMALL, *overrides, "-n", name)
    queued = {"status": run(repo, env, "git", "status", "--porcelain"), "params": (repo / "params.yaml").read_text()}
    try:
        run(repo, env, "dvc", "queue", "start", "-j", "1")
        status = wait_for_queue(repo, env)
        logs = {name: run(repo, env, "dvc", "queue", "logs", name) for name in POINTS}
    finally:
        run(repo, env, "dvc", "queue", "stop", "--kill")  # no worker outlives a failed test
    after = {"status": run(repo, env, "git", "status", "--porcelain")}
    show = json.loads(run(repo, env, "dvc", "exp", "show", "--json"))
    mlflow.set_tracking_uri(f"sqlite:///{repo}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["transformer-smoke"], output_format="list")
    return {
        "repo": repo, "before": before, "queued": queued, "status": status, "logs": logs, "show": show,
        "after": after, "runs": runs, "first": dag["runs"],
    }  # fmt: skip


def experiments(show: list[dict]) -> dict[str, dict]:
    """Experiment name -> its data (params, metrics) in `dvc exp show --json`."""
    return {r["name"]: r["data"] for row in show for exp in row.get("experiments") or [] for r in exp["revs"]}


def test_both_experiments_succeed_each_running_only_what_its_change_reaches(sweep):
    states = {line.split()[1]: line.split()[-1] for line in sweep["status"].splitlines() if len(line.split()) > 2}
    assert {name: states.get(name) for name in POINTS} == dict.fromkeys(POINTS, "Success"), sweep["status"]
    for name, stages in RUNS.items():
        log = sweep["logs"][name]
        assert ran(log) == stages, log[-3000:]
        for stage in STAGES[: STAGES.index(stages[0])]:
            assert f"Stage '{stage}' is cached - skipping run" in log or f"Stage '{stage}' didn't change" in log


def test_dvc_exp_show_lists_each_experiment_with_its_params_and_scores(sweep):
    exps = experiments(sweep["show"])
    assert set(POINTS) <= set(exps)
    scores = {}
    for name in POINTS:
        params = exps[name]["params"]["params.yaml"]["data"]
        assert params["decode"]["split"] == "valid" and params["preset"] == "smoke"
        assert params["score"]["tokenize"] == ("intl" if name == "sweep-intl" else "13a")
        scores[name] = exps[name]["metrics"]["metrics/score.json"]["data"]  # git-tracked, in the experiment's commit
        assert 0 <= scores[name]["bleu"] <= 100 and scores[name]["split"] == "valid"
    assert "|tok:13a|" in scores["sweep-valid"]["bleu_signature"]
    assert "|tok:intl|" in scores["sweep-intl"]["bleu_signature"]
    # The same hypotheses and references (decode restored): chrF, which does not tokenise, is the same. (SMALL's
    # 60 updates may learn too little for a chrF above 0; which run made the hypotheses is checked in MLflow.)
    assert scores["sweep-valid"]["chrf"] == pytest.approx(scores["sweep-intl"]["chrf"])


def parent_and_children(runs, name: str):
    (parent,) = [r for r in runs if r.data.tags.get("kind") == "pipeline" and r.info.run_name == name]
    children = {r.data.tags["stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    return parent, children


def test_mlflow_has_one_parent_per_experiment_named_by_it_with_its_scores(sweep):
    runs, exps = sweep["runs"], experiments(sweep["show"])
    (first,) = [r.info.run_name for r in sweep["first"] if r.data.tags.get("kind") == "pipeline"]
    made = {first: parent_and_children(runs, first)[1]}  # stage -> the run that made its outputs, so far
    for name in POINTS:  # in the order they ran
        parent, children = parent_and_children(runs, name)
        assert parent.data.tags["dvc_experiment"] == name and parent.info.status == "FINISHED"
        assert parent.data.params["decode.split"] == "valid"  # the compare view of the parents: params and scores
        score = exps[name]["metrics"]["metrics/score.json"]["data"]
        assert parent.data.metrics["bleu"] == pytest.approx(score["bleu"])
        assert parent.data.metrics["chrf"] == pytest.approx(score["chrf"])
        assert sorted(children) == sorted(STAGES)
        for stage in ("train", "average", "decode", "score"):
            child = children[stage]
            if stage in RUNS[name]:
                assert child.data.tags["cached"] == "false", (name, stage)
            else:  # restored: linked to the run, in an earlier experiment, that made its outputs
                assert child.data.tags["cached"] == "true", (name, stage)
                origin = next(
                    m[stage] for m in reversed(made.values()) if stage in m and m[stage].data.tags["cached"] == "false"
                )
                assert child.data.tags["linked_run_id"] == origin.info.run_id, (name, stage)
        made[name] = children


def test_the_store_is_the_repositorys_and_the_workspace_is_untouched(sweep):
    repo, before = sweep["repo"], sweep["before"]
    assert (repo / "mlflow.db").is_file() and (repo / "mlruns").is_dir()
    assert not list((repo / ".dvc" / "tmp").rglob("mlflow.db"))
    # Queueing composed each experiment's params.yaml and put it back; running wrote only in .dvc/tmp/exps.
    assert sweep["queued"]["status"] == sweep["after"]["status"] == before["status"]
    assert sweep["queued"]["params"] == before["params"] == (repo / "params.yaml").read_text()
    assert (repo / "metrics" / "score.json").read_text() == before["score"]
