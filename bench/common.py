"""Shared pieces of the CPU benchmarks: fixed threads, synthetic batches shaped like real ones, robust timing."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from transformer import BOS_ID, EOS_ID, PAD_ID


def set_threads(n: int) -> None:
    torch.set_num_threads(n)


def translation_batch(
    batch: int, length: int, vocab: int, seed: int = 0, min_fraction: float = 0.8
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(src, tgt_in, tgt), each (B, L): lengths drawn in [min_fraction·L, L] like a length-bucketed batch,
    sequences ending in eos and padded with pad; tgt_in = bos + tgt[:-1]."""
    g = torch.Generator().manual_seed(seed)
    lo = max(2, int(min_fraction * length))

    def side() -> torch.Tensor:
        x = torch.randint(4, vocab, (batch, length), generator=g)
        lengths = torch.randint(lo, length + 1, (batch,), generator=g)
        lengths[0] = length  # the longest sentence sets the padded width
        pos = torch.arange(length)
        x[pos == (lengths - 1)[:, None]] = EOS_ID
        x[pos >= lengths[:, None]] = PAD_ID
        return x

    src, tgt = side(), side()
    tgt_in = torch.cat([torch.full((batch, 1), BOS_ID), tgt[:, :-1]], dim=1)
    return src, tgt_in, tgt


def median_seconds(
    steps: dict[str, Callable[[], None]], warmup: int, repeat: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall time and median process CPU time of each step. The contenders alternate step by step so that
    load from other jobs on a shared machine falls on both alike; CPU time is the steadier of the two there."""
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeat):
        for name, fn in steps.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    med = statistics.median
    return {k: med(v) for k, v in wall.items()}, {k: med(v) for k, v in cpu.items()}
