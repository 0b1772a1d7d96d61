"""The CTranslate2 engine with the decode stage's length rule: one call per batch (then again by limit only the
sentences that ran into a shorter limit of their own) against one call per length limit, same model, same
sentences, same batches, in one run, the two interleaved (issue #28).

    python -m bench.ct2_calls --model models/average.pt --spm data/bpe/spm.model [--sentences 1000]

The decode stage's limit is per sentence (⌊a·|x|⌋ + b), CTranslate2's per call; `CT2Translator.search` gives
the same results both ways (tests/test_ct2.py), so the table gives time, the calls made, and the share of
sentences whose 1-best tokens came out the same (float32 sums in batches of other sizes may break a tie
differently). Defaults: the `multi30k` preset's decode settings (beam 6, α 1.4, a 1, b 50, 8,000 source
tokens per batch), Multi30k test.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import sentencepiece as spm

from bench.beam import REPO, SRC, batches_of, encode
from pipeline.common.ct2_engine import CT2Translator
from pipeline.common.engines import converted_model


class CallCounter:
    """CTranslate2's translator with its translate_batch calls noted: the output-length limit of each (`limits`)
    and its keyword arguments (`calls`)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    @property
    def limits(self) -> list[int]:
        return [kwargs["max_decoding_length"] - 1 for kwargs in self.calls]

    def translate_batch(self, batch, **kwargs):
        self.calls.append(kwargs)
        return self.inner.translate_batch(batch, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def decode(engine: CT2Translator, src, batches, args, one_call: bool) -> tuple[list[list[int]], float, int]:
    """1-best tokens of every sentence, seconds, CTranslate2 calls."""
    out: list[list[int]] = [[] for _ in src]
    engine.translator.calls.clear()
    start = time.perf_counter()
    for idx, _ in batches:
        found = engine.search(
            [src[i] for i in idx], beam=args.beam, alpha=args.alpha, max_len_a=args.max_len_a,
            max_len_b=args.max_len_b, one_call=one_call,
        )  # fmt: skip
        for i, hyps in zip(idx, found, strict=True):
            out[i] = hyps[0].tokens
    return out, time.perf_counter() - start, len(engine.translator.calls)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True, help="a model file (models/average.pt)")
    p.add_argument("--spm", type=Path, required=True, help="its sentencepiece model (data/bpe/spm.model)")
    p.add_argument("--multi30k", type=Path, default=REPO.parent / "shared" / "data" / "multi30k")
    p.add_argument("--sentences", type=int, default=1000)
    p.add_argument("--batch-tokens", type=int, default=8000, help="padded source tokens per batch")
    p.add_argument("--beam", type=int, default=6)
    p.add_argument("--alpha", type=float, default=1.4)
    p.add_argument("--max-len-a", type=float, default=1.0)
    p.add_argument("--max-len-b", type=int, default=50)
    p.add_argument("--repeat", type=int, default=3, help="timed passes per row (the fastest counts)")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    sp = spm.SentencePieceProcessor(model_file=str(args.spm))
    lines = [json.loads(x)[SRC] for x in (args.multi30k / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    src = encode(sp, lines[: args.sentences])
    batches = batches_of(src, args.batch_tokens)
    folder = converted_model(args.model)
    rows, seconds, outputs, calls = {}, {}, {}, {}
    for ct in ("float32", "int8"):
        engine = CT2Translator(folder, compute_type=ct, threads=args.threads)
        engine.translator = CallCounter(engine.translator)
        for one_call in (False, True):
            rows[f"{ct}, {'one call per batch' if one_call else 'one call per limit'}"] = (engine, one_call)
    for engine, one_call in rows.values():
        decode(engine, src, batches[-1:], args, one_call)  # warm-up on the shortest batch
    for _ in range(args.repeat):  # interleaved, so load from other jobs hits every row alike
        for name, (engine, one_call) in rows.items():
            outputs[name], sec, calls[name] = decode(engine, src, batches, args, one_call)
            seconds[name] = min(seconds.get(name, float("inf")), sec)
    n = len(src)
    print(
        f"\n{n} Multi30k test sentences, {len(batches)} batches of {args.batch_tokens:,} source tokens, beam "
        f"{args.beam}, α {args.alpha}, max length ⌊{args.max_len_a}·|x|⌋ + {args.max_len_b}, {args.threads} "
        f"threads, wall clock, best of {args.repeat}\n"
    )
    print("| CTranslate2 | seconds | sentences/s | vs one call per limit | calls | same 1-best |")
    print("|---|---:|---:|---:|---:|---:|")
    names = list(rows)
    for i, name in enumerate(names):
        base = names[i - i % 2]  # the same compute type, by limit
        same = sum(a == b for a, b in zip(outputs[name], outputs[base], strict=True)) / n
        print(
            f"| {name} | {seconds[name]:.2f} | {n / seconds[name]:.1f} | {seconds[base] / seconds[name]:.2f}x | "
            f"{calls[name]} | {same:.1%} |"
        )


if __name__ == "__main__":
    main()
