"""Shared pieces of the CPU benchmarks: fixed threads, synthetic batches shaped like real ones, robust timing."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from transformer.model import BOS_ID, EOS_ID, PAD_ID, TransformerConfig


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


def workspace_plan(workspace):
    """A workspace's params.yaml, its binarised training split and the train stage's batch plan of it:
    (params, meta, train corpus, `BatchPlan` with the params' budgets and seed), as the stage builds them."""
    from pipeline.common.params import load_params
    from pipeline.train import load_data
    from transformer.batching import BatchPlan

    params = load_params(workspace / "params.yaml")
    meta, train, _ = load_data(workspace / "data" / "bin")
    t = params.train
    plan = BatchPlan(train.src_lengths, train.tgt_lengths, t.update_tokens, t.max_tokens, t.seed,
                     meta.get("train_copies", 1))  # fmt: skip
    return params, meta, train, plan


def step_seconds(
    steps: dict[str, Callable[[], None]], warmup: int, repeat: int, stat: Callable = statistics.median
) -> tuple[dict[str, float], dict[str, float]]:
    """`stat` (median, or min: the least disturbed) of the wall time and process CPU time of each step.
    The contenders alternate step by step so that load from other jobs on a shared machine falls on both alike;
    CPU time is the steadier of the two there."""
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
    return {k: stat(v) for k, v in wall.items()}, {k: stat(v) for k, v in cpu.items()}


def matmul_peak_flops(
    device: str = "cpu", dtype: torch.dtype = torch.float32, n: int = 2048, repeat: int = 10
) -> float:
    """Measured dense square-matmul FLOP/s (best of `repeat`): the denominator of a utilisation, what this
    device does on the friendliest workload with the current thread setting (not a datasheet figure)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def forward_flops(cfg: TransformerConfig, src_len: int, tgt_len: int) -> int:
    """Forward model FLOPs of one sentence pair of these real (non-pad) lengths:
    matmuls: 2 FLOPs per weight per token for the weights each token passes through (encoder layers for source
             tokens; decoder layers and the output projection for target tokens; cross-attention K/V
             projections for source tokens once per decoder layer); embedding lookups are free;
    attention: QKᵀ and AV, 2·2·T_q·T_k·d_model per layer, halved for causal self-attention."""
    d, f, V = cfg.d_model, cfg.d_ff, cfg.vocab_size
    enc_layer = 2 * src_len * (4 * d * d + 2 * d * f) + 4 * src_len * src_len * d
    dec_layer = (
        2 * tgt_len * (4 * d * d + 2 * d * d + 2 * d * f)  # self-attention Q,K,V,O; cross Q,O; FFN
        + 2 * src_len * 2 * d * d  # cross-attention K,V over the encoder output
        + 2 * tgt_len * tgt_len * d  # causal self-attention: half of 4·T²·d
        + 4 * tgt_len * src_len * d  # cross-attention
    )
    return cfg.encoder_layers * enc_layer + cfg.decoder_layers * dec_layer + 2 * tgt_len * d * V


def batch_flops(cfg: TransformerConfig, src: torch.Tensor, tgt: torch.Tensor) -> int:
    """Training FLOPs of one step on this padded batch: 3 × forward (backward costs two), real lengths only."""
    src_lens, tgt_lens = src.ne(PAD_ID).sum(1).tolist(), tgt.ne(PAD_ID).sum(1).tolist()
    return 3 * sum(forward_flops(cfg, s, t) for s, t in zip(src_lens, tgt_lens, strict=True))
