"""What the attention hook costs: a training step with the hook idle against the same step without the hook,
and what one look inside the model (`pipeline.common.inspection`) costs at a validation.

    python -m bench.attention_hook [--preset multi30k] [--lengths 16 32] [--repeat 9]

Training step: forward, projected label-smoothed loss, backward, fused Adam (`bench.train_step.our_step`, what
training runs), float32, dropout on, the same batch. "without hook" replaces every attention module's `attend`
by the code without the hook (SDPA, or the short-sequence matmuls, with no `recorder` test); "hook idle" is the
shipped model with nobody recording. The two alternate step by step, so other load falls on both alike. A ratio
of 1.00 means the hook is free when nobody asks for the weights.

Inspection: `inspect_model` (greedy search, then one teacher-forced pass with the weights formed) and the
rendering of one attention grid per layer (`attention_figure` + `figure_pixels`) for 3 Multi30k-length
sentences, i.e. what rank 0 does at each validation before handing the images to MLflow.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import types

import torch
import torch.nn.functional as F

from bench.common import set_threads, step_seconds, translation_batch
from bench.train_step import VOCAB, our_step
from transformer.model import PAD_ID, MultiHeadAttention, Transformer, attention_weights, make_config, short_attention
from transformer.schedule import make_optimizer


def attend_without_hook(self, q, k, v, mask, causal):
    """`MultiHeadAttention.attend` without the hook (commit fb11af1, plus the short-sequence path since)."""
    if short_attention(q, k):
        out = attention_weights(q, k, mask, causal) @ v  # (B, h, T, d_k)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)  # (B, h, T, d_k)
    B, _, T, _ = out.shape
    return self.out_proj(out.transpose(1, 2).reshape(B, T, self.heads * self.d_k))


def without_hook(model: Transformer) -> Transformer:
    for module in model.modules():
        if isinstance(module, MultiHeadAttention):
            module.attend = types.MethodType(attend_without_hook, module)
    return model


def step_row(preset: str, length: int, args) -> dict:
    vocab = VOCAB[preset]
    cfg = make_config(preset, vocab)
    batch = translation_batch(args.tokens // length, length, vocab, seed=length)
    models = {}
    for name in ("without hook", "hook idle"):
        torch.manual_seed(0)
        model = Transformer(cfg).train()
        models[name] = without_hook(model) if name == "without hook" else model
    steps = {name: our_step(m, make_optimizer(m, cfg.d_model)[0], batch, 0.1) for name, m in models.items()}
    wall, cpu = step_seconds(steps, warmup=args.warmup, repeat=args.repeat, stat=statistics.median)
    tokens = int(batch[2].ne(PAD_ID).sum())
    return {
        "preset": preset,
        "batch": f"{batch[0].shape[0]}x{length}",
        "without hook tok/s": tokens / wall["without hook"],
        "hook idle tok/s": tokens / wall["hook idle"],
        "ratio": wall["without hook"] / wall["hook idle"],
        "ratio (CPU time)": cpu["without hook"] / cpu["hook idle"],
    }


def inspection_seconds(preset: str, repeat: int) -> tuple[float, float]:
    """Median seconds of (inspect_model, rendering every layer's grid) for 3 sentences of ~13 tokens."""
    import sentencepiece  # noqa: F401  (the pipeline's dependency; imported by pipeline.common.inspection)

    from pipeline.common.inspection import Inspection, Sample, attention_figure, figure_pixels
    from transformer.attention_maps import teacher_forced_maps
    from transformer.search import greedy_search

    torch.manual_seed(0)
    model = Transformer(make_config(preset, VOCAB[preset])).eval()
    src = translation_batch(3, 14, VOCAB[preset], seed=1)[0]
    looks, draws = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        with torch.no_grad():
            hyps = greedy_search(model, src, max_len_b=0)  # as long as the source: a trained model's length
            output = torch.tensor([(h + [3] * 14)[:14] for h in hyps])
            maps = teacher_forced_maps(model, src, output)
        t1 = time.perf_counter()
        for i in range(3):
            found = Inspection(Sample("", ""), "", ["x"] * 14, ["y"] * 14, maps.sentence(i))
            for layer in range(model.cfg.decoder_layers):
                figure_pixels(attention_figure(found, layer, "bench"))
        looks.append(t1 - t0)
        draws.append(time.perf_counter() - t1)
    return statistics.median(looks), statistics.median(draws)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="multi30k")
    ap.add_argument("--lengths", nargs="+", type=int, default=[16, 32])
    ap.add_argument("--tokens", type=int, default=4096, help="padded tokens per side per batch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=9)
    args = ap.parse_args()
    set_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} threads, "
          f"float32, median of {args.repeat} alternating steps after {args.warmup} warm-up\n")  # fmt: skip
    rows = [step_row(args.preset, n, args) for n in args.lengths]
    print("| " + " | ".join(rows[0]) + " |")
    print("|" + "---|" * len(rows[0]))
    for r in rows:
        cells = [f"{v:.3f}x" if k.startswith("ratio") else f"{v:,.0f}" if isinstance(v, float) else v
                 for k, v in r.items()]  # fmt: skip
        print("| " + " | ".join(str(c) for c in cells) + " |")
    look, draw = inspection_seconds(args.preset, repeat=3)
    print(
        f"\nOne inspection at a validation ({args.preset}, 3 sentences of 14 tokens): maps {look:.2f} s, "
        f"drawing {3 * make_config(args.preset, 8).decoder_layers} grids {draw:.2f} s (before MLflow's upload)"
    )


if __name__ == "__main__":
    main()
