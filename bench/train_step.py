"""Training-step throughput on CPU: our Transformer against Hugging Face MarianMTModel with the same weights.

    python -m bench.train_step [--presets multi30k tiny-wu] [--lengths 16 32 64] [--tokens 4096]
    python -m bench.train_step --presets --plan . [--plan-batches 40]    # a preset's own batches only

`--plan WORKSPACE` adds a row for the preset in that workspace's params.yaml on its own batches
(`transformer.batching.BatchPlan` over its data/bin, the first global batches of epoch 1 in training order: the real
lengths, ~13 tokens a sentence on Multi30k, where the synthetic shapes below are 16-64 tokens long).

One step = forward, label-smoothed loss, backward, Adam update, on the same padded batch (same sentences,
same padding) for both; float32; dropout on as in training (the preset's P_drop for both). The peer is built by
`pipeline.commands.export_marian.to_marian`, so both start from identical weights, and is given the idiomatic
`F.cross_entropy(..., label_smoothing=)` (HF's own `labels=` loss has no smoothing). Steps alternate between the
two so that other jobs on a shared machine slow both alike; warm-up steps are excluded; the median is reported.

Each row also gives the share of this CPU's measured float32 matmul peak (a 2048² matmul, same threads) that each
step reaches in model FLOPs (`bench.common.batch_flops`: real tokens only, the same count for both). It bounds
the ratio: ours can beat the peer by at most (peak share 100%) / (the peer's share).
"""

from __future__ import annotations

import argparse
import itertools
import platform
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import batch_flops, matmul_peak_flops, set_threads, step_seconds, translation_batch, workspace_plan
from transformer.batching import collate
from transformer.loss import projected_label_smoothed_nll_loss
from transformer.model import PAD_ID, Transformer, make_config
from transformer.schedule import make_optimizer

VOCAB = {"multi30k": 8000, "tiny-wu": 10000, "tiny": 8000, "base": 37000, "big": 37000}  # STACK-FACTS' BPE sizes


def our_step(model: Transformer, optimizer: torch.optim.Optimizer, batch, epsilon: float):
    src, tgt_in, tgt = batch
    keep = tgt.ne(PAD_ID)

    def step() -> None:
        # What pipeline training does (Trainer.loss_sums): only the hidden states of real target tokens, projected
        # onto the vocabulary a chunk at a time inside the loss.
        hidden = model(src, tgt_in, keep, project=False)  # (N, d_model)
        sums = projected_label_smoothed_nll_loss(hidden, model.embed.weight, tgt[keep], epsilon=epsilon)
        optimizer.zero_grad(set_to_none=True)
        (sums.loss / sums.tokens).backward()
        optimizer.step()

    return step


def marian_step(marian, optimizer: torch.optim.Optimizer, batch, epsilon: float):
    src, tgt_in, tgt = batch
    mask = src.ne(PAD_ID)
    # torch spreads ε over all V classes, we over the V-1 others: this ε' gives the same target distribution.
    V = marian.config.vocab_size
    eps_torch = epsilon * V / (V - 1)

    def step() -> None:
        logits = marian(input_ids=src, attention_mask=mask, decoder_input_ids=tgt_in, use_cache=False).logits
        loss = F.cross_entropy(logits.view(-1, V), tgt.view(-1), ignore_index=PAD_ID, label_smoothing=eps_torch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def adam(params, fused: bool | None = None) -> torch.optim.Adam:
    """Adam(β 0.9, 0.98, ε 1e-9); torch's default implementation unless `fused`."""
    return torch.optim.Adam(params, lr=1e-4, betas=(0.9, 0.98), eps=1e-9, fused=fused)


def bench_shape(preset: str, length: int, args, peak: float) -> dict:
    from pipeline.commands.export_marian import to_marian

    vocab = args.vocab or VOCAB[preset]
    torch.manual_seed(0)
    cfg = make_config(preset, vocab, max_positions=max(1024, length))
    model = Transformer(cfg)
    marian = to_marian(model)
    model.train(), marian.train()
    eps = 0.1
    batch = translation_batch(args.tokens // length, length, vocab, seed=length)
    if args.compile:
        model = torch.compile(model)
    steps = {
        "ours": our_step(model, make_optimizer(model, cfg.d_model)[0], batch, eps),  # fused Adam, as in training
        "marian": marian_step(marian, adam(marian.parameters(), fused=args.peer_fused_adam or None), batch, eps),
    }
    stat = min if args.stat == "min" else statistics.median
    wall, cpu = step_seconds(steps, warmup=args.warmup, repeat=args.repeat, stat=stat)
    target_tokens = int(batch[2].ne(PAD_ID).sum())
    flops = batch_flops(cfg, batch[0], batch[2])
    return {
        "preset": preset,
        "batch": f"{batch[0].shape[0]}x{length}",
        "target tokens": target_tokens,
        **{f"{k} tok/s": target_tokens / v for k, v in wall.items()},
        "ratio": wall["marian"] / wall["ours"],
        "ratio (CPU time)": cpu["marian"] / cpu["ours"],
        "ours GFLOP/s": flops / wall["ours"] / 1e9,
        "ours % peak": 100 * flops / wall["ours"] / peak,
        "marian % peak": 100 * flops / wall["marian"] / peak,
    }


def bench_plan(workspace: Path, args, peak: float) -> dict:
    """The same contest on the preset's own first `--plan-batches` global batches (real lengths, the training
    order): both step through the same batches, alternating batch by batch; tokens/s over all of them."""
    from pipeline.commands.export_marian import to_marian

    params, meta, train, plan = workspace_plan(workspace)
    t = params.train
    if plan.micro_per_update != 1:
        raise SystemExit(f"--plan needs one micro-batch per update (train.update_tokens {t.update_tokens})")
    batches = [collate(train, g[0]) for g in plan.epoch(1)[: args.plan_batches]]
    torch.manual_seed(0)
    cfg = make_config(params.model.arch, meta["vocab_size"], **params.model.overrides())
    model = Transformer(cfg)
    marian = to_marian(model)
    model.train(), marian.train()
    eps = t.label_smoothing
    ours_opt = make_optimizer(model, cfg.d_model)[0]
    peer_opt = adam(marian.parameters(), fused=args.peer_fused_adam or None)
    # Each call steps through the next batch; both see the same batch at the same call, every batch `repeat` times.
    ours = itertools.cycle([our_step(model, ours_opt, tuple(b), eps) for b in batches])
    peer = itertools.cycle([marian_step(marian, peer_opt, tuple(b), eps) for b in batches])
    steps = {"ours": lambda: next(ours)(), "marian": lambda: next(peer)()}
    wall, cpu = step_seconds(steps, warmup=args.warmup, repeat=args.repeat * len(batches), stat=sum)
    target_tokens = args.repeat * sum(int(b.tgt_out.ne(PAD_ID).sum()) for b in batches)
    flops = args.repeat * sum(batch_flops(cfg, b.src, b.tgt_out) for b in batches)
    shape = statistics.mean(b.src.shape[0] for b in batches), statistics.mean(b.tgt_out.shape[1] for b in batches)
    return {
        "preset": f"{params.preset} plan",
        "batch": f"{len(batches)} real, mean {shape[0]:.0f}x{shape[1]:.0f}",
        "target tokens": target_tokens // args.repeat // len(batches),
        **{f"{k} tok/s": target_tokens / v for k, v in wall.items()},
        "ratio": wall["marian"] / wall["ours"],
        "ratio (CPU time)": cpu["marian"] / cpu["ours"],
        "ours GFLOP/s": flops / wall["ours"] / 1e9,
        "ours % peak": 100 * flops / wall["ours"] / peak,
        "marian % peak": 100 * flops / wall["marian"] / peak,
    }


def print_row(row: dict, header: bool) -> None:
    """One row as soon as it is measured (a full table takes minutes on a CPU)."""
    widths = [max(len(c), 9) for c in row]
    if header:
        print(" | ".join(f"{c:>{w}}" for c, w in zip(row, widths, strict=True)))
    cells = [f"{v:.2f}x" if k.startswith("ratio") else f"{v:.1f}%" if k.endswith("% peak")
             else f"{v:.0f}" if isinstance(v, float) else str(v) for k, v in row.items()]  # fmt: skip
    print(" | ".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True)), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description="training-step tokens/s: ours vs MarianMTModel")
    ap.add_argument("--presets", nargs="*", default=["multi30k", "tiny-wu"])
    ap.add_argument("--lengths", nargs="+", type=int, default=[16, 32, 64], help="padded sentence lengths")
    ap.add_argument("--tokens", type=int, default=4096, help="padded tokens per side per batch")
    ap.add_argument("--vocab", type=int, default=None, help="override the preset's BPE vocabulary size")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--stat", choices=["median", "min"], default="median", help="min: least disturbed by other jobs")
    ap.add_argument("--compile", action="store_true", help="torch.compile our model (not the peer)")
    ap.add_argument("--peer-fused-adam", action="store_true", help="give the peer our fused Adam too")
    ap.add_argument("--plan", type=Path, help="a workspace (params.yaml, data/bin): also its real batches")
    ap.add_argument("--plan-batches", type=int, default=40, help="how many of the plan's first global batches")
    args = ap.parse_args()
    set_threads(args.threads)
    peak = matmul_peak_flops("cpu", torch.float32)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} threads, "
          f"float32, {args.stat} of {args.repeat} steps after {args.warmup} warm-up; measured float32 matmul "
          f"peak {peak / 1e9:.0f} GFLOP/s", flush=True)  # fmt: skip
    shapes = [(p, n) for p in args.presets for n in args.lengths]
    for i, (preset, length) in enumerate(shapes):
        print_row(bench_shape(preset, length, args, peak), header=i == 0)
    if args.plan:
        print(f"plan row: {args.repeat} passes over the batches after {args.warmup} warm-up steps, totals", flush=True)
        print_row(bench_plan(args.plan, args, peak), header=not shapes)


if __name__ == "__main__":
    main()
