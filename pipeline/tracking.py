"""MLflow for the pipeline: one parent run per pipeline execution, one child run per stage.

Every stage process calls `stage_run(stage, params)`: it finds (or creates) the parent run of this pipeline
execution, opens a child run named after the stage under it, and logs the stage's params and the tags that
identify the run (git commit, DVC experiment, preset). The parent is found by a tag, `pipeline_key`: the DVC
experiment name when DVC runs the stage inside `dvc exp run`, else the git commit plus a hash of params.yaml.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from pipeline.params import PARAMS_FILE, Params

REPO = Path(__file__).resolve().parents[1]


def tracking_uri(params: Params) -> str:
    """`MLFLOW_TRACKING_URI` wins; else params; else a SQLite store inside the repository (ignored by git)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or params.mlflow.tracking_uri or f"sqlite:///{REPO}/mlflow.db"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() or "unknown"


def pipeline_key(params_file: Path = PARAMS_FILE) -> str:
    exp = os.environ.get("DVC_EXP_NAME")
    if exp:
        return f"exp:{exp}"
    digest = hashlib.sha256(Path(params_file).read_bytes()).hexdigest()[:12]
    return f"{git_commit()[:12]}:{digest}"


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """Create the experiment in the driver with an absolute artifact location (Ray workers run elsewhere)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if client.tracking_uri.startswith("sqlite:") or client.tracking_uri.startswith("file:"):
        location = (REPO / "mlruns").resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


def parent_run_id(client: MlflowClient, experiment_id: str, params: Params) -> str:
    key = pipeline_key()
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.pipeline_key = '{key}' and tags.kind = 'pipeline'", max_results=1
    )
    if found:
        return found[0].info.run_id
    tags = {"pipeline_key": key, "kind": "pipeline", **run_tags(params)}
    name = os.environ.get("DVC_EXP_NAME") or f"pipeline-{params.preset}"
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    client.set_terminated(run.info.run_id, "RUNNING")
    return run.info.run_id


def run_tags(params: Params) -> dict[str, str]:
    return {
        "git_commit": git_commit(),
        "dvc_experiment": os.environ.get("DVC_EXP_NAME", ""),
        "preset": params.preset,
    }


@contextlib.contextmanager
def stage_run(stage: str, params: Params, sections: tuple[str, ...]) -> Iterator[mlflow.ActiveRun]:
    """A child run for `stage` under this pipeline execution's parent, with `sections` of params logged."""
    mlflow.set_tracking_uri(tracking_uri(params))
    client = MlflowClient()
    experiment_id = ensure_experiment(client, params.mlflow.experiment)
    parent = parent_run_id(client, experiment_id, params)
    tags = {"mlflow.parentRunId": parent, "stage": stage, "kind": "stage", **run_tags(params)}
    with mlflow.start_run(experiment_id=experiment_id, run_name=stage, tags=tags) as run:
        flat = {}
        for section in sections:
            for key, value in getattr(params, section).model_dump(mode="json").items():
                flat[f"{section}.{key}"] = value
        mlflow.log_params(flat)
        yield run
