"""What one training checkpoint costs the run: how long the training step is stopped while it is written.

    python -m tools.checkpoint_cost                 # the paper's base model (vocabulary 37,000), 3 checkpoints
    python -m tools.checkpoint_cost --arch big --repeats 1

It goes through the code a Ray Train worker runs: `Trainer.checkpoint` (finite-weights check, `state_dict()`)
calling `RayHooks.on_checkpoint` (torch.save into a temporary folder, `ray.train.report`, the folder removed).
Only `ray.train.report` is replaced, by the part of it that moves data in Ray 2.60's default SYNC mode: Ray's own
`_pyarrow_fs_copy_files` of the folder into the run's storage, here a local folder (as `train.storage_path:
runs/ray`). Not measured: report's barrier across ranks (no data) and uploads to s3://, which take longer.

Nothing is written in the background today, so the step is stopped for the whole of it. Printed separately:
  state    finite check + state_dict()                  (references, no copy)
  save     torch.save to the local temporary folder      (with CheckpointUploadMode.ASYNC the step would
                                                          wait for state + save only)
  persist  Ray's copy into storage                       (the part ASYNC moves to a thread)
  cleanup  the temporary folder removed
The Adam state exists because one update is trained first (tiny synthetic batch); the writes land in the page
cache, as they do in a run (neither torch.save here nor Ray's copy calls fsync). Wall time is what the step loses;
the process's CPU time is printed beside it because on a shared machine the wall time grows with the load.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from pipeline.common.train_worker import CHECKPOINT_FILE, RayHooks
from transformer.batching import PackedCorpus
from transformer.model import make_config
from transformer.training import Hooks, Trainer, TrainingConfig

PHASES = ("state", "save", "persist", "cleanup")


def synthetic_corpus(vocab: int, pairs: int = 32, length: int = 16) -> PackedCorpus:
    rng = np.random.default_rng(1)
    return PackedCorpus.from_pairs(
        [(rng.integers(4, vocab, length), rng.integers(4, vocab, length)) for _ in range(pairs)]
    )


def trained_one_update(arch: str, vocab: int) -> Trainer:
    """A Trainer of the real model after one applied update, so that the optimiser holds both Adam moments."""
    cfg = TrainingConfig(
        update_tokens=512, max_tokens=512, max_updates=1, checkpoint_every_minutes=None,
        checkpoint_every_updates=10**9, validate_every_updates=10**9, log_every_updates=10**9,
    )  # fmt: skip
    trainer = Trainer(make_config(arch, vocab), cfg, synthetic_corpus(vocab))
    trainer.fit(Hooks())
    return trainer


def measure(trainer: Trainer, storage: Path) -> dict[str, float]:
    """One checkpoint through Trainer.checkpoint -> RayHooks.on_checkpoint; seconds per phase."""
    marks: dict[str, float] = {}
    cpu_start = time.process_time()
    state_dict = trainer.state_dict

    def timed_state_dict() -> dict:
        state = state_dict()
        marks["state"] = time.perf_counter()
        return state

    def persist(metrics: dict, checkpoint=None, checkpoint_dir_name: str | None = None) -> None:
        from ray.train.v2._internal.execution.storage import _pyarrow_fs_copy_files

        marks["save"] = time.perf_counter()
        destination = storage / checkpoint_dir_name
        destination.mkdir(parents=True)
        _pyarrow_fs_copy_files(checkpoint.path, str(destination))
        marks["persist"] = time.perf_counter()
        marks["bytes"] = (destination / CHECKPOINT_FILE).stat().st_size

    hooks = RayHooks(rank=0, world_size=1, tracking_uri=None, run_id=None)
    with (
        mock.patch.object(trainer, "state_dict", timed_state_dict),
        mock.patch("ray.train.report", persist),
    ):
        start = time.perf_counter()
        trainer.checkpoint(hooks)
        end = time.perf_counter()
    cpu = time.process_time() - cpu_start
    bounds = [start, marks["state"], marks["save"], marks["persist"], end]
    seconds = {phase: bounds[i + 1] - bounds[i] for i, phase in enumerate(PHASES)}
    return seconds | {"blocked": end - start, "cpu": cpu, "bytes": marks["bytes"]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="base", help="model preset of transformer/model.py (base, big, ...)")
    ap.add_argument("--vocab", type=int, default=37_000, help="BPE vocabulary (conf/config.yaml: 37,000)")
    ap.add_argument("--repeats", type=int, default=3, help="checkpoints written; the median is printed")
    ap.add_argument("--storage", type=Path, help="where the copies go (default: a temporary folder, removed)")
    args = ap.parse_args(argv)

    trainer = trained_one_update(args.arch, args.vocab)
    params = sum(p.numel() for p in trainer.module.parameters())
    storage = args.storage or Path(tempfile.mkdtemp(prefix="checkpoint-cost-"))
    try:
        runs = []
        for i in range(args.repeats):
            trainer.update += 1  # a new checkpoint_<update> folder each time, as in a run
            runs.append(measure(trainer, storage))
            line = "  ".join(f"{k} {runs[-1][k]:.2f} s" for k in (*PHASES, "blocked", "cpu"))
            print(f"checkpoint {i + 1}: {line}", flush=True)
    finally:
        if args.storage is None:
            shutil.rmtree(storage, ignore_errors=True)
    med = {k: statistics.median(r[k] for r in runs) for k in (*PHASES, "blocked", "cpu")}
    size = runs[0]["bytes"] / 2**20
    print(
        f"{args.arch}: {params / 1e6:.1f}M parameters + Adam state, checkpoint {size:,.0f} MiB, "
        f"{torch.get_num_threads()} threads, 1-min load average {os.getloadavg()[0]:.1f}, median of {len(runs)}:\n"
        f"  step stopped for {med['blocked']:.2f} s (state {med['state']:.2f} + save {med['save']:.2f} + "
        f"persist {med['persist']:.2f} + cleanup {med['cleanup']:.2f}), CPU time {med['cpu']:.2f} s; "
        f"with ASYNC upload it would be {med['state'] + med['save']:.2f} s"
    )


if __name__ == "__main__":
    main()
