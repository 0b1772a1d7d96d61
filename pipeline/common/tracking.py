"""MLflow for the pipeline: one parent run per pipeline execution, one child run per stage.

Every stage process wraps its work in `stage_run(stage, params, sections)`: it finds (or creates) the parent
run of this pipeline execution, opens a child run named after the stage under it, and logs the stage's params
and the tags that identify the run (git commit, DVC experiment, preset). docs/mlflow.md explains the design.

- One execution: the `dvc repro` / `dvc exp run` process that started the stage (found by walking up the
  process tree), so every stage of one command shares a parent, and two commands never do. Outside DVC the
  key is the git commit plus a hash of params.yaml.
- Stages DVC skipped (cached) still appear under the new parent: when a stage starts, every stage before it
  in dvc.yaml that has no child yet gets a child tagged `cached=true`, copying the params and metrics of the
  run that produced its current outputs. That run is found by the hash of the stage's outputs in dvc.lock
  (DVC writes a stage's lock entry as soon as it finishes), which each run is tagged with (`dvc_outs`) by
  the first stage that runs after it, or by itself when its outputs are plain files.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import mlflow
import psutil
import yaml
from mlflow.entities import Metric, Param, Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.common.params import PARAMS_FILE, Params

REPO = Path(__file__).resolve().parents[2]  # pipeline/common/ -> the repository
# Tags a stage sets that say where its products are (e.g. the pyfunc model's URI); linked runs carry them.
CARRIED_TAGS = ("translator_uri",)


def store_root() -> Path:
    """Where the default MLflow store lives: the repository DVC runs for (DVC_ROOT is set for `--temp` runs
    too, pointing at the user's repository rather than the executor's temporary copy)."""
    return Path(os.environ.get("DVC_ROOT") or REPO)


def tracking_uri(params: Params) -> str:
    """`MLFLOW_TRACKING_URI` wins; else params; else a SQLite store inside the repository (ignored by git)."""
    return (
        os.environ.get("MLFLOW_TRACKING_URI")
        or params.mlflow.tracking_uri
        or f"sqlite:///{store_root().resolve()}/mlflow.db"
    )


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() or "unknown"


def dvc_process() -> psutil.Process | None:
    """The `dvc` process that started this stage (DVC sets DVC_STAGE for every stage command), if any."""
    if "DVC_STAGE" not in os.environ:
        return None
    with contextlib.suppress(psutil.Error):
        for proc in psutil.Process().parents():
            cmd = proc.cmdline()
            if any(Path(arg).name == "dvc" for arg in cmd[:2]) or cmd[1:3] == ["-m", "dvc"]:
                return proc
    return None


def pipeline_key(params_file: Path = PARAMS_FILE) -> str:
    proc = dvc_process()
    if proc is not None:
        name = os.environ.get("DVC_EXP_NAME") or "repro"
        return f"dvc:{name}:{proc.pid}:{int(proc.create_time() * 1000)}"
    digest = hashlib.sha256(Path(params_file).read_bytes()).hexdigest()[:12]
    return f"manual:{git_commit()[:12]}:{digest}"


def run_tags(params: Params) -> dict[str, str]:
    return {
        "git_commit": git_commit(),
        "dvc_experiment": os.environ.get("DVC_EXP_NAME", ""),
        "preset": params.preset,
    }


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """Create the experiment in the driver with an absolute artifact location (Ray workers run elsewhere).

    Two queued experiments (`dvc queue start -j 2`) may both find it missing; the second to create it gets
    RESOURCE_ALREADY_EXISTS and uses the first's."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=local_artifact_location(client.tracking_uri))
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    return client.get_experiment_by_name(name).experiment_id


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock beside a local SQLite store (`<file>.lock`); other stores need none.

    MLflow creates a new store's tables (an Alembic migration) on first use, and two processes doing it at once
    fail ("table experiments already exists"): the first stages of two queued experiments started together
    (`dvc queue start -j 2`) on a fresh clone do. Once the tables exist, concurrent writes are safe: MLflow sets
    SQLite's busy_timeout (20 s) on every session, so a writer waits for the other instead of failing."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file is closed
        yield


def local_artifact_location(uri: str) -> str | None:
    """For a local store, `mlruns/` beside it, as an absolute URI; a server decides for itself (None)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlruns").resolve().as_uri()
    if uri.startswith("file:"):
        return Path(uri.removeprefix("file://").removeprefix("file:")).resolve().as_uri()
    return None


def parent_run_id(client: MlflowClient, experiment_id: str, params: Params) -> str:
    key = pipeline_key()
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.pipeline_key = '{key}' and tags.kind = 'pipeline'", max_results=1
    )
    if found:
        return found[0].info.run_id
    name = os.environ.get("DVC_EXP_NAME") or f"{params.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    tags = {"pipeline_key": key, "kind": "pipeline", **run_tags(params)}
    run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    # Every param of this execution on the parent too, beside its BLEU: MLflow's compare view of the parents (one
    # per experiment of a sweep) then shows params against scores. The stages' children log their sections.
    flat = [Param(k, str(v)) for k, v in flatten(params.model_dump(mode="json")).items()]
    for start in range(0, len(flat), 100):  # log_batch takes at most 100 params
        client.log_batch(run_id, params=flat[start : start + 100])
    return run_id


def flatten(values: Mapping, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# --- cached stages: link the run that produced the outputs DVC kept ---


def dag_stages(dvc_yaml: Path = Path("dvc.yaml")) -> dict[str, list[str]]:
    """Stage name -> its output paths (outs, metrics, plots), in the order dvc.yaml lists the stages."""
    if not dvc_yaml.exists():
        return {}
    stages = (yaml.safe_load(dvc_yaml.read_text(encoding="utf-8")) or {}).get("stages", {})
    outs = {}
    for name, stage in stages.items():
        entries = [e for key in ("outs", "metrics", "plots") for e in stage.get(key, [])]
        outs[name] = [next(iter(e)) if isinstance(e, dict) else e for e in entries]
    return outs


def outs_digest(hashes: Mapping[str, str]) -> str:
    """One tag value for a stage's outputs, from DVC's md5 of each (dvc.lock)."""
    return hashlib.sha256(json.dumps(sorted(hashes.items())).encode()).hexdigest()[:32]


def read_lock(lock_file: Path = Path("dvc.lock")) -> dict[str, dict]:
    """Stage name -> its dvc.lock entry (cmd, deps, params, outs with their md5)."""
    if not lock_file.exists():
        return {}
    return (yaml.safe_load(lock_file.read_text(encoding="utf-8")) or {}).get("stages", {})


def lock_digest(entry: Mapping) -> str | None:
    hashes = {o["path"]: o["md5"] for o in entry.get("outs", []) if "md5" in o}
    return outs_digest(hashes) if hashes else None


def file_outputs_digest(paths: list[str]) -> str | None:
    """The digest of outputs that are all plain files (DVC's md5 of a file is the md5 of its bytes)."""
    if not paths or not all(Path(p).is_file() for p in paths):
        return None
    return outs_digest({p: hashlib.md5(Path(p).read_bytes()).hexdigest() for p in paths})


def stage_children(client: MlflowClient, experiment_id: str, parent: str) -> dict[str, Run]:
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}' and tags.kind = 'stage'"
    )
    return {r.data.tags["stage"]: r for r in runs}


def link_cached_stage(
    client: MlflowClient, experiment_id: str, parent: str, stage: str, entry: Mapping, common_tags: Mapping
) -> str:
    """A child run under `parent` standing for a stage with no run in this execution, linked to the run that
    produced its current outputs; its params are those dvc.lock records for these outputs."""
    digest = lock_digest(entry)
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.stage = '{stage}' and tags.dvc_outs = '{digest}' and tags.cached = 'false'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    origin = found[0] if found else None
    tags = {"mlflow.parentRunId": parent, "stage": stage, "kind": "stage", "cached": "true", "dvc_outs": digest}
    tags.update(common_tags)
    tags["mlflow.note.content"] = (
        "No run of this stage in this pipeline execution: DVC skipped it (its outputs were up to date), "
        "or the stage does not log to MLflow. Params: as recorded in dvc.lock for its current outputs. "
    )
    params = {k: str(v) for k, v in flatten(entry.get("params", {}).get("params.yaml", {})).items()}
    metrics, carried = {}, {}
    if origin is not None:
        tags["linked_run_id"] = origin.info.run_id
        tags["mlflow.note.content"] += (
            f"They were produced by run {origin.info.run_name} ({origin.info.run_id}), whose final metrics "
            "are copied here; its artifacts and metric history are there."
        )
        params = {**origin.data.params, **params}
        metrics = origin.data.metrics
        carried = {k: v for k, v in origin.data.tags.items() if k in CARRIED_TAGS}
    run_id = client.create_run(experiment_id, run_name=stage, tags={**tags, **carried}).info.run_id
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
        params=[Param(k, v) for k, v in params.items()],
    )
    client.set_terminated(run_id, "FINISHED")
    return run_id


def link_cached_stages(client: MlflowClient, experiment_id: str, parent: str, stage: str, common_tags: Mapping) -> None:
    """Tag the runs of this execution with their outputs' hashes; add children for the stages DVC skipped."""
    order = list(dag_stages())
    if stage not in order:
        return
    lock = read_lock()
    children = stage_children(client, experiment_id, parent)
    for earlier in order[: order.index(stage)]:
        entry = lock.get(earlier)
        digest = lock_digest(entry) if entry else None
        if digest is None:
            continue  # DVC never ran this stage here: nothing to stand for
        child = children.get(earlier)
        if child is None:
            link_cached_stage(client, experiment_id, parent, earlier, entry, common_tags)
        elif child.data.tags.get("dvc_outs") != digest:
            client.set_tag(child.info.run_id, "dvc_outs", digest)


# --- what the stages call ---


@contextlib.contextmanager
def stage_run(stage: str, params: Params, sections: tuple[str, ...]) -> Iterator[mlflow.ActiveRun]:
    """A child run for `stage` under this pipeline execution's parent, with `sections` of params logged.

    A failure marks the child and the parent FAILED and is re-raised.
    """
    uri = tracking_uri(params)
    mlflow.set_tracking_uri(uri)
    with store_lock(uri):
        client = MlflowClient()
        experiment_id = ensure_experiment(client, params.mlflow.experiment)
    parent = parent_run_id(client, experiment_id, params)
    link_cached_stages(client, experiment_id, parent, stage, run_tags(params))
    tags = {"mlflow.parentRunId": parent, "stage": stage, "kind": "stage", "cached": "false", **run_tags(params)}
    # The parent is RUNNING while one of its stages runs and FINISHED between them, so an execution that
    # ends early (DVC skipping the rest) still shows as finished.
    client.update_run(parent, status="RUNNING")
    try:
        with mlflow.start_run(experiment_id=experiment_id, run_name=stage, tags=tags) as run:
            flat = {}
            for section in sections:
                flat.update(flatten(getattr(params, section).model_dump(mode="json"), f"{section}."))
            mlflow.log_params(flat)
            yield run
            digest = file_outputs_digest(dag_stages().get(stage, []))
            if digest:
                mlflow.set_tag("dvc_outs", digest)
        client.set_terminated(parent, "FINISHED")
    except BaseException:
        client.set_terminated(parent, "FAILED")
        raise


def log_stage_metrics(metrics: Mapping, step: int | None = None) -> None:
    """Log the numeric values of a (nested) metrics mapping into the active run; strings are skipped."""
    numeric = {
        k: float(v)
        for k, v in flatten(metrics).items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }
    mlflow.log_metrics(numeric, step=step)


def log_pipeline_result(result: Mapping, score_file: Path) -> None:
    """The final scores on the parent run of this execution, which is then finished."""
    run = mlflow.active_run()
    parent = run.data.tags.get("mlflow.parentRunId") if run else None
    if parent is None:
        raise RuntimeError("log_pipeline_result must be called inside stage_run")
    client = MlflowClient()
    now = int(time.time() * 1000)
    keys = ("bleu", "bleu_ci95", "chrf", "bleu_paper", "bleu_tok_lc")
    client.log_batch(parent, metrics=[Metric(k, float(result[k]), now, 0) for k in keys if k in result])
    for key in ("bleu_signature", "chrf_signature", "bleu_paper_note"):
        if key in result:
            client.set_tag(parent, key, str(result[key]))
    client.log_artifact(parent, str(score_file), artifact_path="metrics")
    for child in stage_children(client, run.info.experiment_id, parent).values():
        for key in CARRIED_TAGS:
            if key in child.data.tags:
                client.set_tag(parent, key, child.data.tags[key])
    client.set_terminated(parent, "FINISHED")
