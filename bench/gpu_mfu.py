"""Training throughput and model-FLOPs utilisation (MFU) on one CUDA GPU, bf16 autocast, base and big (§6.1).

    PYTHONPATH=. python bench/gpu_mfu.py [--presets base big] [--tokens 16384] [--length 64] [--compile]

MFU = model FLOPs of the measured steps / (wall time · measured bf16 matmul peak). The peak is measured here
(a large bf16 matmul), not taken from a datasheet, so the ratio says how close the model gets to what this GPU
does on the friendliest workload. Model FLOPs count only real tokens (padding is waste, not work):
    matmuls: 2 FLOPs per weight per token, forward, for the weights each token passes through (encoder layers for
             source tokens; decoder layers and the output projection for target tokens; cross-attention K/V
             projections for source tokens once per decoder layer); embedding lookups are free;
    attention: QKᵀ and AV, 2·2·T_q·T_k·d_model per layer, halved for causal self-attention;
    training = 3 × forward (backward costs two forward passes).
This is the "6 × parameters × tokens + attention" rule made exact for an encoder-decoder.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import translation_batch  # noqa: E402
from transformer import PAD_ID, Transformer, TransformerConfig, make_config  # noqa: E402
from transformer.loss import label_smoothed_nll_loss  # noqa: E402
from transformer.schedule import make_optimizer  # noqa: E402


def matmul_peak_flops(n: int = 8192, repeat: int = 20) -> float:
    """Measured bf16 dense matmul FLOP/s: the denominator of MFU."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * repeat / (time.perf_counter() - t0)


def forward_flops(cfg: TransformerConfig, src_len: int, tgt_len: int) -> int:
    """Forward FLOPs of one sentence pair of these real lengths (see the module docstring)."""
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
    """Training FLOPs of one step on this padded batch: 3 × forward, real lengths only."""
    src_lens, tgt_lens = src.ne(PAD_ID).sum(1).tolist(), tgt.ne(PAD_ID).sum(1).tolist()
    return 3 * sum(forward_flops(cfg, s, t) for s, t in zip(src_lens, tgt_lens, strict=True))


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
            logits = forward(src, tgt_in, keep)  # (N, V) at target tokens only
        sums = label_smoothed_nll_loss(logits, tgt[keep])  # float32 log-probabilities
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
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_mfu.py needs a CUDA GPU and torch.cuda.is_available() is False: nothing measured.")
    torch.backends.cuda.matmul.allow_tf32 = True
    peak = matmul_peak_flops()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, measured bf16 matmul peak "
          f"{peak / 1e12:.0f} TFLOP/s; bf16 autocast, {args.repeat} steps after {args.warmup} warm-up")  # fmt: skip
    rows = [bench_preset(p, args, peak) for p in args.presets]
    cols = list(rows[0])
    print(" | ".join(f"{c:>12}" for c in cols))
    for r in rows:
        print(" | ".join(f"{r[c]:>12}" for c in cols))


if __name__ == "__main__":
    main()
