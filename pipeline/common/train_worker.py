"""The function every Ray Train worker runs: build the typed configs, fetch the data from the object store,
hand the loop to `transformer.training.Trainer` and plug Ray and MLflow in through `Hooks`.

Ray appears in a handful of calls: `get_context`, `get_checkpoint`, `prepare_model`, `get_device`, `report`.
Rank 0 logs to MLflow (batched) and writes checkpoints; every rank reports, because `ray.train.report` is a
barrier. Resume: from the newest *intact* checkpoint in the run's storage, which is the one `get_checkpoint()`
hands back or a newer one (after a hard death Ray hands back the one before); a corrupt or half-written one is
skipped with a line saying so. The data position and everything else come from inside the checkpoint, so a
group of another size (elastic training, pipeline/common/elastic.py) continues the same trajectory. Errors that
a restart cannot fix end the run at once (pipeline/common/failures.py).
"""

from __future__ import annotations

import io
import sys
import tempfile
import time
from collections.abc import Iterator
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

from pipeline.common.elastic import AttemptLog
from pipeline.common.failures import RunCannotContinue, cannot_continue, storage_errors
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
    """Raised once by one worker at the update TRANSFORMER_TEST_CRASH_AT_UPDATE names (fault-injection tests)."""


class RayHooks(Hooks):
    def __init__(
        self,
        rank: int,
        world_size: int,
        tracking_uri: str | None,
        run_id: str | None,
        faults: dict[str, int | None] | None = None,
        inspect: dict | None = None,
        attempt: AttemptLog | None = None,
    ):
        self.rank, self.world_size = rank, world_size
        self.crash_at, self.hang_at = (faults or {}).get("crash"), (faults or {}).get("hang")
        self.client = MlflowClient(tracking_uri) if (rank == 0 and run_id) else None
        self.run_id = run_id
        self.inspector = Inspector(inspect, tracking_uri, run_id) if (inspect and self.client is not None) else None
        self.attempt = attempt  # rank 0's record of this worker-group start

    def log_start(self, update: int) -> None:
        """The size of this group in MLflow: metric `workers` at the update it starts from, tag `worker_sizes`."""
        if self.client is None or self.attempt is None:
            return
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric("workers", self.world_size, now, update)], synchronous=True)
        self.client.set_tag(self.run_id, "worker_sizes", " -> ".join(map(str, self.attempt.sizes())))

    def log(self, record: dict, keys: tuple[str, ...]) -> None:
        if self.client is None:
            return
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(record[k]), now, int(record["update"])) for k in keys if k in record]
        self.client.log_batch(self.run_id, metrics=metrics, synchronous=True)

    def on_log(self, trainer: Trainer, record: dict) -> None:
        self.log(record, TRAIN_METRICS)
        if self.attempt is not None:
            self.attempt.reached(trainer.update)

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
            raise InjectedCrash(f"injected crash at update {self.crash_at} (TRANSFORMER_TEST_CRASH_AT_UPDATE)")

    def on_checkpoint(self, trainer: Trainer, state: dict | None, metrics: dict) -> None:
        name = f"checkpoint_{trainer.update:08d}"
        storage = ray.train.get_context().get_storage()
        with tempfile.TemporaryDirectory(prefix="ckpt-") as tmp:
            checkpoint = None
            if state is not None:
                state["saved_at"] = time.time()  # what a restart from it loses is counted from here
                with storage_errors(f"{name} (local copy)", str(Path(tmp) / CHECKPOINT_FILE)):
                    torch.save(state, Path(tmp) / CHECKPOINT_FILE)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            with storage_errors(name, f"{storage.experiment_fs_path}/{name}"):
                ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
        if self.attempt is not None:
            self.attempt.reached(trainer.update)
        if trainer.update == self.hang_at:
            print(f"hanging after the checkpoint at update {trainer.update} (TRANSFORMER_TEST_HANG_AT_UPDATE)")
            sys.stdout.flush()
            while True:  # until the test kills the stage
                time.sleep(1)

    def on_snapshot(self, trainer: Trainer, snapshot: dict | None) -> None:
        if snapshot is not None:
            storage = ray.train.get_context().get_storage()
            with storage_errors(f"snapshot at update {trainer.update}", snapshot_folder(storage.experiment_fs_path)):
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


def restored_state(rank: int) -> tuple[dict, str] | None:
    """The newest intact training state of this run and its path: Ray's registered checkpoint, or a newer one.

    A process killed hard just after persisting a checkpoint leaves it in storage before Ray's controller has
    registered it, and Ray then hands back the one before (or none); a node lost while its rank 0 wrote one leaves
    it truncated. Every rank scans the same storage, so all ranks agree on the state.
    """
    storage = ray.train.get_context().get_storage()
    found, skipped = newest_intact_state(storage.storage_filesystem, storage.experiment_fs_path)
    for line in skipped if rank == 0 else []:
        print(line, flush=True)
    registered = ray.train.get_checkpoint()
    if found is None and registered is not None:
        raise RunCannotContinue(
            f"Ray registered the checkpoint {registered.path}, but no checkpoint of this run in "
            f"{storage.experiment_fs_path} can be read; delete that folder to start over"
        )
    return found


def intact_states(fs: pyarrow.fs.FileSystem, folder: str) -> Iterator[tuple[dict, str] | str]:
    """Every `checkpoint_*/checkpoint.pt` under `folder`, newest first: (state, path) for each loadable one and a
    line for each that is not (missing or truncated: never resumed from, never kept)."""
    selector = pyarrow.fs.FileSelector(folder, allow_not_found=True)
    folders = sorted(
        (
            info.path
            for info in fs.get_file_info(selector)
            if info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith("checkpoint_")
        ),
        reverse=True,
    )
    for checkpoint in folders:  # names end in the zero-padded update count: newest first
        path = f"{checkpoint}/{CHECKPOINT_FILE}"
        try:
            with fs.open_input_file(path) as f:
                state = load(io.BytesIO(f.read()))  # on CPU: RNG states must stay there
        except (OSError, ValueError) as e:  # missing, or not a complete checkpoint
            problem = "missing" if isinstance(e, FileNotFoundError) else str(e).partition(": ")[2] or str(e)
            yield f"checkpoint {path} is corrupt or half-written ({problem})"
            continue
        yield state, path


def newest_intact_state(fs: pyarrow.fs.FileSystem, folder: str) -> tuple[tuple[dict, str] | None, list[str]]:
    """The newest loadable `checkpoint_*/checkpoint.pt` under `folder` and its path, and a line for each newer one
    that could not be read."""
    skipped = []
    for found in intact_states(fs, folder):
        if not isinstance(found, str):
            return found, skipped
        skipped.append(f"{found}: skipped for the one before it")
    return None, skipped


def resume(trainer: Trainer, found: tuple[dict, str] | None, rank: int) -> dict | None:
    """Load `found` into `trainer`; a checkpoint of another configuration ends the run, naming its path."""
    if found is None:
        return None
    state, path = found
    try:
        trainer.load_state_dict(state)
    except (KeyError, ValueError, RuntimeError) as e:
        raise RunCannotContinue(
            f"cannot resume from {path}: {e!r}. It was written with other params (model.*, train.ema_decay); "
            "change train.run_name or delete the run's folder in train.storage_path to start over"
        ) from e
    if rank == 0:
        print(
            f"resumed from update {trainer.update} (epoch {trainer.position.epoch}, batch "
            f"{trainer.position.index}) at minute {trainer.clock() / 60:.1f} of the run's clock",
            flush=True,
        )
    return state


def worker_nodes(world_size: int) -> list[str]:
    """The Ray node id of every rank, in rank order (where the workers actually ran)."""
    node = ray.get_runtime_context().get_node_id()
    if world_size == 1:
        return [node]
    nodes: list[str | None] = [None] * world_size
    torch.distributed.all_gather_object(nodes, node)
    return [str(n) for n in nodes]


def train_loop_per_worker(config: dict) -> dict:
    """Ray Train's per-worker entry point; `config` holds plain values and object refs only. An error a restart
    cannot fix leaves as RunCannotContinue, which ends the run (failures.FailFast); any other is retried."""
    try:
        return train(config)
    except Exception as e:
        fatal = cannot_continue(e, config["training"])
        if fatal is None or fatal is e:
            raise
        raise fatal from e


def train(config: dict) -> dict:
    marks = {"worker_entered": time.time()}  # milestones, on this node's clock (the stage's, locally)
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    train_data = PackedCorpus.from_arrays(ray.get(config["train_ref"]))
    valid_data = PackedCorpus.from_arrays(ray.get(config["valid_ref"])) if config["valid_ref"] is not None else None
    marks["data_fetched"] = time.time()

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
    state = resume(trainer, restored_state(rank), rank)
    attempt = None
    if rank == 0:  # only rank 0 writes snapshots and the record of this start
        storage = ctx.get_storage()
        folder = snapshot_folder(storage.experiment_fs_path)
        drop_snapshots_after(storage.storage_filesystem, folder, 0 if state is None else state["update"])
        attempt = AttemptLog.start(storage, world_size, trainer.plan.idle_slots(world_size), state)
        print(attempt.line(trainer.plan.micro_per_update), flush=True)
    hooks = RayHooks(
        rank, world_size, config["tracking_uri"], config["run_id"], config["faults"], config.get("inspect"),
        attempt,
    )  # fmt: skip
    hooks.log_start(trainer.update)
    marks["trainer_ready"] = time.time()
    try:
        summary = trainer.fit(hooks)
        marks["loop_done"] = time.time()
    finally:
        hooks.close()
    summary["resumed_from"] = None if state is None else state["update"]
    summary["worker_nodes"] = worker_nodes(world_size)
    marks["worker_done"] = time.time()
    summary["marks"] = marks
    return {"summary": summary, "history": trainer.history}
