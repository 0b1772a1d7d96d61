"""Rehearse elastic training on a simulated cluster: the train stage with `train.workers: [1, 3]` on three Ray nodes
of 1 CPU (`ray.cluster_utils.Cluster`, one machine), one node removed and added back twice while it trains.

    python -m tools.elastic_rehearsal [--work /tmp/elastic-rehearsal] [--updates 60]

A tiny model (d_model 32, one layer each side, dropout 0.1) on a synthetic copy task of 64 pairs, 3 micro-batches
per update (update_tokens 180, max_tokens 60), lr_factor 0.25 (at 1.0 this tiny task trains chaotically and any
rounding difference grows to 1e-1 in 60 updates), a checkpoint at every update (each report waits for Ray's 2 s
poll, which paces the run). The stage runs in a subprocess joined to the cluster through RAY_ADDRESS; this
process changes the cluster (`Cluster.add_node` must run in the main thread). At the end it prints the timeline
of worker-group starts from the run's own records (pipeline/common/elastic.py): size, updates trained, updates
and seconds lost to each change, the updates trained per size, and the largest difference of the final weights
from one uninterrupted worker trained in this process, beside what rounding alone does: the same worker again
with one weight nudged by 1e-7 after its first update. The attention key biases are left out of both: their
gradient is zero in exact arithmetic, so their values are rounding noise. Takes 5-12 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from transformer.training import Hooks

REPO = Path(__file__).resolve().parents[1]
VOCAB = 40
MODEL = {"arch": "tiny", "d_model": 32, "d_ff": 64, "heads": 2, "encoder_layers": 1, "decoder_layers": 1,
         "dropout": 0.1}  # fmt: skip
TRAIN = {
    "update_tokens": 180, "max_tokens": 60, "warmup": 2, "checkpoint_every_minutes": None,
    "checkpoint_every_updates": 1, "keep_checkpoints": 2, "validate_every_updates": 10, "log_every_updates": 1,
    "workers": [1, 3], "cpus_per_worker": 1, "resize_every_minutes": 0.05, "max_failures": 10,
    "inspect_sentences": 0, "storage_path": "runs/ray", "lr_factor": 0.25,
}  # fmt: skip


def make_project(work: Path, updates: int) -> Path:
    """params.yaml, a binarised synthetic corpus (target = source + 1) and an MLflow store, in `work`."""
    from mlflow.tracking import MlflowClient

    from transformer.corpus import SideWriter, write_meta
    from transformer.model import EOS_ID

    shutil.rmtree(work, ignore_errors=True)
    (work / "data/bin").mkdir(parents=True)
    params = {"model": MODEL, "train": {**TRAIN, "max_updates": updates}, "mlflow": {"experiment": "rehearsal"}}
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    sizes = {"train": 64, "valid": 16, "test": 8}
    for seed, (split, n) in enumerate(sizes.items()):
        rng = np.random.default_rng(seed)
        sources = [rng.integers(4, VOCAB, rng.integers(2, 10)).tolist() + [EOS_ID] for _ in range(n)]
        pairs = [(s, [(t + 1) % VOCAB or 4 for t in s[:-1]] + [EOS_ID]) for s in sources]
        for lang, side in (("en", 0), ("de", 1)):
            writer = SideWriter(work / "data/bin", split, lang, "uint16")
            seqs = [np.array(p[side]) for p in pairs]
            writer.append(np.concatenate(seqs), np.array([len(s) for s in seqs]))
            writer.close()
    meta = {"vocab_size": VOCAB, "dtype": "uint16", "langs": {"source": "en", "target": "de"}, "splits": sizes}
    write_meta(work / "data/bin", meta)
    MlflowClient(f"sqlite:///{work}/mlflow.db").create_experiment("rehearsal", (work / "mlruns").as_uri())
    return work


def attempts(work: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(work.glob("runs/ray/*/attempts/attempt_*.json"))]


def wait_until(work: Path, workers: int, updates: int, proc: subprocess.Popen, what: str) -> None:
    """Until the newest worker group has `workers` workers and has trained `updates` updates."""
    deadline = time.time() + 600
    while True:
        seen = attempts(work)
        if seen and seen[-1]["workers"] == workers and seen[-1]["reached"] - (seen[-1]["resumed_from"] or 0) >= updates:
            print(f"[{time.strftime('%H:%M:%S')}] {what}", flush=True)
            return
        if proc.poll() is not None or time.time() > deadline:
            raise SystemExit(f"the run ended or stalled before {what}: see {work}/stage.log")
        time.sleep(0.5)


def rehearse(work: Path) -> None:
    """Run the stage on three nodes; remove one and add it back, twice."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": cluster.address,
               "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db",
               # Were Ray's view of the cluster stale (pipeline.common.elastic.FreshClusterView), the old size first.
               "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10"}  # fmt: skip
        cmd = [sys.executable, "-m", "pipeline.train", "--data", "data/bin", "--out", "models/checkpoints"]
        with open(work / "stage.log", "w") as log:
            proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(work, 3, 3, proc, "3 workers at work: removing a node")
            for round_ in (1, 2):
                cluster.remove_node(nodes.pop())
                wait_until(work, 2, 2, proc, f"2 workers at work: adding a node back ({round_} of 2)")
                nodes.append(cluster.add_node(num_cpus=1))
                wait_until(work, 3, 1, proc, "3 workers at work again" + (": removing a node" if round_ == 1 else ""))
            if proc.wait(timeout=900) != 0:
                raise SystemExit(f"the stage failed: see {work}/stage.log")
        finally:
            if proc.poll() is None:
                proc.kill()
    finally:
        cluster.shutdown()


def timeline(work: Path) -> None:
    from pipeline.common.elastic import lost

    records = attempts(work)
    t0 = records[0]["started_at"]
    print("| start | at s | workers | idle passes/update | from update | to update | trained | lost updates | lost s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    per_size: dict[int, int] = {}
    for i, r in enumerate(records):
        start = r["resumed_from"] or 0
        per_size[r["workers"]] = per_size.get(r["workers"], 0) + r["reached"] - start
        updates, seconds = lost(records[i - 1], r) if i else ("-", "-")
        cost = f"{updates} | {seconds:.1f}" if i else "- | -"
        row = [r["attempt"], f"{r['started_at'] - t0:.0f}", r["workers"], r["idle_passes"], start, r["reached"]]
        print("| " + " | ".join(map(str, row)) + f" | {r['reached'] - start} | {cost} |")
    print("updates trained per size (redone ones included):", dict(sorted(per_size.items())))


class Nudge(Hooks):
    """Add 1e-7 to one weight after the first update: how far a rounding difference alone moves the run."""

    def on_update(self, trainer, step) -> None:
        if trainer.update == 1:
            with torch.no_grad():
                trainer.module.embed.weight[5, 3] += 1e-7


def without_key_bias(name: str, t: torch.Tensor) -> torch.Tensor:
    if name.endswith("in_proj.bias"):  # [query | key | value]
        d = t.shape[0] // 3
        return torch.cat([t[:d], t[2 * d :]])
    return t[t.shape[0] // 2 :] if name.endswith("kv_proj.bias") else t  # [key | value]


def max_difference(a: dict, b: dict) -> float:
    return max((without_key_bias(k, a[k]) - without_key_bias(k, v)).abs().max().item() for k, v in b.items())


def one_worker(work: Path, hooks=None) -> dict:
    """The final weights of one uninterrupted worker (this process, 1 thread as a Ray worker of 1 CPU, no Ray)."""
    from pipeline.common.params import load_params
    from pipeline.train import load_data, training_config
    from transformer.model import make_config
    from transformer.training import Trainer, TrainingConfig

    params = load_params(work / "params.yaml")
    meta, train_data, valid_data = load_data(work / "data/bin")
    torch.set_num_threads(1)
    trainer = Trainer(
        make_config(params.model.arch, meta["vocab_size"], **params.model.overrides()),
        TrainingConfig(**training_config(params.train, time.time(), meta)),
        train_data,
        valid_data,
    )
    trainer.fit(hooks)
    return trainer.module.state_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/elastic-rehearsal"), help="scratch project folder")
    parser.add_argument("--updates", type=int, default=60, help="train.max_updates")
    args = parser.parse_args()
    work = make_project(args.work.resolve(), args.updates)
    t0 = time.time()
    rehearse(work)
    print(f"stage wall time {time.time() - t0:.0f} s (load average {os.getloadavg()[0]:.1f})")
    timeline(work)
    metrics = json.loads((work / "metrics/train.json").read_text())
    keys = ("updates", "worker_sizes", "restarts", "resizes", "updates_lost", "seconds_lost")
    print("metrics/train.json:", json.dumps({k: metrics[k] for k in keys}))
    from transformer.checkpoint import load

    final = load(sorted((work / "models/checkpoints").glob("checkpoint_*.pt"))[-1])["model"]
    reference = one_worker(work)
    elastic, nudged = max_difference(final, reference), max_difference(one_worker(work, Nudge()), reference)
    print(f"max abs difference of the final weights from one uninterrupted worker: {elastic:.2e}")
    print(f"the same worker with one weight nudged by 1e-7 after update 1: {nudged:.2e}")


if __name__ == "__main__":
    main()
