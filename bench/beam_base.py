"""Decoding speed of base at newstest size: the torch engine against CTranslate2 float32 and int8, the same
weights, the same sources and the same batches, in one run (issue #28's last target).

    python -m bench.beam_base [--sentences 3003] [--repeat 1] [--threads 2]

Base (6+6 layers, d_model 512, a 37,000-token joint vocabulary: the `wmt14-base` preset's shape) with random
weights, which seldom choose eos, so both engines cap every sentence at its source length (max_len_a 1,
max_len_b 0): about where a trained model stops on newstest2014, whose sentences are ~34 BPE tokens long. The
sources are 3,003 sentences of random ids with lognormal lengths (mean 34 tokens, log-sd 0.65: the shape
tools/make_wmt_like.py draws its words with), capped at 250. Search as the decode stage runs it: beam 4, α 0.6,
GNMT length penalty; batches of --batch-tokens padded source tokens, longest first (transformer.batching).
CTranslate2 decodes our own conversion of the same model file (pipeline/common/engines.py). Random weights make
BLEU meaningless, so the table gives speed, the output tokens each engine produced (the same work when equal)
and peak memory; the share of sentences where float32 CTranslate2 chose our tokens tells the engines agree.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

from bench.beam import PeakRss, batches_of
from pipeline.common.ct2_engine import CT2Translator
from pipeline.common.engines import converted_model
from transformer.beam_search import beam_search
from transformer.checkpoint import save_model
from transformer.model import EOS_ID, Transformer, make_config

VOCAB = 37_000


def sources(n: int, mean: float, sigma: float, cap: int, seed: int) -> list[list[int]]:
    """`n` sentences of random ids (eos last), lognormal lengths of mean `mean` tokens."""
    rng = np.random.default_rng(seed)
    mu = math.log(mean) - sigma**2 / 2  # lognormal mean = exp(mu + sigma^2 / 2)
    lengths = np.clip(np.rint(rng.lognormal(mu, sigma, n)), 1, cap - 1).astype(int)
    return [rng.integers(4, VOCAB, int(k)).tolist() + [EOS_ID] for k in lengths]


def run_torch(model: Transformer, batches, n: int, beam: int, alpha: float) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in range(n)]
    for idx, src in batches:
        for i, h in zip(idx, beam_search(model, src, beam=beam, alpha=alpha, max_len_a=1.0, max_len_b=0), strict=True):
            out[i] = h[0].tokens
    return out


def run_ct2(engine: CT2Translator, src, batches, n: int, beam: int, alpha: float) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in range(n)]
    for idx, _ in batches:
        found = engine.search([src[i] for i in idx], beam=beam, alpha=alpha, max_len_a=1.0, max_len_b=0)
        for i, h in zip(idx, found, strict=True):
            out[i] = h[0].tokens
    return out


def run_ct2_own(engine: CT2Translator, src, batches, n: int, beam: int) -> list[list[int]]:
    """CTranslate2's own search alone: the same per-limit calls as CT2Translator.search, the 1-best taken as
    CTranslate2 ranks it, no re-scoring of hypotheses it cut at the limit (what exactness costs, by difference)."""
    out: list[list[int]] = [[] for _ in range(n)]
    for idx, _ in batches:
        batch = [src[i] for i in idx]
        for limit, members in engine.limit_groups(batch, 1.0, 0).items():
            results = engine.translator.translate_batch(
                [engine._source_tokens(batch[j]) for j in members], beam_size=beam, max_decoding_length=limit + 1,
                min_decoding_length=0, max_input_length=0, suppress_sequences=engine.suppressed(),
            )  # fmt: skip
            for j, r in zip(members, results, strict=True):
                out[idx[j]] = [engine.ids[t] for t in r.hypotheses[0][:limit]]
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sentences", type=int, default=3003)
    p.add_argument("--mean-tokens", type=float, default=34.0)
    p.add_argument("--sigma", type=float, default=0.65)
    p.add_argument("--batch-tokens", type=int, default=4000, help="padded source tokens per batch")
    p.add_argument("--beam", type=int, default=4)
    p.add_argument("--alpha", type=float, default=0.6)
    p.add_argument("--repeat", type=int, default=1, help="timed passes per system (the fastest counts)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--own-search", action="store_true", help="also CTranslate2's own search without re-scoring capped hypotheses"
    )
    p.add_argument("--cache", type=Path, default=Path("/tmp/transformer-bench-beam-base"), help="outside the repo")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Transformer(make_config("base", VOCAB)).eval()
    args.cache.mkdir(parents=True, exist_ok=True)
    save_model(args.cache / "base-random.pt", model)
    folder = converted_model(args.cache / "base-random.pt")
    ct2 = {ct: CT2Translator(folder, compute_type=ct, threads=args.threads) for ct in ("float32", "int8")}
    src = sources(args.sentences, args.mean_tokens, args.sigma, model.cfg.max_positions, seed=1)
    batches, n = batches_of(src, args.batch_tokens), len(src)
    runs = {
        "torch engine (decode's default search)": lambda b: run_torch(model, b, n, args.beam, args.alpha),
        "CTranslate2 float32": lambda b: run_ct2(ct2["float32"], src, b, n, args.beam, args.alpha),
        "CTranslate2 int8": lambda b: run_ct2(ct2["int8"], src, b, n, args.beam, args.alpha),
    }
    if args.own_search:
        for ct in ("float32", "int8"):
            runs[f"CTranslate2 {ct}, its own search only"] = lambda b, ct=ct: run_ct2_own(ct2[ct], src, b, n, args.beam)
    for fn in runs.values():
        fn(batches[-1:])  # warm-up on the shortest batch
    outputs, seconds, memory = {}, dict.fromkeys(runs, math.inf), dict.fromkeys(runs, 0.0)
    for _ in range(args.repeat):  # interleaved, so load from other jobs hits every system alike
        for name, fn in runs.items():
            with PeakRss() as rss, torch.inference_mode():
                start = time.perf_counter()
                outputs[name] = fn(batches)
                seconds[name] = min(seconds[name], time.perf_counter() - start)
            memory[name] = max(memory[name], rss.mb)
    report(args, src, outputs, seconds, memory)


def report(args, src, outputs, seconds, memory) -> None:
    n, torch_name = len(src), next(iter(outputs))
    print(
        f"\nbase (random weights, vocabulary {VOCAB:,}), {n:,} sources of {sum(map(len, src)) / n:.1f} tokens on "
        f"average (eos included), beam {args.beam}, α {args.alpha}, output capped at the source length, batches of "
        f"{args.batch_tokens:,} source tokens, {args.threads} threads, wall clock, best of {args.repeat}\n"
    )
    print("| system | seconds | sentences/s | vs torch engine | output tokens | peak MB above start |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, out in outputs.items():
        ratio = seconds[torch_name] / seconds[name]
        print(
            f"| {name} | {seconds[name]:.1f} | {n / seconds[name]:.2f} | {ratio:.2f}x | {sum(map(len, out)):,} | "
            f"{memory[name]:.0f} |"
        )
    same = sum(a == b for a, b in zip(outputs[torch_name], outputs["CTranslate2 float32"], strict=True)) / n
    print(f"\nCTranslate2 float32 chose the torch engine's tokens for {same:.1%} of the sentences")


if __name__ == "__main__":
    main()
