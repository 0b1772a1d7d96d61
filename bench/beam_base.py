"""Decoding speed of base at newstest size: the torch engine against CTranslate2 float32 and int8, the same
weights, the same sources and the same batches, in one run (issue #28's last target).

    python -m bench.beam_base [--sentences 3003] [--repeat 1] [--threads 2]
    python -m bench.beam_base --trained 300    # a base trained to end its sentences (bench/base_trained.py)
    python -m bench.beam_base --model models/average.pt --sources newstest2014.en [--references newstest2014.de]

Base (6+6 layers, d_model 512, a 37,000-token joint vocabulary: the `wmt14-base` preset's shape) with random
weights, which seldom choose eos, so both engines cap every sentence at its source length (max_len_a 1,
max_len_b 0): about where a trained model stops on newstest2014, whose sentences are ~34 BPE tokens long. The
sources are 3,003 sentences of random ids with lognormal lengths (mean 34 tokens, log-sd 0.65: the shape
tools/make_wmt_like.py draws its words with), capped at 250. Search as the decode stage runs it: beam 4, α 0.6,
GNMT length penalty; batches of --batch-tokens padded source tokens, longest first (transformer.batching).
CTranslate2 decodes our own conversion of the same model file (pipeline/common/engines.py). Random weights make
BLEU meaningless, so the table gives speed, the output tokens each engine produced (the same work when equal)
and peak memory; the share of sentences where float32 CTranslate2 chose our tokens tells the engines agree.

With --trained N, the model is base trained for N updates on joined Multi30k pairs (bench/base_trained.py) and
the sources are 3,003 joined Multi30k valid/test sentences (~36 tokens): the model ends its outputs with eos,
and the length limit is the decode stage's, ⌊|x|⌋ + 50. The table adds sacreBLEU against the joined references
(low: a few hundred updates) and the share of outputs the model ended before the limit. With --model, your own
model file (a base trained on GPUs) decodes the first --sentences lines of --sources the same way.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from sacrebleu.metrics import BLEU

from bench.base_trained import inputs, trained_base
from bench.beam import PeakRss, add_ct2_serial_flag, batches_of, ct2_engines
from pipeline.common.ct2_engine import CT2Translator
from pipeline.common.engines import converted_model
from pipeline.common.translator import sentencepiece_from
from transformer.batching import source_tokens
from transformer.beam_search import beam_search
from transformer.checkpoint import load_model, save_model
from transformer.model import EOS_ID, Transformer, make_config
from transformer.search import max_output_length

VOCAB = 37_000


def sources(n: int, mean: float, sigma: float, cap: int, seed: int) -> list[list[int]]:
    """`n` sentences of random ids (eos last), lognormal lengths of mean `mean` tokens."""
    rng = np.random.default_rng(seed)
    mu = math.log(mean) - sigma**2 / 2  # lognormal mean = exp(mu + sigma^2 / 2)
    lengths = np.clip(np.rint(rng.lognormal(mu, sigma, n)), 1, cap - 1).astype(int)
    return [rng.integers(4, VOCAB, int(k)).tolist() + [EOS_ID] for k in lengths]


def run_torch(model: Transformer, batches, n: int, beam: int, alpha: float, slack: int) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in range(n)]
    for idx, src in batches:
        found = beam_search(model, src, beam=beam, alpha=alpha, max_len_a=1.0, max_len_b=slack)
        for i, h in zip(idx, found, strict=True):
            out[i] = h[0].tokens
    return out


def run_ct2(engine: CT2Translator, src, batches, n: int, beam: int, alpha: float, slack: int, one_call=None):
    out: list[list[int]] = [[] for _ in range(n)]
    for idx, _ in batches:
        found = engine.search(
            [src[i] for i in idx], beam=beam, alpha=alpha, max_len_a=1.0, max_len_b=slack, one_call=one_call
        )
        for i, h in zip(idx, found, strict=True):
            out[i] = h[0].tokens
    return out


def run_ct2_own(engine: CT2Translator, src, batches, n: int, beam: int, slack: int) -> list[list[int]]:
    """CTranslate2's own search alone: one call per length limit, the 1-best taken as
    CTranslate2 ranks it, no re-scoring of hypotheses it cut at the limit (what exactness costs, by difference)."""
    out: list[list[int]] = [[] for _ in range(n)]
    for idx, _ in batches:
        batch = [src[i] for i in idx]
        groups: dict[int, list[int]] = {}
        for j, x in enumerate(batch):
            groups.setdefault(engine.max_output_length(len(x), 1.0, slack), []).append(j)
        for limit, members in sorted(groups.items()):
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
    p.add_argument("--by-limit", action="store_true", help="also CTranslate2 with one call per length limit")
    add_ct2_serial_flag(p)
    p.add_argument(
        "--own-search", action="store_true", help="also CTranslate2's own search without re-scoring capped hypotheses"
    )
    p.add_argument("--trained", type=int, metavar="UPDATES", help="base trained this long, joined Multi30k inputs")
    p.add_argument("--model", type=Path, help="a model file of yours instead (models/average.pt); needs --sources")
    p.add_argument("--sources", type=Path, help="with --model: source sentences, one a line (newstest2014.en)")
    p.add_argument("--references", type=Path, help="with --model: their references, for sacreBLEU")
    p.add_argument("--spm", type=Path, help="with --model: its sentencepiece model, if not embedded in the file")
    p.add_argument("--train-tokens", type=int, default=2500, help="target tokens per update of --trained")
    p.add_argument("--multi30k", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/multi30k")
    p.add_argument("--cache", type=Path, default=Path("/tmp/transformer-bench-beam-base"), help="outside the repo")
    return p.parse_args(argv)


def setup(args):
    """(model file, model, sources, references or None, length slack b of ⌊|x|⌋ + b)."""
    args.cache.mkdir(parents=True, exist_ok=True)
    if args.model:
        model, extra = load_model(args.model)
        sp = sentencepiece_from(extra, args.model, args.spm)
        lines = args.sources.read_text(encoding="utf-8").splitlines()[: args.sentences]
        src = [source_tokens(sp.encode(x), model.cfg.max_positions) for x in lines]
        refs = args.references.read_text(encoding="utf-8").splitlines()[: len(src)] if args.references else None
        return args.model, model.eval(), src, (refs, sp) if refs else None, 50
    if args.trained:
        log = lambda msg: print(msg, flush=True)  # noqa: E731
        model, sp = trained_base(args.cache, args.multi30k, args.trained, args.train_tokens, log)
        src, refs = inputs(args.multi30k, sp, args.sentences)
        model_file, slack = args.cache / f"base-trained-{args.trained}u.pt", 50
        refs = (refs, sp)
    else:
        torch.manual_seed(0)
        model = Transformer(make_config("base", VOCAB)).eval()
        src, refs = sources(args.sentences, args.mean_tokens, args.sigma, model.cfg.max_positions, seed=1), None
        model_file, slack = args.cache / "base-random.pt", 0
    save_model(model_file, model)
    return model_file, model, src, refs, slack


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.model and not args.sources:
        raise SystemExit("--model needs --sources (a text file, one source sentence a line)")
    torch.set_num_threads(args.threads)
    model_file, model, src, refs, slack = setup(args)
    folder = converted_model(model_file)
    ct2 = ct2_engines(folder, args)
    batches, n, k, a = batches_of(src, args.batch_tokens), len(src), args.beam, args.alpha
    runs = {"torch engine (decode's default search)": lambda b: run_torch(model, b, n, k, a, slack)} | {
        f"CTranslate2 {key}": lambda b, e=e: run_ct2(e, src, b, n, k, a, slack) for key, e in ct2.items()
    }
    if args.by_limit:
        for ct in ("float32", "int8"):
            runs[f"CTranslate2 {ct}, one call per limit"] = lambda b, ct=ct: run_ct2(
                ct2[ct], src, b, n, k, a, slack, one_call=False
            )
    if args.own_search:
        for ct in ("float32", "int8"):
            runs[f"CTranslate2 {ct}, its own search only"] = lambda b, ct=ct: run_ct2_own(ct2[ct], src, b, n, k, slack)
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
    report(args, model.cfg, src, refs, slack, outputs, seconds, memory)


def report(args, cfg, src, refs, slack, outputs, seconds, memory) -> None:
    n, torch_name = len(src), next(iter(outputs))
    what = f"base trained {args.trained} updates on joined Multi30k pairs" if args.trained else "base, random weights"
    what = f"{args.model} on {args.sources.name}" if args.model else what
    cap = f"at most ⌊|x|⌋ + {slack} output tokens" if slack else "output capped at the source length"
    print(
        f"\n{what} (vocabulary {cfg.vocab_size:,}): {n:,} sources of {sum(map(len, src)) / n:.1f} tokens on average "
        f"(eos included), beam {args.beam}, α {args.alpha}, {cap}, batches of {args.batch_tokens:,} source tokens, "
        f"{args.threads} threads, wall clock, best of {args.repeat}\n"
    )
    limits = [max_output_length(len(s), 1.0, slack, cfg.max_positions) for s in src]
    extra = " sacreBLEU | ended by eos |" if refs else ""
    print(f"| system | seconds | sentences/s | vs torch engine | output tokens | peak MB above start |{extra}")
    print("|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if refs else ""))
    for name, out in outputs.items():
        ratio = seconds[torch_name] / seconds[name]
        row = (
            f"| {name} | {seconds[name]:.1f} | {n / seconds[name]:.2f} | {ratio:.2f}x | {sum(map(len, out)):,} | "
            f"{memory[name]:.0f} |"
        )
        if refs:
            (references, sp), ended = refs, sum(len(o) < k for o, k in zip(out, limits, strict=True)) / n
            bleu = BLEU().corpus_score([sp.decode(o) for o in out], [references]).score
            row += f" {bleu:.2f} | {ended:.1%} |"
        print(row)
    same = sum(a == b for a, b in zip(outputs[torch_name], outputs["CTranslate2 float32"], strict=True)) / n
    print(f"\nCTranslate2 float32 chose the torch engine's tokens for {same:.1%} of the sentences")


if __name__ == "__main__":
    main()
