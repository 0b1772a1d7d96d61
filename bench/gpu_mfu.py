"""Training throughput and model-FLOPs utilisation (MFU) on one CUDA GPU, bf16 autocast, base and big (§6.1).

    python -m bench.gpu_mfu [--presets base big] [--tokens 16384] [--length 64] [--compile]

MFU = model FLOPs of the measured steps / (wall time · measured bf16 matmul peak). The peak is measured here
(a large bf16 matmul), not taken from a datasheet, so the ratio says how close the model gets to what this GPU
does on the friendliest workload. Model FLOPs count only real tokens (padding is waste, not work): the
"6 × parameters × tokens + attention" rule made exact for an encoder-decoder (`bench.common.forward_flops`).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from bench.common import batch_flops, matmul_peak_flops, translation_batch
from transformer.loss import label_smoothed_nll_loss, projected_label_smoothed_nll_loss
from transformer.model import PAD_ID, Transformer, make_config
from transformer.schedule import make_optimizer


def bench_preset(preset: str, args, peak: float) -> dict:
    cfg = make_config(preset, args.vocab)
    torch.manual_seed(0)
    model = Transformer(cfg).cuda().train()
    optimizer, scheduler = make_optimizer(model, cfg.d_model)
    src, tgt_in, tgt = (x.cuda() for x in translation_batch(args.tokens // args.length, args.length, args.vocab))
    keep = tgt.ne(PAD_ID)
    forward = torch.compile(model) if args.compile else model

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if args.full_logits:
                sums = label_smoothed_nll_loss(forward(src, tgt_in, keep), tgt[keep])  # all (N, V) logits at once
            else:  # what training does (Trainer.loss_sums)
                hidden = forward(src, tgt_in, keep, project=False)  # (N, d_model) at target tokens only
                sums = projected_label_smoothed_nll_loss(hidden, model.embed.weight, tgt[keep])
        optimizer.zero_grad(set_to_none=True)
        (sums.loss / sums.tokens).backward()
        optimizer.step()
        scheduler.step()

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.repeat):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / args.repeat
    flops = batch_flops(cfg, src, tgt)
    return {
        "preset": preset,
        "params": f"{model.num_parameters() / 1e6:.0f}M",
        "batch": f"{src.shape[0]}x{args.length}",
        "target tok/s": f"{int(keep.sum()) / seconds:,.0f}",
        "TFLOP/s": f"{flops / seconds / 1e12:.1f}",
        "MFU": f"{flops / seconds / peak:.1%}",
        "peak mem": f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description="GPU training tokens/s and MFU (bf16 autocast)")
    ap.add_argument("--presets", nargs="+", default=["base", "big"])
    ap.add_argument("--vocab", type=int, default=37000, help="§5.1: shared BPE vocabulary of about 37k")
    ap.add_argument("--tokens", type=int, default=16384, help="padded tokens per side per batch")
    ap.add_argument("--length", type=int, default=64, help="padded sentence length")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--full-logits", action="store_true", help="the (N, V) logits at once, not the chunked loss")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_mfu.py needs a CUDA GPU and torch.cuda.is_available() is False: nothing measured.")
    torch.backends.cuda.matmul.allow_tf32 = True
    peak = matmul_peak_flops("cuda", torch.bfloat16, n=8192, repeat=20)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, measured bf16 matmul peak "
          f"{peak / 1e12:.0f} TFLOP/s; bf16 autocast, {args.repeat} steps after {args.warmup} warm-up")  # fmt: skip
    rows = [bench_preset(p, args, peak) for p in args.presets]
    cols = list(rows[0])
    print(" | ".join(f"{c:>12}" for c in cols))
    for r in rows:
        print(" | ".join(f"{r[c]:>12}" for c in cols))


if __name__ == "__main__":
    main()
