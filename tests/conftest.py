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
