"""Stage `average`: the mean of the last N training checkpoints as one standalone model file (§6.1).

    python -m pipeline.average --checkpoints models/checkpoints --bpe data/bpe --out models/average.pt

"Last" is by update number (from the file names `checkpoint_{update:08d}.pt`), never by modification time,
which copies and `dvc checkout` change. `average.last_minutes` / `average.last_share` choose by training time
instead (each checkpoint's `elapsed_s`), so a preset averages the same part of a 20- or a 60-minute budget.
The output holds the averaged weights, the model config and the sentencepiece model it was trained with (its
path, sha256 and bytes), so it translates on its own; it is also logged to MLflow as a pyfunc model.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
from pathlib import Path

import mlflow
import sentencepiece as spm
import torch

from pipeline.common.files import read_lines
from pipeline.common.inspection import choose_samples, inspect_model, log_inspection
from pipeline.common.layout import SPM_FILE, find_checkpoints
from pipeline.common.params import AverageParams, Params, load_params
from pipeline.common.pyfunc import log_translation_model
from pipeline.common.tracking import stage_run
from transformer.checkpoint import average_checkpoints, load_model, save_model

log = logging.getLogger("pipeline.average")


def select_last(checkpoints: list[tuple[int, Path]], last: int) -> list[tuple[int, Path]]:
    if len(checkpoints) < last:
        log.warning("average.last is %d but only %d checkpoints exist: averaging all of them", last, len(checkpoints))
    return checkpoints[-last:]


def training_minutes(checkpoints: list[tuple[int, Path]]) -> list[float]:
    """Minutes of training at each checkpoint (oldest update first), on one clock across resumed stages.

    A checkpoint's `elapsed_s` is the run's clock, which a resumed stage carries on from the checkpoint it
    resumed, so readings rise across stages. Checkpoints written before the clock was carried restart it in a
    resumed stage: where the clock goes back, the new reading is the time since the checkpoint before it (the
    one resumed). Only the metadata is read; the weights stay mapped."""
    minutes, total, previous = [], 0.0, None
    for _, path in checkpoints:
        elapsed = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("elapsed_s")
        if elapsed is None:
            raise ValueError(
                f"{path}: no 'elapsed_s' (a checkpoint from before it was recorded): average by count, "
                "with average.last set and average.last_minutes and average.last_share null"
            )
        total += elapsed if previous is None or elapsed < previous else elapsed - previous
        previous = elapsed
        minutes.append(total / 60.0)
    return minutes


def select(checkpoints: list[tuple[int, Path]], rule: AverageParams) -> list[tuple[int, Path]]:
    """The checkpoints `rule` names: the last `last`, or those of a window of training time (at most `last`)."""
    if rule.last_minutes is None and rule.last_share is None:
        return select_last(checkpoints, rule.last)
    minutes = training_minutes(checkpoints)
    window = rule.last_minutes if rule.last_minutes is not None else rule.last_share * minutes[-1]
    chosen = [c for c, m in zip(checkpoints, minutes, strict=True) if m >= minutes[-1] - window]
    if rule.last is not None:
        chosen = chosen[-rule.last :]
    log.info("the last %.1f minutes of training (to minute %.1f) hold %d checkpoints", window, minutes[-1], len(chosen))
    return chosen


def bpe_reference(bpe_dir: Path) -> dict:
    """The sentencepiece model, by path (relative to the working directory), sha256 and bytes.

    The bytes travel as a uint8 tensor so that `torch.load(weights_only=True)` accepts the file.
    """
    spm_path = bpe_dir / SPM_FILE
    try:
        data = spm_path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{spm_path}: sentencepiece model not found (run the learn_bpe stage)") from None
    return {
        "path": os.path.relpath(spm_path),
        "sha256": hashlib.sha256(data).hexdigest(),
        "model_proto": torch.frombuffer(bytearray(data), dtype=torch.uint8),
    }


def average(checkpoints: Path, bpe_dir: Path, out: Path, rule: AverageParams, languages: dict[str, str]) -> dict:
    """Write the averaged model file; returns what was averaged (for logs and metrics)."""
    chosen = select(find_checkpoints(checkpoints), rule)
    state, config = average_checkpoints([path for _, path in chosen], key="ema" if rule.ema else "model")
    summary = {"checkpoints": [path.name for _, path in chosen], "updates": [u for u, _ in chosen], "ema": rule.ema}
    save_model(out, (state, config), extra={"bpe": bpe_reference(bpe_dir), "languages": languages, **summary})
    log.info("averaged %d checkpoints (updates %s) into %s", len(chosen), summary["updates"], out)
    return summary


def inspect_average(model_file: Path, bpe_dir: Path, raw: Path, params: Params, update: int) -> None:
    """The averaged model's attention grids and translations of the validation sentences the train stage
    inspects, logged to the active run at step `update` (its last checkpoint), beside the train run's."""
    count = params.train.inspect_sentences
    if not count:
        return
    sp = spm.SentencePieceProcessor(model_file=str(bpe_dir / SPM_FILE))
    data = params.data
    sources, references = (read_lines(raw / f"valid.{lang}") for lang in (data.source_lang, data.target_lang))
    model, _ = load_model(model_file)
    found = inspect_model(model, sp, choose_samples(sources, references, sp, count))
    log_inspection(mlflow.MlflowClient(), mlflow.active_run().info.run_id, found, update)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoints", type=Path, required=True)
    p.add_argument("--bpe", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--raw", type=Path, default=None, help="data/raw: validation sentences to inspect")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    params = load_params()
    languages = {"source": params.data.source_lang, "target": params.data.target_lang}
    with stage_run("average", params, ("average",)):
        summary = average(args.checkpoints, args.bpe, args.out, params.average, languages)
        mlflow.log_metrics({"checkpoints_averaged": len(summary["updates"]), "last_update": summary["updates"][-1]})
        mlflow.log_dict(summary, "average.json")
        mlflow.log_artifact(str(args.bpe / SPM_FILE), artifact_path="bpe")
        # The paper's search settings (§6.1) as defaults: this stage does not depend on `decode` params,
        # and callers override them per request (`params={"beam": 2}`).
        log_translation_model(args.out, args.bpe / SPM_FILE, languages)
        if args.raw is not None:
            inspect_average(args.out, args.bpe, args.raw, params, summary["updates"][-1])


if __name__ == "__main__":
    main()
