"""Ray Train's cost over the same training loop in a plain process, on CPU.

    python -m bench.train_ray [--updates 40] [--preset tiny]

Runs `transformer.training.Trainer` on a synthetic corpus (Multi30k-like lengths, 8k vocabulary) three ways:
in this process (the peer), and through `TorchTrainer` with 1 and 2 CPU workers (1 CPU each). Prints updates/s,
target tokens/s, the time from the start (before `ray.init`) to the end of the first update, and the ratio to
the plain loop. The steady-state rate excludes the first 3 updates (allocator and thread-pool warm-up).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from transformer.batching import PackedCorpus
from transformer.model import EOS_ID, make_config
from transformer.training import Hooks, Trainer, TrainingConfig

WARMUP = 3


def corpus(n: int = 4000, vocab: int = 8000, seed: int = 0) -> PackedCorpus:
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        s = int(rng.integers(8, 30))
        t = max(2, s + int(rng.integers(-4, 5)))
        pairs.append((rng.integers(4, vocab, s).tolist() + [EOS_ID], rng.integers(4, vocab, t).tolist() + [EOS_ID]))
    return PackedCorpus.from_pairs(pairs)


class Clock(Hooks):
    def __init__(self):
        self.times, self.tokens = [], []

    def on_update(self, trainer, step):
        self.times.append(time.time())
        self.tokens.append(step.tokens)


def run_loop(config: dict) -> dict:
    """The loop measured: what each worker (or the plain process) runs."""
    world_size = 1
    wrap = None
    if config.get("ray"):
        import ray.train
        import ray.train.torch

        world_size = ray.train.get_context().get_world_size()
        if world_size > 1:
            wrap = ray.train.torch.prepare_model
    torch.set_num_threads(1)  # one CPU per worker, and the same for the plain peer
    cfg = make_config(config["preset"], 8000)
    training = TrainingConfig(
        update_tokens=config["update_tokens"],
        max_tokens=config["max_tokens"],
        max_updates=config["updates"],
        validate_every_updates=10**9,
        log_every_updates=10**9,
        checkpoint_every_updates=None,
        checkpoint_every_minutes=None,
    )
    clock = Clock()
    trainer = Trainer(cfg, training, corpus(), None, "cpu", wrap=wrap)
    trainer.checkpoint = lambda hooks: None  # measure the loop, not checkpoint I/O
    trainer.fit(clock)
    steady = clock.times[-1] - clock.times[WARMUP - 1]
    return {
        "first_update_s": clock.times[0] - config["start"],
        "updates_per_s": (len(clock.times) - WARMUP) / steady,
        "tokens_per_s": sum(clock.tokens[WARMUP:]) / steady,
        "world_size": world_size,
    }


def run_ray(config: dict, workers: int) -> dict:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    start = time.time()
    ray.init(num_cpus=workers, include_dashboard=False)
    try:
        trainer = TorchTrainer(
            run_loop,
            train_loop_config={**config, "ray": True, "start": start},
            scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
            run_config=ray.train.RunConfig(name=f"bench-{workers}-{int(start)}", storage_path="/tmp/bench-ray"),
        )
        return trainer.fit().return_value
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--updates", type=int, default=40)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--update-tokens", type=int, default=4096)
    parser.add_argument("--max-tokens", type=int, default=2048)
    args = parser.parse_args()
    config = {
        "updates": args.updates,
        "preset": args.preset,
        "update_tokens": args.update_tokens,
        "max_tokens": args.max_tokens,
    }
    rows = {"plain process, 1 worker": run_loop({**config, "start": time.time()})}
    rows["Ray Train, 1 worker"] = run_ray(config, 1)
    rows["Ray Train, 2 workers"] = run_ray(config, 2)
    peer = rows["plain process, 1 worker"]["updates_per_s"]
    print(f"\npreset {args.preset}, global batch {args.update_tokens} tokens, micro-batch {args.max_tokens}, "
          f"{args.updates} updates, float32, 1 thread per worker")  # fmt: skip
    print(f"| {'run':<24} | updates/s | target tokens/s | start to first update | updates/s vs plain |")
    print(f"|{'-' * 26}|-----------|-----------------|-----------------------|--------------------|")
    for name, r in rows.items():
        print(
            f"| {name:<24} | {r['updates_per_s']:9.2f} | {r['tokens_per_s']:15,.0f} | "
            f"{r['first_update_s']:19.1f} s | {r['updates_per_s'] / peer:18.3f} |"
        )
    overhead = peer / rows["Ray Train, 1 worker"]["updates_per_s"] - 1
    print(f"\nRay Train overhead over the plain loop (1 worker): {overhead:+.1%} (target <= 5%)")


if __name__ == "__main__":
    main()
