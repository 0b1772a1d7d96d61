"""BLEU of one model file over a grid of beam sizes and length penalties, on one split (issue #19).

    python -m tools.search_grid --model models/average.pt --raw data/raw --split valid \
        --beams 1 4 5 6 --alphas 0.6 1.0 1.4

Choose beam and α on the validation split only (`--split valid`), then score the chosen pair once on test.
Prints one row per (beam, α): sacreBLEU (cased, detokenised, 13a), the tokenised lower-cased BLEU of Multi30k
papers (labelled; not sacreBLEU), chrF, and the output/reference length ratio; `--json` appends them to a file.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pipeline.common.files import read_lines
from pipeline.common.metrics import score
from pipeline.common.translator import Translator
from transformer.inference import SearchOptions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--spm", type=Path, default=None, help="sentencepiece model, for a model file without one")
    ap.add_argument("--raw", type=Path, default=Path("data/raw"))
    ap.add_argument("--split", choices=["valid", "test"], default="valid")
    ap.add_argument("--src", default="en")
    ap.add_argument("--tgt", default="de")
    ap.add_argument("--beams", type=int, nargs="+", default=[5])
    ap.add_argument("--alphas", type=float, nargs="+", default=[1.0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="append one JSON line per row to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sources = read_lines(args.raw / f"{args.split}.{args.src}")
    refs = read_lines(args.raw / f"{args.split}.{args.tgt}")
    print(f"{args.model} on {args.split} ({len(sources)} sentences)")
    head = f"{'beam':>4} {'alpha':>5} | {'sacreBLEU':>9} | {'tok-lc BLEU':>11} | {'chrF':>5} | {'len ratio':>9}"
    print(f"{head} | {'s':>5}")
    for beam in args.beams:
        for alpha in args.alphas:
            t0 = time.perf_counter()
            translator = Translator.from_file(
                args.model, SearchOptions(beam=beam, alpha=alpha), device="cpu", spm_path=args.spm
            )
            hyps = translator.translate(sources)
            seconds = time.perf_counter() - t0
            s = score(hyps, refs)
            ratio = sum(len(h.split()) for h in hyps) / max(1, sum(len(r.split()) for r in refs))
            print(f"{beam:>4} {alpha:>5.2f} | {s['bleu']:>9.2f} | {s['bleu_tok_lc']:>11.2f} | {s['chrf']:>5.2f} | "
                  f"{ratio:>9.3f} | {seconds:>5.1f}", flush=True)  # fmt: skip
            if args.json is not None:
                row = {"model": str(args.model), "split": args.split, "beam": beam, "alpha": alpha, **s}
                with args.json.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
