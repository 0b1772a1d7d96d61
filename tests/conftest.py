import os
from pathlib import Path

# Hub access fails on CI machines: datasets must fail fast instead of retrying for ~20 s.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MULTI30K = SHARED / "data" / "multi30k"


import pytest  # noqa: E402


@pytest.fixture
def mlflow_tmp_store(tmp_path, monkeypatch):
    """Stages called from tests log into a store of their own, never into the repository's mlflow.db."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="session")
def dag(tmp_path_factory):
    """A copy of this repository after one experiment of the whole DAG (`dvc exp run` with helpers_repo.SMALL) and a
    `dvc repro`: test_e2e checks what it made, test_sweep queues more experiments beside it (their upstream stages
    restored from this one's run-cache, as a sweep after a first run restores them)."""
    import json

    import mlflow
    from helpers_repo import SMALL, copy_repository, dvc_env, run

    repo = tmp_path_factory.mktemp("e2e") / "repo"
    repo.mkdir()
    copy_repository(repo)
    env = dvc_env()
    first = run(repo, env, "dvc", "exp", "run", *SMALL)
    score = json.loads((repo / "metrics" / "score.json").read_text())
    again = run(repo, env, "dvc", "repro")
    mlflow.set_tracking_uri(f"sqlite:///{repo}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["transformer-smoke"], output_format="list")
    return {"repo": repo, "env": env, "first": first, "score": score, "again": again, "runs": runs}
