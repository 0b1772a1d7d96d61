"""The scores of a system's output, one definition for every stage and tool that scores: sacreBLEU BLEU and chrF
with their signatures, sacreBLEU's bootstrap interval, and the labelled comparison BLEUs (the paper's
`bleu_paper`, pipeline/common/paper_bleu.py; `bleu_tok_lc`). See pipeline/score.py.
"""

from __future__ import annotations

from collections.abc import Sequence

from sacrebleu.metrics import BLEU, CHRF

from pipeline.common.paper_bleu import bleu_paper


def sacrebleu_scores(hyps: Sequence[str], refs: Sequence[str], tokenize: str = "13a") -> dict:
    """sacreBLEU's BLEU and chrF of detokenised hypotheses against one reference each, with their signatures."""
    bleu, chrf = BLEU(tokenize=tokenize), CHRF()
    return {
        "bleu": round(bleu.corpus_score(hyps, [refs]).score, 2),
        "bleu_signature": str(bleu.get_signature()),
        "chrf": round(chrf.corpus_score(hyps, [refs]).score, 2),
        "chrf_signature": str(chrf.get_signature()),
    }


def bleu_confidence(hyps: Sequence[str], refs: Sequence[str], tokenize: str, resamples: int) -> dict:
    """sacreBLEU's bootstrap estimate for one system, the numbers of `sacrebleu --confidence`."""
    bleu = BLEU(tokenize=tokenize)
    resampled = bleu.corpus_score(hyps, [refs], n_bootstrap=resamples)
    # sacreBLEU keeps the estimate on the Score (what its command line prints as "μ = mean ± ci") without a
    # public accessor; tests/test_score.py checks these against the command line's output.
    return {
        "bleu_bootstrap_mean": round(resampled._mean, 2),
        "bleu_ci95": round(resampled._ci, 2),
        "bleu_ci95_signature": str(bleu.get_signature()),
    }


def score(
    hyps: Sequence[str],
    refs: Sequence[str],
    tokenize: str = "13a",
    bootstrap: int = 0,
    lang: str = "de",
    paper_refs: Sequence[str] | None = None,
) -> dict:
    """All the scores, each BLEU with the signature that says how it was computed; with `bootstrap` resamples
    (> 1), also BLEU's 95% confidence interval. `bleu_paper` is the paper's metric in target language `lang`,
    against `paper_refs` (already tokenised, as the paper's script read newstest2014.tok.de) when given, else
    against `refs` tokenised like the hypotheses."""
    result = {"sentences": len(hyps), **sacrebleu_scores(hyps, refs, tokenize)}
    if bootstrap > 1:
        result.update(bleu_confidence(hyps, refs, tokenize, bootstrap))
    tokenized = paper_refs is not None
    result.update(bleu_paper(hyps, paper_refs if tokenized else refs, lang, refs_tokenized=tokenized))
    lowercased = BLEU(tokenize="13a", lowercase=True)
    result["bleu_tok_lc"] = round(lowercased.corpus_score(hyps, [refs]).score, 2)
    result["bleu_tok_lc_note"] = f"tokenised lower-cased BLEU (Multi30k convention): {lowercased.get_signature()}"
    return result
