"""Attention at short lengths on a CPU: SDPA's fused kernel against the matmul path that `transformer.model`
takes up to `SHORT_KEYS` keys (`short_attention`), and what that choice does to a whole training step.

    python -m bench.short_attention [--lengths 13 17 20 26 32 43 64 85 128] [--tokens 2048]
    python -m bench.short_attention --plan WORKSPACE [--plan-batches 40] [--repeat 2]

Layers: forward and backward of one attention call at the `multi30k` preset's shape (4 heads of 64), B × L
tokens (B = tokens // L), queries, keys and values as views of one fused Q|K|V projection as the model makes
them; a source-padding mask (encoder self- and cross-attention) and causal (decoder self-attention). The two
paths alternate call by call; the median of `--repeat` calls is reported.

`--plan WORKSPACE`: that workspace's first `--plan-batches` global batches (params.yaml's preset, its data/bin,
the train stage's batch plan), each stepped twice in one process by one model (forward, loss, backward, Adam):
once with SDPA for every attention call, once as shipped; the order alternates batch by batch, so the host's
drift falls on both alike. Totals over all steps.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import transformer.model as model_module
from bench.common import set_threads, workspace_plan
from transformer.model import attention_weights


def matmuls(q, k, v, mask, causal):
    return attention_weights(q, k, mask, causal) @ v  # what `attend` runs on the short path


def sdpa(q, k, v, mask, causal):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


def layer_ms(tokens: int, length: int, causal: bool, repeat: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(length)
    B, h, d_k = max(tokens // length, 1), 4, 64
    qkv = torch.randn(B, length, 3, h, d_k, generator=g, requires_grad=True)
    mask = None
    if not causal:  # source padding: lengths in [0.8 L, L], the longest sets the width
        lengths = torch.randint(int(0.8 * length), length + 1, (B,), generator=g)
        lengths[0] = length
        mask = (torch.arange(length) < lengths[:, None])[:, None, None, :]  # (B, 1, 1, S)
    grad = torch.randn(B, h, length, d_k, generator=g)

    def call(fn):
        q, k, v = (x.transpose(1, 2) for x in qkv.unbind(2))  # (B, h, L, d_k) views, as split_heads makes them
        fn(q, k, v, mask, causal).backward(grad)
        qkv.grad = None

    times: dict[str, list[float]] = {"sdpa": [], "matmuls": []}
    for i in range(repeat + 2):
        for name, fn in (("sdpa", sdpa), ("matmuls", matmuls)):
            t = time.perf_counter()
            call(fn)
            if i >= 2:  # warm-up calls excluded
                times[name].append(time.perf_counter() - t)
    return {name: 1e3 * statistics.median(v) for name, v in times.items()}


def layer_table(args) -> None:
    print(f"{'B x L':>9} | {'attention':>9} | {'SDPA ms':>8} | {'matmuls ms':>10} | {'SDPA / matmuls':>14}")
    for length in args.lengths:
        for causal in (False, True):
            ms = layer_ms(args.tokens, length, causal, args.repeat)
            shape = f"{max(args.tokens // length, 1)}x{length}"
            kind = "causal" if causal else "padded"
            ratio = ms["sdpa"] / ms["matmuls"]
            print(f"{shape:>9} | {kind:>9} | {ms['sdpa']:8.2f} | {ms['matmuls']:10.2f} | {ratio:13.2f}x")


def plan_row(workspace: Path, args) -> None:
    from bench.train_step import our_step
    from transformer.batching import collate
    from transformer.schedule import make_optimizer

    params, meta, train, plan = workspace_plan(workspace)
    batches = [collate(train, g[0]) for g in plan.epoch(1)[: args.plan_batches]]
    torch.manual_seed(0)
    cfg = model_module.make_config(params.model.arch, meta["vocab_size"], **params.model.overrides())
    model = model_module.Transformer(cfg).train()
    optimizer = make_optimizer(model, cfg.d_model)[0]
    steps = [our_step(model, optimizer, tuple(b), params.train.label_smoothing) for b in batches]
    shipped = model_module.SHORT_KEYS
    settings = {"SDPA everywhere": 0, f"shipped (matmuls up to {shipped} keys)": shipped}
    total = dict.fromkeys(settings, 0.0)
    try:
        for i in range(args.warmup + args.repeat * len(steps)):
            names = list(settings) if i % 2 == 0 else list(settings)[::-1]
            for name in names:
                model_module.SHORT_KEYS = settings[name]
                t = time.perf_counter()
                steps[i % len(steps)]()
                if i >= args.warmup:
                    total[name] += time.perf_counter() - t
    finally:
        model_module.SHORT_KEYS = shipped
    n = args.repeat * len(steps)
    print(f"{params.preset} plan, {len(batches)} real batches x {args.repeat}, {args.warmup} warm-up steps each")
    base = total["SDPA everywhere"]
    for name, seconds in total.items():
        print(f"{name:>34} | {seconds:7.1f} s | {60 * n / seconds:5.1f} updates/min | {base / seconds:.3f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[13, 17, 20, 26, 32, 43, 64, 85, 128])
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per batch (the multi30k preset's 2,048)")
    ap.add_argument("--repeat", type=int, help="calls per path and shape (default 20), passes over the plan (2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--plan", type=Path, help="a workspace whose batch plan to step through (see above)")
    ap.add_argument("--plan-batches", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    set_threads(args.threads)
    args.repeat = args.repeat or (2 if args.plan is not None else 20)
    print(f"torch {torch.__version__}, {platform.machine()}, {args.threads} threads, float32")
    if args.plan is not None:
        plan_row(args.plan, args)
    else:
        layer_table(args)


if __name__ == "__main__":
    main()
