"""Stage `decode`: beam search over the `decode.split` source side (§6.1), one hypothesis per source line.

    python -m pipeline.decode --model models/average.pt --raw data/raw --out outputs/hyp.txt

Hypotheses are detokenised (sentencepiece), cased text, line-aligned with `data/raw/{split}.{source_lang}`,
written atomically. Speed (sentences/s, wall time) goes to metrics/decode.json and MLflow.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import mlflow
import torch
from tqdm import tqdm

from pipeline.common.engines import make_translator
from pipeline.common.files import read_lines, write_text_atomic
from pipeline.common.params import load_params
from pipeline.common.tracking import log_stage_metrics, stage_run
from pipeline.common.translator import Translator, search_options

log = logging.getLogger("pipeline.decode")


def decode_sentences(translator: Translator, sentences: list[str], out: Path) -> dict:
    """Translate `sentences` into `out`, one line each; returns the speed metrics."""
    start = time.perf_counter()
    with tqdm(total=len(sentences), unit="sent", desc="decode", mininterval=1.0) as bar:
        hyps = translator.translate(sentences, progress=bar.update)
    wall = time.perf_counter() - start
    write_text_atomic(out, "".join(h + "\n" for h in hyps))
    return {
        "sentences": len(sentences),
        "wall_seconds": round(wall, 3),
        "sentences_per_second": round(len(sentences) / wall, 3) if wall > 0 else 0.0,
        "device": str(translator.device),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--raw", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--metrics", type=Path, default=Path("metrics/decode.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    params = load_params()
    source = args.raw / f"{params.decode.split}.{params.data.source_lang}"
    sentences = read_lines(source)
    with stage_run("decode", params, ("data", "decode")):
        dp = params.decode
        models = dp.models or [str(args.model)]
        translator = make_translator(
            models, search_options(dp), dp.device, dp.engine, dp.compute_type,
            inter_threads=dp.ct2_inter_threads, max_batch_size=dp.ct2_max_batch_size,
        )  # fmt: skip
        if len(models) > 1:
            log.info("an ensemble of %d models: %s", len(models), ", ".join(models))
        log.info(
            "decoding %d lines of %s on %s (torch threads: %d)",
            len(sentences),
            source,
            translator.device,
            torch.get_num_threads(),
        )
        metrics = decode_sentences(translator, sentences, args.out) | {"models": len(models)}
        write_text_atomic(args.metrics, json.dumps(metrics, indent=2) + "\n")
        log_stage_metrics(metrics)
        mlflow.log_artifact(str(args.out), artifact_path="outputs")
        mlflow.log_artifact(str(args.metrics), artifact_path="metrics")
        log.info(
            "%d sentences in %.1f s (%.1f sentences/s)",
            metrics["sentences"],
            metrics["wall_seconds"],
            metrics["sentences_per_second"],
        )


if __name__ == "__main__":
    main()
