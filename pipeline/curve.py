"""Stage `curve`: validation BLEU over training time, to decide how long to train.

    python -m pipeline.curve --snapshots models/snapshots --checkpoints models/checkpoints --bpe data/bpe \
        --raw data/raw --out plots/bleu_curve.csv --png plots/bleu_curve.png

Each weights-only snapshot the train stage took every `train.snapshot_every_minutes` (and at its end) decodes
the valid split with the `decode` search settings (batching: the same `Translator` as `decode`), `curve.beam`
and `curve.alpha` replacing beam and alpha where set (beam 1: greedy, much cheaper for many snapshots), and
is scored with sacreBLEU against the raw references. With no snapshots (`snapshot_every_minutes: null`, the
smoke preset) the kept checkpoints are the points, each at the minute it was written. The x axis is minutes on
the run's clock (Ray start-up included, like `train.max_minutes`; a resumed stage's clock goes on from its
checkpoint's, so the snapshots of a crashed stage and of its rerun are points of one curve); single models,
never averages, so a point says what stopping at that minute gives before averaging.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path

import mlflow
import sentencepiece as spm

from pipeline.common.files import atomic_path, read_lines, write_csv_atomic
from pipeline.common.layout import SNAPSHOT_INDEX, SPM_FILE, find_checkpoints
from pipeline.common.metrics import sacrebleu_scores
from pipeline.common.params import Params, load_params
from pipeline.common.tracking import stage_run
from pipeline.common.translator import Translator, resolve_device, search_options
from transformer.checkpoint import load, load_model
from transformer.inference import SearchOptions

log = logging.getLogger("pipeline.curve")
COLUMNS = ("minutes", "elapsed_minutes", "update", "tokens", "bleu", "chrf", "source")


def snapshot_points(snapshots: Path) -> list[dict]:
    """The snapshots listed in `snapshots/index.json` (written by the train stage), oldest first."""
    index = snapshots / SNAPSHOT_INDEX
    if not index.is_file():
        raise FileNotFoundError(f"{index}: snapshot index not found (run the train stage)")
    try:
        entries = json.loads(index.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{index}: not valid JSON ({e})") from None
    points = []
    for i, e in enumerate(entries):
        missing = {"file", "minutes", "elapsed_minutes", "update", "tokens"} - set(e)
        if missing:
            raise ValueError(f"{index}: entry {i} lacks {sorted(missing)}")
        path = snapshots / e["file"]
        if not path.is_file():
            raise FileNotFoundError(f"{path}: listed in {index} but missing")
        points.append({**{k: e[k] for k in COLUMNS[:4]}, "path": path, "source": "snapshot"})
    return sorted(points, key=lambda p: p["update"])


def checkpoint_points(checkpoints: Path) -> list[dict]:
    """The kept checkpoints, each at the run-clock minute it was written (`elapsed_s` inside the file)."""
    points = []
    for update, path in find_checkpoints(checkpoints):
        state = load(path)
        if state.get("elapsed_s") is None:
            raise ValueError(f"{path}: no 'elapsed_s' (written before the curve existed); rerun the train stage")
        minutes = state["elapsed_s"] / 60.0
        tokens = state.get("tokens", 0)
        points.append({"minutes": minutes, "elapsed_minutes": minutes, "update": update, "tokens": tokens})
        points[-1] |= {"path": path, "source": "checkpoint"}
    return points


def curve_points(snapshots: Path, checkpoints: Path) -> list[dict]:
    points = snapshot_points(snapshots)
    if not points:
        log.info("no snapshots (train.snapshot_every_minutes is null): using the kept checkpoints")
        points = checkpoint_points(checkpoints)
    return points


def measure(
    points: list[dict],
    sp: spm.SentencePieceProcessor,
    sources: list[str],
    refs: list[str],
    options: SearchOptions,
    device: str = "auto",
) -> tuple[list[dict], str]:
    """BLEU and chrF of each point's translations of `sources` on `device` (decode.device); returns the rows and
    the BLEU signature."""
    rows, signature = [], ""
    for p in points:
        model, _ = load_model(p["path"], map_location=resolve_device(device))
        scores = sacrebleu_scores(Translator(model, sp, options).translate(sources), refs)
        rows.append({k: p[k] for k in COLUMNS if k in p} | {"bleu": scores["bleu"], "chrf": scores["chrf"]})
        signature = scores["bleu_signature"]
        log.info("minute %.1f (update %d): valid BLEU %.2f", p["minutes"], p["update"], scores["bleu"])
    return rows, signature


def write_csv(path: Path, rows: list[dict]) -> None:
    minutes = ("minutes", "elapsed_minutes")
    write_csv_atomic(path, ({**r, **{k: round(r[k], 2) for k in minutes}} for r in rows), COLUMNS)


def plot(path: Path, rows: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    ax.plot([r["minutes"] for r in rows], [r["bleu"] for r in rows], marker="o")
    for r in rows:
        ax.annotate(f"{r['bleu']:.1f}", (r["minutes"], r["bleu"]), textcoords="offset points", xytext=(0, 6),
                    ha="center", fontsize=8)  # fmt: skip
    ax.set_xlabel("training minutes (the run's clock)")
    ax.set_ylabel("sacreBLEU (valid)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def curve_options(params: Params) -> SearchOptions:
    options = search_options(params.decode)
    beam = params.curve.beam if params.curve.beam is not None else options.beam
    alpha = params.curve.alpha if params.curve.alpha is not None else options.alpha
    return replace(options, beam=beam, alpha=alpha)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--snapshots", type=Path, required=True)
    p.add_argument("--checkpoints", type=Path, required=True)
    p.add_argument("--bpe", type=Path, required=True)
    p.add_argument("--raw", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="CSV: minutes, update, bleu, ...")
    p.add_argument("--png", type=Path, required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    params = load_params()
    sources = read_lines(args.raw / f"valid.{params.data.source_lang}")
    refs = read_lines(args.raw / f"valid.{params.data.target_lang}")
    if len(sources) != len(refs):
        raise ValueError(f"{args.raw}: valid source and target line counts differ ({len(sources)}, {len(refs)})")
    with stage_run("curve", params, ("data", "decode", "curve")):
        points = curve_points(args.snapshots, args.checkpoints)
        sp = spm.SentencePieceProcessor(model_file=str(args.bpe / SPM_FILE))
        options = curve_options(params)
        rows, signature = measure(points, sp, sources, refs, options, params.decode.device)
        write_csv(args.out, rows)
        what = "snapshots" if rows[0]["source"] == "snapshot" else "kept checkpoints"
        search = "greedy" if options.beam == 1 else f"beam {options.beam}"
        plot(args.png, rows, f"{params.preset}: valid BLEU of single {what}, {search}\n{signature}")
        for r in rows:
            mlflow.log_metrics({"valid_bleu": r["bleu"], "valid_chrf": r["chrf"], "minutes": r["minutes"]}, r["update"])
        mlflow.set_tag("bleu_signature", signature)
        mlflow.log_artifact(str(args.out), artifact_path="plots")
        mlflow.log_artifact(str(args.png), artifact_path="plots")


if __name__ == "__main__":
    main()
