"""`train` stage: the Transformer trained through Ray Train on 1..N workers and nodes, resumable, in MLflow.

    python -m pipeline.train --data data/bin --out models/checkpoints

The driver loads the binarised train and valid splits and puts them in Ray's object store (workers need no
shared filesystem), starts a local Ray (or joins `RAY_ADDRESS`), and runs `TorchTrainer` under an MLflow child
run. The Ray run is named `<train.run_name>-<fingerprint>`, the fingerprint hashing everything that shapes the
trajectory (model, optimisation, batching, data), so a rerun of the same configuration after a crash finds its
run in `train.storage_path` and Ray Train V2 restores it: the workers continue from the checkpoint Ray hands
back, whose own data position makes the resume exact. With `train.workers: [min, max]` the run is elastic: it
starts with min workers, grows as nodes join and goes on with fewer after losing some, to the same weights
(pipeline/common/elastic.py). An error a restart cannot fix (non-finite training, a full disk, bad data, an
incompatible checkpoint) ends the run at once with the key or path to fix (pipeline/common/failures.py). At the
end the last `keep_checkpoints` checkpoints (weights only) go to `--out`, with metrics/train.json (the run's worker
group starts, restarts, resizes and updates lost among them), plots/train.csv and plots/valid.csv.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Iterable
from pathlib import Path

# Read by Ray when it is imported. A local Ray has no dashboard (not in ray[train]), hence no state API, and
# Ray Train's PlacementGroupCleaner then warns once a second for the whole run that it cannot query it (3,600
# lines an hour); the placement groups of a local Ray end with the stage anyway.
os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", "Failed to query Ray Train Controller actor state")

import mlflow
import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

from pipeline.common.elastic import FreshClusterView, WaitLimit, idle_line, read_attempts, scaling, summarise, wanted
from pipeline.common.failures import FailFast, reason
from pipeline.common.files import atomic_path, write_csv_atomic, write_text_atomic
from pipeline.common.layout import SNAPSHOT_INDEX, SPM_FILE, checkpoint_name
from pipeline.common.params import Params, TrainParams, load_params
from pipeline.common.tracking import git_commit, stage_run, tracking_uri
from pipeline.common.train_worker import intact_states, snapshot_folder, train_loop_per_worker
from transformer.batching import PackedCorpus
from transformer.checkpoint import load, save_atomic
from transformer.ema import averaged_weights
from transformer.model import make_config
from transformer.training import TrainingConfig

METRICS_FILE = Path("metrics/train.json")
TRAIN_PLOT, VALID_PLOT = Path("plots/train.csv"), Path("plots/valid.csv")
# Keys that do not change which weights a run produces: a rerun that differs only in these resumes (a longer
# budget continues the run). The budget's own keys are among them only without a cool-down (BUDGET).
NOT_TRAJECTORY = {
    "max_updates", "max_epochs", "max_minutes", "checkpoint_every_minutes", "checkpoint_every_updates",
    "snapshot_every_minutes", "keep_checkpoints", "validate_every_updates", "inspect_sentences", "log_every_updates",
    "workers", "resize_every_minutes", "wait_for_workers_minutes",
    "use_gpu", "cpus_per_worker", "accelerator_type",
    "compile", "max_bad_updates", "storage_path", "run_name", "max_failures",
}  # fmt: skip
# With train.cooldown > 0 the rate falls to 0 over the last share of max_updates or max_minutes, so the budget
# shapes every update after the cool-down starts: a 20-minute rerun must not resume a 60-minute run's checkpoints.
BUDGET = {"max_updates", "max_minutes"}


def load_data(folder: Path) -> tuple[dict, PackedCorpus, PackedCorpus | None]:
    """meta.json and the train/valid splits, in the direction the corpus was binarised for. The token arrays stay
    memory-mapped here; `ray.put` copies them once into the object store (at WMT14 size ~0.6 GB, about a second)."""
    from transformer.corpus import SAMPLED_SPLIT, ParallelCorpus, read_meta

    meta = read_meta(folder)
    src, tgt = meta["langs"]["source"], meta["langs"]["target"]
    # With BPE-dropout (binarise.bpe_dropout) the model trains on the sampled copies, one per epoch in turn.
    split = SAMPLED_SPLIT if SAMPLED_SPLIT in meta["splits"] else "train"
    train = PackedCorpus.from_corpus(ParallelCorpus.load(folder, split, src, tgt))
    valid = ParallelCorpus.load(folder, "valid", src, tgt)
    return meta, train, (PackedCorpus.from_corpus(valid) if len(valid) else None)


def fingerprint(params: Params, data: Path) -> str:
    """Hash of what shapes the trajectory: model, optimisation and batching params, and the data itself."""
    h = hashlib.sha256()
    h.update(json.dumps(params.model.model_dump(mode="json"), sort_keys=True).encode())
    ignored = NOT_TRAJECTORY - BUDGET if params.train.cooldown > 0 else NOT_TRAJECTORY
    train = {k: v for k, v in params.train.model_dump(mode="json").items() if k not in ignored}
    h.update(json.dumps(train, sort_keys=True).encode())
    for path in sorted(data.glob("meta.json")) + sorted(data.glob("*.idx.npy")):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()[:10]


# Ray Train's workers replace print() by one that logs through the root logger *and* prints when stdout is
# wrapped, which put every progress line twice into the driver's log; the plain print reaches it once.
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


# Fault injection for tests, not params (tests/test_train_stage.py): at the update named, one worker raises once
# (crash), or every worker stops after its checkpoint until the test kills the stage (hang: a kill at a known update).
FAULT_ENV = {"crash": "TRANSFORMER_TEST_CRASH_AT_UPDATE", "hang": "TRANSFORMER_TEST_HANG_AT_UPDATE"}


def injected_faults() -> dict[str, int | None]:
    faults = {}
    for fault, name in FAULT_ENV.items():
        value = os.environ.get(name)
        if value and (not value.isdigit() or int(value) < 1):
            raise ValueError(f"{name}={value!r}: a positive update number (test fault injection)")
        faults[fault] = int(value) if value else None
    return faults


def init_ray(train: TrainParams) -> None:
    """Join the cluster at RAY_ADDRESS (shipping our code to its nodes), else start a small local one."""
    if os.environ.get("RAY_ADDRESS"):
        repo = Path(__file__).resolve().parents[1]
        code = [str(repo / "transformer"), str(repo / "pipeline")]
        ray.init(runtime_env={"py_modules": code, "env_vars": WORKER_ENV})
        return
    # A local Ray's processes inherit the driver's environment. Ray Train's preemption watcher (an actor process
    # more to start, on a machine where start-up is seconds of CPU) watches for nodes being drained, which nothing
    # does to a local Ray; on a cluster (RAY_ADDRESS) it stays on.
    os.environ.update(WORKER_ENV | {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"})
    workers = train.workers[1] if isinstance(train.workers, tuple) else 1 if train.workers == "auto" else train.workers
    gpus = torch.cuda.device_count()
    # address="local": a Ray of its own even when another one runs on this machine (another experiment, `ray
    # start`): without it ray.init joins that one and refuses num_cpus/num_gpus ("When connecting to an existing
    # cluster, num_cpus and num_gpus must not be provided"). RAY_ADDRESS is the way to join a cluster.
    ray.init(address="local", num_cpus=workers * train.cpus_per_worker, num_gpus=gpus, include_dashboard=False)


def training_config(train: TrainParams, stage_start: float, meta: dict) -> dict:
    """TrainingConfig's values: the `train` section, the wall clock, and the copies the corpus holds (meta.json)."""
    fields = set(TrainingConfig.__dataclass_fields__) - {"start_time", "deadline", "train_copies"}
    values = {k: v for k, v in train.model_dump().items() if k in fields}
    deadline = stage_start + train.max_minutes * 60 if train.max_minutes is not None else None
    copies = meta.get("train_copies", 1)
    return {**values, "start_time": stage_start, "deadline": deadline, "train_copies": copies}


def system_tags(scaling_config: ray.train.ScalingConfig, run_name: str) -> dict[str, str]:
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] or [platform.processor()]
    return {
        "torch_version": torch.__version__,
        "ray_version": ray.__version__,
        "python_version": platform.python_version(),
        "workers": str(scaling_config.num_workers),
        "use_gpu": str(scaling_config.use_gpu),
        "devices": ", ".join(devices),
        "cluster_nodes": str(len([n for n in ray.nodes() if n["Alive"]])),
        "git_commit": git_commit(),
        "dvc_experiment": os.environ.get("DVC_EXP_NAME", ""),
        "ray_run": run_name,
    }


def inspection_config(params: Params, raw: Path | None, bpe: Path | None) -> dict | None:
    """What the workers need to log attention grids and sample translations: the sentencepiece model's bytes and
    the fixed validation sentences (`train.inspect_sentences`; 0, or no --raw/--bpe: none)."""
    count = params.train.inspect_sentences
    if not count or raw is None or bpe is None:
        return None
    import sentencepiece as spm

    from pipeline.common.files import read_lines
    from pipeline.common.inspection import choose_samples

    proto = (bpe / SPM_FILE).read_bytes()
    sp = spm.SentencePieceProcessor(model_proto=proto)
    data = params.data
    sources, references = (read_lines(raw / f"valid.{lang}") for lang in (data.source_lang, data.target_lang))
    samples = choose_samples(sources, references, sp, count)
    return {"spm": proto, "samples": [(s.source, s.reference) for s in samples]} if samples else None


def fit(
    params: Params, data: Path, run_id: str, marks: dict[str, float], inspect: dict | None = None
) -> ray.train.Result:
    """Run (or resume) the Ray Train run of this configuration; an error that ends it without a retry is raised
    as the worker or the controller said it (failures.reason). `marks`: the stage's start-up milestones so far
    (this adds `fit_called` and `fit_returned`)."""
    stage_start = marks["stage_start"]
    meta, train_data, valid_data = load_data(data)
    model_cfg = make_config(params.model.arch, meta["vocab_size"], **params.model.overrides())
    train = params.train
    name = f"{train.run_name}-{fingerprint(params, data)}"
    storage = train.storage_path if "://" in train.storage_path else str(Path(train.storage_path).resolve())
    scaling_config = scaling(train)
    micro = math.ceil(train.update_tokens / train.max_tokens)  # transformer.batching.BatchPlan.micro_per_update
    print(idle_line(micro, scaling_config.min_workers, scaling_config.max_workers), flush=True)
    mlflow.set_tags(system_tags(scaling_config, name))
    mlflow.log_params({"model.vocab_size": model_cfg.vocab_size, "model.parameters": _count(model_cfg)})
    config = {
        "model": model_cfg.to_dict(),
        "training": training_config(train, stage_start, meta),
        "train_ref": ray.put(train_data.to_arrays()),
        "valid_ref": ray.put(valid_data.to_arrays()) if valid_data is not None else None,
        "tracking_uri": tracking_uri(params),
        "run_id": run_id,
        "faults": injected_faults(),
        "inspect": inspect,
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=scaling_config,
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=train.max_failures),
            callbacks=controller_callbacks(train, scaling_config),
        ),
    )
    marks["fit_called"] = time.time()
    try:
        result = trainer.fit()
        marks["fit_returned"] = time.time()
        return result
    except ray.train.TrainingFailedError as e:
        cause = reason(e)
        if cause is e:
            raise
        raise cause from None  # the worker's or the controller's message, not Ray's wrapping of it


def controller_callbacks(train: TrainParams, scaling_config: ray.train.ScalingConfig) -> list:
    """Fail fast on errors a restart cannot fix; bound the wait for workers; an elastic run sees the cluster fresh."""
    callbacks = [FailFast()]
    if train.wait_for_workers_minutes:
        callbacks.append(WaitLimit(train.wait_for_workers_minutes * 60, wanted(scaling_config, train.workers)))
    if scaling_config.min_workers != scaling_config.max_workers:
        callbacks.append(FreshClusterView(min(train.resize_every_minutes * 60, 20.0) / 2))
    return callbacks


def _count(model_cfg) -> int:
    from transformer.model import Transformer

    with torch.device("meta"):
        return Transformer(model_cfg).num_parameters()


def write_checkpoints(found: Iterable[tuple[dict, str] | str], keep: int, last_update: int, out: Path) -> list[int]:
    """Weights, config and update of the newest `keep` intact training states of `found` (newest first, as
    `train_worker.intact_states` lists a run's storage; a line for each unreadable one), written oldest first (no
    optimiser: resume state stays in Ray's storage); with train.ema_decay, also the moving average's weights
    (`ema`, a state_dict like `model`). The stage reads them from the run's storage, not from Ray's registry of
    reported checkpoints: a stage killed after rank 0 persisted a checkpoint but before Ray's controller registered
    it resumes from that checkpoint (train_worker.restored_state), which Ray's result then never lists."""
    written: list[int] = []
    with atomic_path(out) as tmp:
        tmp.mkdir()
        for state in found:  # newest first, one state in memory at a time
            if isinstance(state, str):
                continue
            s, path = state
            if not written and s["update"] != last_update:
                raise RuntimeError(
                    f"training ended at update {last_update}, but the newest intact checkpoint of the run is "
                    f"from update {s['update']}: {path}"
                )
            slim = {k: s[k] for k in ("model", "config", "update", "tokens")} | {"elapsed_s": s.get("elapsed_s")}
            if "ema" in s:
                slim["ema"] = averaged_weights(s["ema"], s["model"])
            save_atomic(slim, tmp / checkpoint_name(s["update"]))
            written.append(s["update"])
            if len(written) == keep:
                break
        if not written:
            raise RuntimeError(f"training ended at update {last_update}, but no intact checkpoint was found")
    return written[::-1]


def write_snapshots(result: ray.train.Result, out: Path) -> list[dict]:
    """Copy the run's snapshots from Ray's storage into `out`, with index.json (empty when none)."""
    import pyarrow.fs

    fs, folder = result.filesystem, snapshot_folder(result.path)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(folder, allow_not_found=True))
    names = sorted(i.base_name for i in infos if i.base_name.startswith("snapshot_") and i.base_name.endswith(".pt"))
    index = []
    with atomic_path(out) as tmp:
        tmp.mkdir()
        for name in names:
            with fs.open_input_stream(f"{folder}/{name}") as f:
                (tmp / name).write_bytes(f.read())
            s = load(tmp / name)
            index.append({"file": name, **{k: s[k] for k in ("minutes", "elapsed_minutes", "update", "tokens")}})
        (tmp / SNAPSHOT_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return index


def time_breakdown(summary: dict, wall_time: float, marks: dict[str, float]) -> dict[str, float]:
    """Where the stage's wall time went: start-up by step (`marks`: the stage's start, Ray up, the driver's data in
    Ray's object store; rank 0's milestones in `summary["marks"]`; the first update's start), rank 0's loop by
    part (transformer.progress.TimeLedger: the first update, the steps, and each thing around them), the wrap-up
    by step (rank 0 after its loop, Ray from rank 0's return to the driver's result, the driver's outputs up to
    `wall_time`), and the rest (earlier worker groups of a restarted run)."""
    worker = summary.get("marks") or {}
    steps = [("ray_init", "ray_up"), ("driver_data", "fit_called"), ("worker_group_start", "worker_entered"),
             ("data_to_worker", "data_fetched"), ("model_and_resume", "trainer_ready")]  # fmt: skip
    times, parts = {**marks, **worker}, {}
    previous = times["stage_start"]
    for name, mark in steps:
        if mark in times:
            parts[name], previous = max(times[mark] - previous, 0.0), times[mark]
    if summary.get("startup_s") is not None:  # the first epoch's batch plan and the first batch, up to the update
        parts["first_batch"] = max(times["stage_start"] + summary["startup_s"] - previous, 0.0)
    parts |= summary.get("time_s") or {}
    times["stage_end"] = times["stage_start"] + wall_time
    wrap_up = [("worker_wrap_up", "loop_done", "worker_done"), ("ray_wrap_up", "worker_done", "fit_returned"),
               ("outputs", "fit_returned", "stage_end")]  # fmt: skip
    for name, start, stop in wrap_up:
        if start in times and stop in times:
            parts[name] = max(times[stop] - times[start], 0.0)
    parts["other"] = max(wall_time - sum(parts.values()), 0.0)
    return {k: round(v, 1) for k, v in parts.items()}


def time_line(time_s: dict[str, float]) -> str:
    wall = max(sum(time_s.values()), 1e-9)
    return "time: " + " | ".join(f"{k} {v:,.1f} s ({100 * v / wall:.1f}%)" for k, v in time_s.items() if v)


def final_metrics(summary: dict, wall_time: float, elastic: dict, marks: dict[str, float]) -> dict:
    """The run's numbers; `elastic` (elastic.summarise): its worker-group starts, sizes, restarts and losses."""
    return {
        "train_loss": summary.get("loss"),
        "train_nll": summary.get("nll"),
        "valid_loss": summary.get("valid_loss"),
        "valid_nll": summary.get("valid_nll"),
        "valid_ppl": summary.get("valid_ppl"),
        "updates": summary["updates"],
        "tokens": summary["tokens"],
        "skipped_updates": summary["skipped_updates"],
        "epoch": summary["epoch"],
        "stopped_by": summary["stopped_by"],
        "resumed_from_update": summary.get("resumed_from"),
        "startup_s": summary.get("startup_s"),  # stage start to the first update (rank 0's clock)
        "first_update_s": summary.get("first_update_s"),
        "workers": len(summary.get("worker_nodes") or []),  # the last worker group's size
        "worker_nodes": summary.get("worker_nodes"),
        "wall_time_s": round(wall_time, 1),
        "time_s": time_breakdown(summary, wall_time, marks),
        "step_share": round((summary.get("time_s") or {}).get("steps", 0.0) / max(wall_time, 1e-9), 3),
        **elastic,
    }


def write_outputs(result: ray.train.Result, keep: int, out: Path, snapshots: Path, marks: dict[str, float]) -> dict:
    if result.return_value is None:
        raise RuntimeError(f"Ray Train run {result.path} returned nothing from rank 0 (see the log above)")
    summary, history = result.return_value["summary"], result.return_value["history"]
    write_checkpoints(intact_states(result.filesystem, result.path), keep, summary["updates"], out)
    taken = write_snapshots(result, snapshots)
    write_csv_atomic(TRAIN_PLOT, history["train"], ("update", "loss", "nll", "ppl", "lr", "tokens_per_s", "grad_norm"))
    write_csv_atomic(VALID_PLOT, history["valid"], ("update", "valid_loss", "valid_nll", "valid_ppl"))
    elastic = summarise(read_attempts(result.filesystem, result.path))
    wall_time = time.time() - marks["stage_start"]
    metrics = final_metrics(summary, wall_time, elastic, marks) | {"snapshots": len(taken)}
    write_text_atomic(METRICS_FILE, json.dumps(metrics, indent=2) + "\n")
    mlflow.log_metrics({f"final_{k}": float(v) for k, v in metrics.items() if isinstance(v, int | float)})
    mlflow.log_metrics({f"final_time_{k}_s": v for k, v in metrics["time_s"].items()})
    print(time_line(metrics["time_s"]), flush=True)
    mlflow.log_artifacts(str(out), artifact_path="checkpoints")
    mlflow.log_artifact(str(METRICS_FILE))
    return metrics


def main(argv: list[str] | None = None) -> None:
    stage_start = time.time()  # train.max_minutes counts from here, Ray start-up included
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="binarised corpus (data/bin)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the kept checkpoints")
    parser.add_argument("--snapshots", type=Path, default=Path("models/snapshots"), help="folder for snapshots")
    parser.add_argument("--raw", type=Path, default=None, help="data/raw: validation sentences to inspect")
    parser.add_argument("--bpe", type=Path, default=None, help="data/bpe: to detokenise what is inspected")
    args = parser.parse_args(argv)
    params = load_params()
    inspect = inspection_config(params, args.raw, args.bpe)
    init_ray(params.train)
    marks = {"stage_start": stage_start, "ray_up": time.time()}
    try:
        with stage_run("train", params, ("model", "train")) as run:
            result = fit(params, args.data, run.info.run_id, marks, inspect)
            metrics = write_outputs(result, params.train.keep_checkpoints, args.out, args.snapshots, marks)
    finally:
        ray.shutdown()
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
