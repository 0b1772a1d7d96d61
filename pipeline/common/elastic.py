"""Elastic training through Ray Train: how many workers (`train.workers`: N, [min, max] or auto), how long a run
may wait for them, and a record of every worker-group start, from which the stage reports restarts and resizes.

Ray Train V2 restarts the whole worker group on every change of size: after a lost node (the survivors'
all-reduce fails; Ray starts a group of the workers it can get, at least min) and when nodes join (every
`train.resize_every_minutes` the controller compares the workers it could have with those it has, and starts
a larger group). Every start resumes from the newest intact checkpoint; the updates since it are redone.
Because the global batch and the dropout masks do not depend on the number of workers (transformer/batching.py,
transformer/training.py), the weights do not depend on the sizes the run went through, to float32 rounding.

Rank 0 of each group writes one record into the run's storage, `attempts/attempt_<n>.json`: its size, the update
it resumed from and when that checkpoint was saved, and the last update it reached (kept current at each log
line and checkpoint). The next start reads them to say what the change cost; the driver sums them up.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from itertools import pairwise

import pyarrow.fs
import ray
import ray.train
from ray.train.v2._internal.execution.callback import ControllerCallback
from ray.train.v2._internal.execution.controller.state import (
    InitializingState,
    ReschedulingState,
    RestartingState,
    SchedulingState,
)

from pipeline.common.failures import RunCannotContinue
from pipeline.common.params import TrainParams

logger = logging.getLogger(__name__)
ATTEMPTS_FOLDER = "attempts"  # in the run's storage
# Controller states in which the run has no worker group and waits for one to start.
WAITING = (InitializingState, SchedulingState, ReschedulingState, RestartingState)


def scaling(train: TrainParams) -> ray.train.ScalingConfig:
    """`auto`: [1, every GPU in the cluster], one worker per GPU; with no GPU, one CPU worker."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = gpus > 0 if train.use_gpu == "auto" else train.use_gpu
    if use_gpu and gpus == 0:
        raise RuntimeError("params.yaml: key 'train.use_gpu' is true but the Ray cluster has no GPU")
    if train.accelerator_type and not use_gpu:
        raise RuntimeError("params.yaml: key 'train.accelerator_type' needs GPU workers (train.use_gpu)")
    workers = train.workers
    if workers == "auto":
        most = gpus if use_gpu else 1
        workers = (1, most) if most > 1 else 1
    return ray.train.ScalingConfig(
        num_workers=workers,
        use_gpu=use_gpu,
        resources_per_worker={"CPU": train.cpus_per_worker} | ({"GPU": 1} if use_gpu else {}),
        accelerator_type=train.accelerator_type if use_gpu else None,
        elastic_resize_monitor_interval_s=train.resize_every_minutes * 60,
    )


def idle_line(micro_per_update: int, low: int, high: int) -> str:
    """How many forward/backward passes per update idle on low..high workers (M micro-batches, W workers)."""
    idle = [w * math.ceil(micro_per_update / w) - micro_per_update for w in range(low, high + 1)]
    sizes = f"{low}..{high} workers" if high > low else f"{low} worker{'s' * (low > 1)}"
    return f"an update is {micro_per_update} micro-batches: idle passes per update on {sizes}: {idle}"


class FreshClusterView(ControllerCallback):
    """In the controller of an elastic run: keep the view of the cluster that sizes the worker group fresh.

    Ray Train's elastic policy counts the workers it can have from the reservations of Ray's autoscaling
    coordinator (an actor of Ray Data's), which looks at the cluster every 20 s (`TICK_INTERVAL_S`). So after a
    node is lost the controller first tries a group of the old size, which cannot start, until the worker-group
    start timeout (`RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`, 60 s by default); and a node that joins is seen up to
    20 s late. The coordinator recomputes its view on demand (`get_reserved_resources(recompute=True)`, which Ray
    offers to callers that must not pin a dead node): this asks for that before each restart or resize decision
    of a group that is not running, and every `every_s` while one runs (the policy's own resize checks run every
    `train.resize_every_minutes`)."""

    REQUESTER = "transformer-fresh-cluster-view"  # the coordinator ticks for any caller; this one reserves nothing

    def __init__(self, every_s: float):
        self.every_s = every_s
        self._stop: threading.Event | None = None  # made in the controller: the callback is pickled to it

    def refresh(self) -> None:
        # Ray's private API (pinned with Ray in requirements.lock): a failure here only leaves Ray's own 20 s view.
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )

        try:
            coordinator = get_or_create_autoscaling_coordinator()
            ray.get(coordinator.get_reserved_resources.remote(self.REQUESTER, recompute=True), timeout=5)
        except Exception as e:  # noqa: BLE001 - a stale view costs seconds, never the run
            logger.warning("could not refresh the autoscaling coordinator's view of the cluster: %s", e)

    def after_controller_start(self, train_run_context) -> None:
        stop = self._stop = threading.Event()

        def loop() -> None:
            while not stop.wait(self.every_s):
                self.refresh()

        threading.Thread(target=loop, name="fresh-cluster-view", daemon=True).start()

    def after_controller_state_update(self, previous_state, current_state) -> None:
        if isinstance(current_state, (RestartingState, ReschedulingState)):
            self.refresh()  # the next step decides the new group's size from this view

    async def before_controller_shutdown(self) -> None:
        if self._stop is not None:
            self._stop.set()


class WorkersUnavailable(RunCannotContinue):
    """The run waited `train.wait_for_workers_minutes` for its minimum number of workers."""


class WaitLimit(ControllerCallback):
    """In the controller: end the run once it has waited `limit_s` without a running worker group (at the start,
    or after losing nodes). Ray would otherwise wait for ever (elastic) or retry the start for ever (fixed size)."""

    def __init__(self, limit_s: float, wanted: str):
        self.limit_s, self.wanted = limit_s, wanted
        self.since: float | None = None

    def after_controller_state_update(self, previous_state, current_state) -> None:
        if not isinstance(current_state, WAITING):
            self.since = None
            return
        now = time.monotonic()
        self.since = now if self.since is None else self.since
        if now - self.since > self.limit_s:
            raise WorkersUnavailable(self.message(now - self.since))

    def message(self, waited_s: float) -> str:
        keys = ("CPU", "GPU")
        free, total = ray.available_resources(), ray.cluster_resources()
        nodes = sum(1 for n in ray.nodes() if n["Alive"])
        have = ", ".join(f"{k} {free.get(k, 0):g} free of {total.get(k, 0):g}" for k in keys)
        return (
            f"waited {waited_s / 60:.1f} minutes (train.wait_for_workers_minutes) for {self.wanted}; the cluster has "
            f"{have} on {nodes} alive node(s). Add nodes, or lower the minimum of train.workers"
        )


def wanted(scaling_config: ray.train.ScalingConfig, workers) -> str:
    """What the run waits for, in words: 'at least 2 workers of {'CPU': 1} each (train.workers: [2, 2])'."""
    spec = list(workers) if isinstance(workers, tuple) else workers
    least, each = scaling_config.min_workers, scaling_config.resources_per_worker
    return f"at least {least} worker(s) of {each} each (train.workers: {spec})"


# --- the record of worker-group starts (rank 0 writes, the driver reads) ---


def read_attempts(fs: pyarrow.fs.FileSystem, experiment_path: str) -> list[dict]:
    """Every start's record, in order."""
    selector = pyarrow.fs.FileSelector(f"{experiment_path}/{ATTEMPTS_FOLDER}", allow_not_found=True)
    names = sorted(i.path for i in fs.get_file_info(selector) if i.base_name.endswith(".json"))
    records = []
    for name in names:
        with fs.open_input_stream(name) as f:
            records.append(json.loads(f.read()))
    return records


class AttemptLog:
    """Rank 0's record of this worker-group start, rewritten as the group makes progress."""

    def __init__(self, fs: pyarrow.fs.FileSystem, experiment_path: str, record: dict, previous: list[dict]):
        self.fs, self.folder, self.record, self.previous = fs, f"{experiment_path}/{ATTEMPTS_FOLDER}", record, previous
        self.fs.create_dir(self.folder, recursive=True)
        self.write()

    @classmethod
    def start(cls, storage, workers: int, idle: int, state: dict | None) -> AttemptLog:
        """Record a start of `workers` workers (`idle` idle passes per update) resuming from `state` (None: fresh)."""
        fs, path = storage.storage_filesystem, storage.experiment_fs_path
        previous = read_attempts(fs, path)
        update = None if state is None else state["update"]
        record = {
            "attempt": len(previous) + 1,
            "workers": workers,
            "idle_passes": idle,
            "started_at": time.time(),
            "resumed_from": update,
            "checkpoint_saved_at": None if state is None else state.get("saved_at"),
            "reached": update or 0,
        }
        return cls(fs, path, record, previous)

    def write(self) -> None:
        final = f"{self.folder}/attempt_{self.record['attempt']:04d}.json"
        with self.fs.open_output_stream(final + ".tmp") as f:
            f.write(json.dumps(self.record).encode())
        self.fs.move(final + ".tmp", final)

    def reached(self, update: int) -> None:
        self.record["reached"] = update
        self.write()

    def line(self, micro_per_update: int) -> str:
        """The stdout line of this start: size, idle passes, and what the restart or resize cost."""
        r = self.record
        head = f"worker group start {r['attempt']}: {r['workers']} worker(s), {micro_per_update} micro-batches per "
        head += f"update, {r['idle_passes']} idle pass(es) per update"
        if not self.previous:
            return head
        before = self.previous[-1]["workers"]
        kind = "restart" if before == r["workers"] else f"resize {before} -> {r['workers']} workers"
        updates, seconds = lost(self.previous[-1], r)
        return f"{head}; {kind}: {updates} update(s) and {seconds:.1f} s lost since the checkpoint resumed from"

    def sizes(self) -> list[int]:
        return [p["workers"] for p in self.previous] + [self.record["workers"]]


def lost(before: dict, after: dict) -> tuple[int, float]:
    """Updates redone and wall time lost by the start `after` that followed `before`: everything since the checkpoint
    it resumed from (or, resuming from none, since `before` started)."""
    updates = max(0, before["reached"] - (after["resumed_from"] or 0))
    since = after["checkpoint_saved_at"] or before["started_at"]
    return updates, max(0.0, after["started_at"] - since)


def summarise(records: list[dict]) -> dict:
    """The run's history of sizes, for metrics/train.json (empty without records)."""
    if not records:
        return {}
    sizes = [r["workers"] for r in records]
    costs = [lost(a, b) for a, b in pairwise(records)]
    return {
        "worker_group_starts": len(records),
        "restarts": len(records) - 1,
        "resizes": sum(a != b for a, b in pairwise(sizes)),
        "worker_sizes": sizes,
        "worker_counts_seen": sorted(set(sizes)),
        "updates_lost": sum(u for u, _ in costs),
        "seconds_lost": round(sum(s for _, s in costs), 1),
    }
