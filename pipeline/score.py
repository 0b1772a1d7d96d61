"""Stage `score`: sacreBLEU and chrF of the detokenised, cased hypotheses against the raw references.

    python -m pipeline.score --hyp outputs/hyp.txt --raw data/raw --out metrics/score.json

`bleu` (with its sacreBLEU signature) and `chrf` are the numbers to report. Two other BLEUs are computed for
comparison with published numbers only, and labelled so wherever they appear:
- `bleu_paper`: the paper's 27.3/28.4 metric, computed as tensor2tensor's `get_ende_bleu.sh` computes it (Moses
  unicode-punctuation normalisation and tokenizer via sacremoses, ` ##AT##-##AT## ` compound splitting,
  multi-bleu on the tokens: pipeline/common/paper_bleu.py). The reference is tokenised like the hypotheses, or,
  with `score.paper_reference`, read already tokenised from that file (as the script read Google's
  newstest2014.tok.de). Not sacreBLEU and not comparable with it.
- `bleu_tok_lc`: tokenised (13a), lower-cased BLEU, the convention of published Multi30k results.

`bleu_ci95` is how finely the test set resolves this one system: the half-width of sacreBLEU's 95% bootstrap
interval (`sacrebleu --confidence`, `score.bootstrap` resamples of the sentences, sacreBLEU's fixed seed), around
`bleu_bootstrap_mean`. Two systems are compared more finely by a paired test on the same sentences:
`sacrebleu REF -i HYP_A HYP_B --paired-bs` (docs/evaluation.md).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import mlflow

from pipeline.common.files import read_lines, write_text_atomic
from pipeline.common.metrics import score
from pipeline.common.params import load_params
from pipeline.common.tracking import log_pipeline_result, log_stage_metrics, stage_run

log = logging.getLogger("pipeline.score")


def read_pair(hyp_path: Path, ref_path: Path) -> tuple[list[str], list[str]]:
    hyps, refs = read_lines(hyp_path), read_lines(ref_path)
    if len(hyps) != len(refs):
        raise ValueError(
            f"line counts differ: {hyp_path} has {len(hyps)} lines, {ref_path} has {len(refs)}; "
            "hypotheses must be line-aligned with the references"
        )
    return hyps, refs


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hyp", type=Path, required=True)
    p.add_argument("--raw", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    params = load_params()
    target = params.data.target_lang
    ref_path = args.raw / f"{params.decode.split}.{target}"
    hyps, refs = read_pair(args.hyp, ref_path)
    paper_path = params.score.paper_reference
    paper_refs = read_pair(args.hyp, Path(paper_path))[1] if paper_path else None
    with stage_run("score", params, ("data", "decode", "score")):
        s = params.score
        result = {"split": params.decode.split, **score(hyps, refs, s.tokenize, s.bootstrap, target, paper_refs)}
        write_text_atomic(args.out, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        log_stage_metrics(result)
        mlflow.log_artifact(str(args.out), artifact_path="metrics")
        log_pipeline_result(result, args.out)
    ci = f" ± {result['bleu_ci95']:.2f} (95%, bootstrap)" if "bleu_ci95" in result else ""
    print(f"BLEU {result['bleu']}{ci} ({result['bleu_signature']})  chrF {result['chrf']}")
    print(f"paper BLEU {result['bleu_paper']} (get_ende_bleu.sh, tokenised and compound-split: not sacreBLEU)")


if __name__ == "__main__":
    main()
