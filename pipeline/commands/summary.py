"""What `make demo` prints at the end: the scores, and how to look at the runs in MLflow.

python -m pipeline.commands.summary [--score metrics/score.json]
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from mlflow.tracking import MlflowClient

from pipeline.common.params import load_params
from pipeline.common.tracking import tracking_uri

UI_PORT = 5000


def read_scores(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no scores yet (run `dvc repro` or `dvc exp run` first)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def latest_pipeline_run(uri: str, experiment: str):
    """The newest parent run of the experiment, or None (e.g. when MLflow was not reachable)."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None, None
    runs = client.search_runs(
        [exp.experiment_id], "tags.kind = 'pipeline'", order_by=["attributes.start_time DESC"], max_results=1
    )
    return exp, (runs[0] if runs else None)


def ui_command(uri: str) -> str:
    return f"mlflow ui --backend-store-uri {shlex.quote(uri)} --host 127.0.0.1 --port {UI_PORT} --workers 1"


def confidence_lines(scores: dict) -> list[str]:
    if "bleu_ci95" not in scores:
        return []
    ci, mean = scores["bleu_ci95"], scores["bleu_bootstrap_mean"]
    return [
        f"      BLEU ± {ci:.2f} at 95% over resampled sentences (mean {mean:.2f}); two runs, paired:",
        "      sacrebleu REF -i HYP_A HYP_B --paired-bs",
    ]


def summary(scores: dict, uri: str, experiment: str) -> str:
    lines = [
        f"BLEU  {scores['bleu']:.2f}   sacreBLEU {scores['bleu_signature']}",
        f"chrF  {scores['chrf']:.2f}   {scores['chrf_signature']}",
        f"      ({scores['sentences']} sentences of the {scores['split']} split)",
        *confidence_lines(scores),
        "For comparison with published numbers only (not sacreBLEU; see metrics/score.json):",
        f"  {scores['bleu_paper']:.2f}  the paper's BLEU (get_ende_bleu.sh: Moses-tokenised, compound-split; 27.3 base / 28.4 big)",  # noqa: E501
        f"  {scores['bleu_tok_lc']:.2f}  tokenised lower-cased BLEU (the Multi30k convention)",
        "",
        "MLflow: every stage's params, metrics and artifacts, one parent run per pipeline execution.",
        f"  {ui_command(uri)}",
        f"  then open http://127.0.0.1:{UI_PORT} and flip the 'Model training' switch at the top left",
        "  (the UI opens in its GenAI layout); runs, charts and artifacts are there.",
    ]
    exp, run = latest_pipeline_run(uri, experiment) if uri.startswith("sqlite:") else (None, None)
    if run is not None:
        lines.append(
            f"  latest run: http://127.0.0.1:{UI_PORT}/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}"
        )
        model = run.data.tags.get("translator_uri")
        if model:
            lines += [
                f"  the averaged model as a pyfunc model: {model}",
                f"    MLFLOW_TRACKING_URI={uri} mlflow models serve -m {model} --env-manager local"
                " -h 127.0.0.1 -p 5001",
            ]
    lines += ["", "Translate your own text:  echo 'A man is walking.' | translate --model models/average.pt"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--score", type=Path, default=Path("metrics/score.json"))
    args = p.parse_args(argv)
    params = load_params()
    print(summary(read_scores(args.score), tracking_uri(params), params.mlflow.experiment))


if __name__ == "__main__":
    main()
