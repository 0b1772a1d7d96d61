"""Validation BLEU of the average of the last K checkpoints for several K, of their moving averages
(train.ema_decay), and of the last checkpoint alone: the averaging window chosen after training, on valid.

    python -m tools.average_grid --checkpoints models/checkpoints --bpe data/bpe --raw data/raw \
        --last 1 2 4 6 10 [--ema] [--beam 5 --alpha 1.0]

One row per (K, weights or moving average): sacreBLEU and the tokenised lower-cased BLEU (Multi30k papers' metric,
not sacreBLEU) on the validation split. Test is never scored here: choose on valid, then run the pipeline.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from pipeline.common.files import read_lines
from pipeline.common.layout import SPM_FILE, find_checkpoints
from pipeline.common.metrics import score
from pipeline.common.translator import Translator
from transformer.checkpoint import average_checkpoints, save_model
from transformer.inference import SearchOptions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoints", type=Path, default=Path("models/checkpoints"))
    ap.add_argument("--bpe", type=Path, default=Path("data/bpe"))
    ap.add_argument("--raw", type=Path, default=Path("data/raw"))
    ap.add_argument("--last", type=int, nargs="+", default=[1, 2, 4, 6, 10])
    ap.add_argument("--ema", action="store_true", help="also the checkpoints' moving averages of the weights")
    ap.add_argument("--beam", type=int, default=5)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="append one JSON line per row to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    found = find_checkpoints(args.checkpoints)
    sources, refs = read_lines(args.raw / "valid.en"), read_lines(args.raw / "valid.de")
    options = SearchOptions(beam=args.beam, alpha=args.alpha)
    print(f"{len(found)} checkpoints (updates {found[0][0]}..{found[-1][0]}), valid, beam {args.beam}, α {args.alpha}")
    print(f"{'weights':>8} {'last':>4} | {'updates':>15} | {'sacreBLEU':>9} | {'tok-lc BLEU':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        for key in ("model", "ema") if args.ema else ("model",):
            for k in args.last:
                chosen = found[-k:]
                model_file = Path(tmp) / "model.pt"
                save_model(model_file, average_checkpoints([p for _, p in chosen], key=key))
                translator = Translator.from_file(model_file, options, device="cpu", spm_path=args.bpe / SPM_FILE)
                s = score(translator.translate(sources), refs)
                span = f"{chosen[0][0]}-{chosen[-1][0]}"
                row = f"{key:>8} {len(chosen):>4} | {span:>15} | {s['bleu']:>9.2f} | {s['bleu_tok_lc']:>11.2f}"
                print(row, flush=True)
                if args.json is not None:
                    row = {"weights": key, "last": len(chosen), "updates": [u for u, _ in chosen], "split": "valid"}
                    row |= {"beam": args.beam, "alpha": args.alpha, "bleu": s["bleu"], "bleu_tok_lc": s["bleu_tok_lc"]}
                    with args.json.open("a", encoding="utf-8") as f:
                        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
