"""Beam search over a batch of sentences (§6.1: beam 4, length penalty α = 0.6, maximum output length
input length + 50, terminating early when possible).

It talks to the model only through `encode`, `init_state`, `decode_step` and `reorder_state`, and decodes every
sentence of the batch at once: a beam search step is one model call over N·k rows and a handful of tensor ops,
whatever N and k are. A sentence leaves the batch as soon as it is done, so the rows that remain are all live.

Conventions (those of fairseq's `sequence_generator.py`):
- A hypothesis is its tokens Y without bos and eos; every returned hypothesis ended with eos, and its log-prob
  includes that eos. The maximum output length counts the tokens without eos; at that length eos is the only
  allowed token (with its own log-probability, not renormalised).
- |Y| in the length penalty counts the eos: lp(Y) = ((5 + |Y|) / 6)^α (GNMT, Wu et al. 2016, the paper's
  t2t implementation) or |Y|^α ("hf", what Hugging Face's `generate` divides by), score = log P(Y) / lp(Y).
- pad and bos are never generated.
- Only eos among the k best candidates of a step ends a hypothesis (an eos ranked below them would not have been
  in the beam); the k best non-eos candidates stay live.

Stopping (`stop`), per sentence:
- "bound" (default; the paper's tensor2tensor `stop_early`): done once no live hypothesis can beat the
  nbest-th finished one. Log-probabilities only fall as a hypothesis grows, and lp is largest at the longest
  length allowed, so best_live_logprob / max lp bounds every score a live hypothesis can still reach. The
  returned n-best is then what an unbounded search over the same beam would return.
- "k_finished" (fairseq; `generate(early_stopping=True)`): done once k hypotheses have finished. Cheaper (fewer
  steps) but may stop while a live hypothesis, made longer, would still score better; with k = 1 it is greedy.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from transformer.model import BOS_ID, EOS_ID, PAD_ID, DecoderState, Transformer
from transformer.search import force_eos_rows, mask_step, max_output_lengths

LENGTH_PENALTIES = ("gnmt", "hf")
STOP_RULES = ("bound", "k_finished")


class Hypothesis(NamedTuple):
    tokens: list[int]  # without bos and eos
    score: float  # logprob / lp(|tokens| + 1)
    logprob: float  # log P(tokens + eos | source)


def penalty_table(kind: str, alpha: float, longest: int, device: torch.device) -> Tensor:
    """lp(L) for L = 0..longest, L counting the eos."""
    length = torch.arange(longest + 1, dtype=torch.float64, device=device)
    if kind == "gnmt":
        return (((5.0 + length) / 6.0) ** alpha).float()
    if kind == "hf":
        return length.clamp(min=1.0).pow(alpha).float()
    raise ValueError(f"unknown length_penalty '{kind}'; choose one of {LENGTH_PENALTIES}")


class _Finished(NamedTuple):
    """The best `beam` finished hypotheses of each sentence still in the batch, sorted by score."""

    score: Tensor  # (n, k), -inf for empty slots
    logprob: Tensor  # (n, k)
    tokens: Tensor  # (n, k, T) padded with pad_id
    length: Tensor  # (n, k) tokens without eos

    def select(self, keep: Tensor) -> _Finished:
        return _Finished(*(x[keep] for x in self))


def _merge_finished(fin: _Finished, new_score: Tensor, new_logprob: Tensor, new_tokens: Tensor, t: int) -> _Finished:
    """Keep the best k of the finished hypotheses and those (n, k) that ended with eos at step t."""
    n, k, T = fin.tokens.shape
    padded = new_tokens.new_full((n, k, T), PAD_ID)
    padded[:, :, :t] = new_tokens
    score, best = torch.cat([fin.score, new_score], dim=1).topk(k, dim=1)  # (n, k)
    logprob = torch.cat([fin.logprob, new_logprob], dim=1).gather(1, best)
    tokens = torch.cat([fin.tokens, padded], dim=1).gather(1, best[:, :, None].expand(n, k, T))
    length = torch.cat([fin.length, fin.length.new_full((n, k), t)], dim=1).gather(1, best)
    return _Finished(score, logprob, tokens, length)


def _collect(fin: _Finished, nbest: int) -> list[list[Hypothesis]]:
    """The n-best lists of the sentences in `fin`, best first, empty slots left out."""
    rows = zip(fin.score.tolist(), fin.logprob.tolist(), fin.tokens.tolist(), fin.length.tolist(), strict=True)
    return [
        [Hypothesis(tok[:n], s, lp) for s, lp, tok, n in zip(*row, strict=True) if s > -math.inf][:nbest]
        for row in rows
    ]


def _check_args(beam: int, nbest: int, alpha: float, length_penalty: str, stop: str) -> None:
    if beam < 1:
        raise ValueError(f"beam must be >= 1, got {beam}")
    if not 1 <= nbest <= beam:
        raise ValueError(f"nbest must be between 1 and beam ({beam}), got {nbest}")
    if length_penalty not in LENGTH_PENALTIES:
        raise ValueError(f"unknown length_penalty '{length_penalty}'; choose one of {LENGTH_PENALTIES}")
    if stop not in STOP_RULES:
        raise ValueError(f"unknown stop rule '{stop}'; choose one of {STOP_RULES}")
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")


@torch.inference_mode()
def beam_search(
    model: Transformer,
    src: Tensor,
    beam: int = 4,
    alpha: float = 0.6,
    max_len_a: float = 1.0,
    max_len_b: int = 50,
    nbest: int = 1,
    length_penalty: str = "gnmt",
    stop: str = "bound",
) -> list[list[Hypothesis]]:
    """Beam search of width `beam` for every sentence of src (N, S) padded with pad_id; for each sentence its
    `nbest` best finished hypotheses, best first (see the module docstring for the conventions)."""
    _check_args(beam, nbest, alpha, length_penalty, stop)
    N, k, device = src.shape[0], beam, src.device
    if N == 0:
        return []
    limits = max_output_lengths(src, max_len_a, max_len_b, model.cfg.max_positions)
    T = max(limits)
    lp = penalty_table(length_penalty, alpha, T + 1, device)  # (T+2,)
    state = model.init_state(model.encode(src), T + 1)
    max_len = torch.tensor(limits, device=device)  # (n,) for the sentences still in the batch
    # Best score a live hypothesis could reach is logprob / lp_max: lp at the longest length if α ≥ 0.
    lp_max = lp[max_len + 1] if alpha >= 0 else None
    ids = torch.arange(N, device=device)  # positions in src of the sentences still in the batch
    rows = 1  # rows per sentence: one until the first step has given k distinct prefixes
    scores = torch.zeros(N, 1, device=device)  # (n, rows) log-probs of the live prefixes
    history = torch.empty(N, 1, 0, dtype=torch.long, device=device)  # (n, rows, t) their tokens
    tokens = torch.full((N,), BOS_ID, dtype=torch.long, device=device)
    fin = _Finished(
        torch.full((N, k), -math.inf, device=device),
        torch.zeros(N, k, device=device),
        torch.full((N, k, T), PAD_ID, dtype=torch.long, device=device),
        torch.zeros(N, k, dtype=torch.long, device=device),
    )
    out: list[list[Hypothesis]] = [[] for _ in range(N)]
    for t in range(T + 1):
        n = scores.shape[0]
        cand_score, cand_beam, cand_token = _candidates(
            model, tokens, state, scores, k, force_eos_rows(t, max_len, min(limits), rows)
        )
        is_eos = cand_token.eq(EOS_ID) & cand_score.isfinite()

        # Hypotheses that end here: eos among the k best candidates.
        ended = is_eos[:, :k]
        ended_prefix = history.gather(1, cand_beam[:, :k, None].expand(n, k, t))  # (n, k, t)
        ended_score = (cand_score[:, :k] / lp[t + 1]).masked_fill(~ended, -math.inf)
        fin = _merge_finished(fin, ended_score, cand_score[:, :k], ended_prefix, t)

        # The k best candidates that did not end stay live.
        live_score, live = cand_score.masked_fill(is_eos, -math.inf).topk(k, dim=1)  # (n, k)
        live_beam = cand_beam.gather(1, live)
        live_token = cand_token.gather(1, live)
        history = torch.cat([history.gather(1, live_beam[:, :, None].expand(n, k, t)), live_token[:, :, None]], 2)

        done = _sentence_done(fin, live_score, max_len, t, k, nbest, stop, lp_max, lp[min(t + 2, T + 1)])
        order = (torch.arange(n, device=device)[:, None] * rows + live_beam).view(-1)  # (n·k,)
        finished = done.nonzero()[:, 0].tolist()
        if finished:
            for i, hyps in zip(ids[finished].tolist(), _collect(fin.select(done), nbest), strict=True):
                out[i] = hyps
            if len(finished) == n:
                break
            keep = (~done).nonzero()[:, 0]
            ids, max_len, fin = ids[keep], max_len[keep], fin.select(keep)
            lp_max = None if lp_max is None else lp_max[keep]
            live_score, live_token, history = live_score[keep], live_token[keep], history[keep]
            limits = [limits[i] for i in keep.tolist()]
            order = order.view(n, k)[keep].view(-1)
            state = model.reorder_state(state, order, beam=k)
        else:
            state = model.reorder_state(state, order, beam=k, within_sentences=rows == k)
        rows, scores, tokens = k, live_score, live_token.view(-1)
    return out


def _candidates(
    model: Transformer, tokens: Tensor, state: DecoderState, scores: Tensor, k: int, force_eos: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """The 2k best one-token extensions of each sentence's live prefixes: (score, beam, token), each (n, 2k),
    best first; score = prefix log-prob + log P(token). Each row's own 2k best tokens hold every candidate
    of the sentence's 2k best, so the softmax is normalised by a logsumexp and the sentence-wide top-k runs
    over k·2k candidates instead of k·V."""
    n, rows = scores.shape
    logits = model.decode_step(tokens, state, log_probs=False)  # (n·rows, V)
    log_z = torch.logsumexp(logits, dim=-1, keepdim=True)  # (n·rows, 1), before pad/bos are masked
    top_logit, top_token = mask_step(logits, force_eos).topk(min(2 * k, logits.shape[1]), dim=1)
    width = top_token.shape[1]
    cand = (top_logit - log_z + scores.view(-1, 1)).view(n, rows * width)  # (n, rows·width)
    if rows * width < 2 * k:  # tiny vocabularies: fewer candidates than the beam needs
        cand = torch.nn.functional.pad(cand, (0, 2 * k - rows * width), value=-math.inf)
    cand_score, index = cand.topk(2 * k, dim=1)  # (n, 2k)
    index = index.clamp_(max=rows * width - 1)  # padding columns (-inf scores) point at a real one
    cand_token = top_token.view(n, rows * width).gather(1, index)
    return cand_score, index // width, cand_token


def _sentence_done(
    fin: _Finished,
    live_score: Tensor,
    max_len: Tensor,
    t: int,
    k: int,
    nbest: int,
    stop: str,
    lp_max: Tensor | None,
    lp_next: Tensor,
) -> Tensor:
    """(n,) True for the sentences whose search is over after step t."""
    done = max_len.le(t) | live_score[:, 0].isneginf()  # at the maximum length, or nothing left alive
    if stop == "k_finished":
        return done | fin.score[:, k - 1].isfinite()
    # α < 0 favours short outputs: the best a live hypothesis can do is to end at the next step.
    bound = live_score[:, 0] / (lp_next if lp_max is None else lp_max)
    return done | fin.score[:, nbest - 1].ge(bound)
