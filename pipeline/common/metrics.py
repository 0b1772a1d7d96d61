"""The scores of a system's output, one definition for every stage and tool that scores: sacreBLEU BLEU and chrF
with their signatures, sacreBLEU's bootstrap interval, and the labelled comparison BLEUs (see pipeline/score.py).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a


def sacrebleu_scores(hyps: Sequence[str], refs: Sequence[str], tokenize: str = "13a") -> dict:
    """sacreBLEU's BLEU and chrF of detokenised hypotheses against one reference each, with their signatures."""
    bleu, chrf = BLEU(tokenize=tokenize), CHRF()
    return {
        "bleu": round(bleu.corpus_score(hyps, [refs]).score, 2),
        "bleu_signature": str(bleu.get_signature()),
        "chrf": round(chrf.corpus_score(hyps, [refs]).score, 2),
        "chrf_signature": str(chrf.get_signature()),
    }


# compound_split_bleu.sh: perl -ple 's{(\S)-(\S)}{$1 ##AT##-##AT## $2}g' (same non-overlapping matches).
_COMPOUND = re.compile(r"(\S)-(\S)")


def compound_split(line: str) -> str:
    return _COMPOUND.sub(r"\1 ##AT##-##AT## \2", line)


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


def score(hyps: Sequence[str], refs: Sequence[str], tokenize: str = "13a", bootstrap: int = 0) -> dict:
    """All the scores, each BLEU with the sacreBLEU signature that says how it was computed; with `bootstrap`
    resamples (> 1), also BLEU's 95% confidence interval."""
    result = {"sentences": len(hyps), **sacrebleu_scores(hyps, refs, tokenize)}
    if bootstrap > 1:
        result.update(bleu_confidence(hyps, refs, tokenize, bootstrap))
    tok = Tokenizer13a()
    split_hyps = [compound_split(tok(h)) for h in hyps]
    split_refs = [compound_split(tok(r)) for r in refs]
    compound = BLEU(tokenize="none", force=True)
    result["bleu_compound_split"] = round(compound.corpus_score(split_hyps, [split_refs]).score, 2)
    result["bleu_compound_split_note"] = (
        "tokenised BLEU with compound splitting (paper's compound_split_bleu.sh; 13a tokeniser for Moses); "
        f"not sacreBLEU: {compound.get_signature()}"
    )
    lowercased = BLEU(tokenize="13a", lowercase=True)
    result["bleu_tok_lc"] = round(lowercased.corpus_score(hyps, [refs]).score, 2)
    result["bleu_tok_lc_note"] = f"tokenised lower-cased BLEU (Multi30k convention): {lowercased.get_signature()}"
    return result
