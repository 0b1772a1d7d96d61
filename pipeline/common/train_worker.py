"""The function every Ray Train worker runs: build the typed configs, fetch the data from the object store,
hand the loop to `transformer.training.Trainer` and plug Ray and MLflow in through `Hooks`.

Ray appears in a handful of calls: `get_context`, `get_checkpoint`, `prepare_model`, `get_device`, `report`.
Rank 0 logs to MLflow (batched) and writes checkpoints; every rank reports, because `ray.train.report` is a
barrier. Resume: `get_checkpoint()` is whatever Ray hands back (the newest registered checkpoint, or after a
hard death the one before it); the data position and everything else come from inside that checkpoint.
"""

from __future__ import annotations

import io
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pyarrow.fs
import ray
import ray.train
import ray.train.torch
import sentencepiece as spm
import torch
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from pipeline.common.inspection import Sample, inspect_model, log_inspection
from transformer.batching import PackedCorpus
from transformer.checkpoint import load
from transformer.model import TransformerConfig
from transformer.training import Hooks, Step, Trainer, TrainingConfig

CHECKPOINT_FILE = "checkpoint.pt"
SNAPSHOT_FOLDER = "snapshots"  # in the run's storage: snapshots/snapshot_<update>.pt
TRAIN_METRICS = ("loss", "nll", "ppl", "lr", "tokens_per_s", "grad_norm", "skipped")
VALID_METRICS = ("valid_loss", "valid_nll", "valid_ppl")


class InjectedCrash(RuntimeError):
    """Raised once by one worker when `train.crash_at_update` is set (fault-injection tests)."""


class RayHooks(Hooks):
    def __init__(
        self,
        rank: int,
        world_size: int,
        tracking_uri: str | None,
        run_id: str | None,
        crash_at: int | None,
        inspect: dict | None = None,
    ):
        self.rank, self.world_size, self.crash_at = rank, world_size, crash_at
        self.client = MlflowClient(tracking_uri) if (rank == 0 and run_id) else None
        self.run_id = run_id
        self.inspector = Inspector(inspect, tracking_uri, run_id) if (inspect and self.client is not None) else None

    def log(self, record: dict, keys: tuple[str, ...]) -> None:
        if self.client is None:
            return
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(record[k]), now, int(record["update"])) for k in keys if k in record]
        self.client.log_batch(self.run_id, metrics=metrics, synchronous=True)

    def on_log(self, trainer: Trainer, record: dict) -> None:
        self.log(record, TRAIN_METRICS)

    def on_validate(self, trainer: Trainer, record: dict) -> None:
        self.log(record, VALID_METRICS)
        if self.inspector is not None:
            self.inspector.log(trainer.module, trainer.update)

    def close(self) -> None:
        if self.inspector is not None:
            self.inspector.close()

    def on_update(self, trainer: Trainer, step: Step) -> None:
        mine = self.crash_at is not None and trainer.update == self.crash_at and self.rank == self.world_size - 1
        if mine and claim_crash(self.crash_at):
            raise InjectedCrash(f"injected crash at update {self.crash_at} (train.crash_at_update)")

    def on_checkpoint(self, trainer: Trainer, state: dict | None, metrics: dict) -> None:
        name = f"checkpoint_{trainer.update:08d}"
        with tempfile.TemporaryDirectory(prefix="ckpt-") as tmp:
            checkpoint = None
            if state is not None:
                torch.save(state, Path(tmp) / CHECKPOINT_FILE)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)

    def on_snapshot(self, trainer: Trainer, snapshot: dict | None) -> None:
        if snapshot is not None:
            write_snapshot(snapshot)


class Inspector:
    """Rank 0's look inside the model at each validation (pipeline/common/inspection.py): attention grids and greedy
    translations of the fixed validation sentences the driver chose. The maps are taken at once, from the
    weights of this update; drawing and uploading (seconds) run in a background thread, because on a GPU
    node every other rank would wait for rank 0 at the next all-reduce meanwhile."""

    def __init__(self, config: dict, tracking_uri: str | None, run_id: str):
        self.sp = spm.SentencePieceProcessor(model_proto=config["spm"])
        self.samples = [Sample(source, reference) for source, reference in config["samples"]]
        self.client, self.run_id = MlflowClient(tracking_uri), run_id  # the thread's own client
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inspection")
        self.pending: list[Future] = []

    def log(self, model: torch.nn.Module, update: int) -> None:
        found = inspect_model(model, self.sp, self.samples)
        self.pending.append(self.pool.submit(log_inspection, self.client, self.run_id, found, update))

    def close(self) -> None:
        """Wait for what is still being drawn; a failure to draw or upload costs the pictures, not the run."""
        for future in self.pending:
            try:
                future.result()
            except Exception as e:  # noqa: BLE001 - any failure here must not fail a finished training run
                print(f"warning: attention grids or sample translations not logged to MLflow: {e!r}", flush=True)
        self.pool.shutdown()


def snapshot_folder(experiment_fs_path: str) -> str:
    """One folder per Ray run: a resumed run's clock goes on from its checkpoint's (`elapsed_s`), so the snapshots
    of every stage start that trained this run are marks on one clock, and the curve keeps all of them."""
    return f"{experiment_fs_path}/{SNAPSHOT_FOLDER}"


def write_snapshot(snapshot: dict) -> None:
    """Rank 0 writes through Ray's storage filesystem (local, NFS or s3://), then renames: never half a file."""
    storage = ray.train.get_context().get_storage()
    fs, folder = storage.storage_filesystem, snapshot_folder(storage.experiment_fs_path)
    buf = io.BytesIO()
    torch.save(snapshot, buf)
    fs.create_dir(folder, recursive=True)
    final = f"{folder}/snapshot_{snapshot['update']:08d}.pt"
    with fs.open_output_stream(final + ".tmp") as f:
        f.write(buf.getvalue())
    fs.move(final + ".tmp", final)


def drop_snapshots_after(fs: pyarrow.fs.FileSystem, folder: str, update: int) -> list[str]:
    """Delete the snapshots (and unfinished .tmp copies) taken after `update`, the update a run (re)starts from.

    They come from the stretch a crash lost: the resumed run trains it again, on a clock rewound to its checkpoint's,
    so kept they would give the curve a second point for the same minute marks. Returns the names deleted.
    """
    infos = fs.get_file_info(pyarrow.fs.FileSelector(folder, allow_not_found=True))
    dropped = []
    for info in infos:
        name = info.base_name
        if not name.startswith("snapshot_"):
            continue
        if name.endswith(".tmp") or int(name.removeprefix("snapshot_").split(".")[0]) > update:
            fs.delete_file(info.path)
            dropped.append(name)
    return sorted(dropped)


def claim_crash(update: int) -> bool:
    """True the first time in this run's storage: a restarted worker must not crash again at the same update."""
    storage = ray.train.get_context().get_storage()
    fs, path = storage.storage_filesystem, f"{storage.experiment_fs_path}/injected_crash_{update}"
    if fs.get_file_info(path).type.name != "NotFound":
        return False
    with fs.open_output_stream(path) as f:
        f.write(b"1")
    return True


def restored_state() -> dict | None:
    """The newest complete training state of this run: Ray's registered checkpoint, or a newer one on disk.

    A process killed hard just after persisting a checkpoint leaves it in storage before Ray's controller has
    registered it, and Ray then hands back the one before (or none). Every rank scans the same storage, so all
    ranks agree on the state; the data position comes from inside it.
    """
    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = load(Path(folder) / CHECKPOINT_FILE)  # on CPU: RNG states must stay there
    newer = newest_state_in_storage(after=-1 if state is None else state["update"])
    return newer if newer is not None else state


def newest_state_in_storage(after: int) -> dict | None:
    """The newest loadable `checkpoint_*/checkpoint.pt` of this run with an update count above `after`."""
    storage = ray.train.get_context().get_storage()
    fs = storage.storage_filesystem
    selector = pyarrow.fs.FileSelector(storage.experiment_fs_path, allow_not_found=True)
    folders = sorted(
        (
            info.path
            for info in fs.get_file_info(selector)
            if info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith("checkpoint_")
        ),
        reverse=True,
    )
    for folder in folders:  # names end in the zero-padded update count: newest first
        try:
            with fs.open_input_file(f"{folder}/{CHECKPOINT_FILE}") as f:
                state = load(io.BytesIO(f.read()))
        except (OSError, ValueError):
            continue  # missing or incomplete copy: fall back to an older one
        return state if state["update"] > after else None
    return None


def worker_nodes(world_size: int) -> list[str]:
    """The Ray node id of every rank, in rank order (where the workers actually ran)."""
    node = ray.get_runtime_context().get_node_id()
    if world_size == 1:
        return [node]
    nodes: list[str | None] = [None] * world_size
    torch.distributed.all_gather_object(nodes, node)
    return [str(n) for n in nodes]


def train_loop_per_worker(config: dict) -> dict:
    """Ray Train's per-worker entry point; `config` holds plain values and object refs only."""
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    train_data = PackedCorpus.from_arrays(ray.get(config["train_ref"]))
    valid_data = PackedCorpus.from_arrays(ray.get(config["valid_ref"])) if config["valid_ref"] is not None else None

    def wrap(module: torch.nn.Module) -> torch.nn.Module:
        return ray.train.torch.prepare_model(module, move_to_device=False)

    trainer = Trainer(
        TransformerConfig(**config["model"]),
        TrainingConfig(**config["training"]),
        train_data,
        valid_data,
        device,
        wrap=wrap if world_size > 1 else None,
    )
    state = restored_state()
    if state is not None:
        trainer.load_state_dict(state)
        if rank == 0:
            print(
                f"resumed from update {trainer.update} (epoch {trainer.position.epoch}, batch "
                f"{trainer.position.index}) at minute {trainer.clock() / 60:.1f} of the run's clock",
                flush=True,
            )
    if rank == 0:  # only rank 0 writes snapshots
        storage = ctx.get_storage()
        folder = snapshot_folder(storage.experiment_fs_path)
        drop_snapshots_after(storage.storage_filesystem, folder, 0 if state is None else state["update"])
    hooks = RayHooks(
        rank, world_size, config["tracking_uri"], config["run_id"], config["crash_at_update"], config.get("inspect")
    )
    try:
        summary = trainer.fit(hooks)
    finally:
        hooks.close()
    summary["resumed_from"] = None if state is None else state["update"]
    summary["worker_nodes"] = worker_nodes(world_size)
    return {"summary": summary, "history": trainer.history}
