"""BLEU as tensor2tensor's `get_ende_bleu.sh` computes it: the metric of the paper's 27.3/28.4 on newstest2014.

The script (tensor2tensor/utils/get_ende_bleu.sh, since 2018-04-05), line by line, and its counterpart here:

    perl replace-unicode-punctuation.perl -l de < hyp > hyp.n
        -> MosesPunctNormalizer.replace_unicode_punct (the port of that script; `normalize()` ports the
           different normalize-punctuation.perl)
    perl tokenizer.perl -l de < hyp.n > hyp.tok
        -> MosesTokenizer(lang).tokenize(escape=True, aggressive_dash_splits=False): no -a, escaping on
    perl -ple 's{(\\S)-(\\S)}{$1 ##AT##-##AT## $2}g' < newstest2014.tok.de > ref.atat   (and hyp.tok > hyp.atat)
        -> _COMPOUND below; re.sub resumes after each match as Perl's /g does, one char past the hyphen:
           a-b-c -> a ##AT##-##AT## b-c, but Rhein-Main-Gebiet -> Rhein ##AT##-##AT## Main ##AT##-##AT## Gebiet
    perl multi-bleu.perl ref.atat < hyp.atat
        -> sacreBLEU BLEU(tokenize="none", smooth_method="none", force=True) on the whitespace-separated tokens

The script normalises and tokenises the hypothesis only: the reference it reads is already tokenised
($tok_gold_targets: newstest2013.tok.de in the script, newstest2014.tok.de for the test set; Google's
wmt16_en_de.sh made it with `tokenizer.perl -q -l de`, without replace-unicode-punctuation) and gets only the
##AT## split, as the hypothesis does. `refs_tokenized=True` is that, exactly. Raw references (the default) go
through the same steps as the hypotheses, so that an output equal to its reference scores 100 (tokenised without
normalisation, a “ in both would become &quot; in one and stay “ in the other). The paper (2017) predates the
replace-unicode line (added 2018-04-05): `normalize=False` drops it on both sides, as the script stood then.

multi-bleu.perl vs sacreBLEU: multi-bleu is case-sensitive, single-reference corpus BLEU up to 4-grams with the
brevity penalty exp(1 - r/c) for c < r, and no smoothing: any n-gram precision of 0 (or no n-grams of an order)
makes BLEU 0. sacreBLEU with `smooth_method="none"` and effective_order off computes the same; its default `exp`
smoothing would not (it scores a corpus with no matching 4-gram above 0). Both split tokens on whitespace; the
tokeniser has already turned every Unicode space into ' '.

Why it differs from sacreBLEU's 13a: 13a splits ASCII punctuation only („Das stays one token), never escapes
(" stays ", & stays &), cuts every abbreviation (z.B. -> z . B .) and does no ##AT## split. Neither number
can be compared with the other.

Known differences of sacremoses from the Perl (see bleu_paper's note for the version):
- tokenizer.perl since 2018-11-07 (moses 9fc964da) splits a final `X.` unconditionally; sacremoses keeps the
  earlier rule, the one of 2017: a sentence-final nonbreaking prefix (`usw.`) keeps its period.
- replace-unicode-punctuation.perl mapped fullwidth １ to `"` until 2019-10-14 (moses 5d3331b9); sacremoses maps
  it to 1, as the Perl has since. For 。 and ． the Perl eats following ' *', sacremoses '\\s*'.
- Neither replace-unicode-punctuation.perl nor sacremoses touches „ (U+201E); only “ and ” become ".
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from importlib.metadata import version

from sacrebleu.metrics import BLEU
from sacremoses import MosesPunctNormalizer, MosesTokenizer

# `perl -ple` reads bytes: its \S is any byte but ASCII whitespace, which re.ASCII's \S matches char by char.
_COMPOUND = re.compile(r"(\S)-(\S)", re.ASCII)

_NORMALIZERS: dict[str, MosesPunctNormalizer] = {}
_TOKENIZERS: dict[str, MosesTokenizer] = {}


def _normalizer(lang: str) -> MosesPunctNormalizer:
    if lang not in _NORMALIZERS:
        _NORMALIZERS[lang] = MosesPunctNormalizer(lang=lang)
    return _NORMALIZERS[lang]


def _tokenizer(lang: str) -> MosesTokenizer:
    if lang not in _TOKENIZERS:
        _TOKENIZERS[lang] = MosesTokenizer(lang=lang)
    return _TOKENIZERS[lang]


def _split_compounds(line: str) -> str:
    return _COMPOUND.sub(r"\1 ##AT##-##AT## \2", line)


def paper_tokenize(line: str, lang: str, *, normalize: bool = True) -> str:
    """One line as get_ende_bleu.sh hands it to multi-bleu.perl: replace-unicode-punctuation (unless
    `normalize=False`), tokenizer.perl -l `lang` (escaping on, no -a), then the ##AT## compound split."""
    if normalize:
        line = _normalizer(lang).replace_unicode_punct(line)
    tokens = _tokenizer(lang).tokenize(line, aggressive_dash_splits=False, return_str=True, escape=True)
    return _split_compounds(tokens)


def bleu_paper(
    hyps: Sequence[str],
    refs: Sequence[str],
    lang: str,
    refs_tokenized: bool = False,
    *,
    normalize: bool = True,
) -> dict:
    """get_ende_bleu.sh's BLEU of detokenised hypotheses against line-aligned references in language `lang`.

    `refs_tokenized=True`: the references are tokenised already (like newstest2014.tok.de) and, as in the script,
    get only the ##AT## split. Otherwise they are normalised and tokenised as the hypotheses are.
    `normalize=False`: no replace-unicode-punctuation (the 2017 script).
    """
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references; they must be line-aligned")
    if not hyps:
        raise ValueError("no sentences to score")
    hyp_tok = [paper_tokenize(h, lang, normalize=normalize) for h in hyps]
    if refs_tokenized:
        ref_tok = [_split_compounds(r) for r in refs]
    else:
        ref_tok = [paper_tokenize(r, lang, normalize=normalize) for r in refs]
    bleu = BLEU(tokenize="none", smooth_method="none", force=True)
    score = bleu.corpus_score(hyp_tok, [ref_tok]).score
    return {
        "bleu_paper": round(score, 2),
        "bleu_paper_note": (
            "tensor2tensor get_ende_bleu.sh BLEU (multi-bleu.perl on Moses-tokenised, ##AT##-compound-split text, "
            "the paper's metric); NOT sacreBLEU and not comparable with it. "
            f"BLEU on tokens: {bleu.get_signature()}; tokeniser: sacremoses {version('sacremoses')} "
            f"(tokenizer.perl -l {lang}, {'with' if normalize else 'without'} replace-unicode-punctuation; "
            f"references {'pre-tokenised' if refs_tokenized else 'processed as the hypotheses'})."
        ),
    }
