"""Greedy search over a batch of sentences, and the rules every search here shares (§6.1: maximum output
length input length + 50).

A search talks to the model only through `encode`, `init_state`, `decode_step` and `reorder_state`, and decodes
every sentence of the batch at once; a sentence leaves the batch as soon as it is done, so the rows that remain
are all live. Conventions (those of fairseq's `sequence_generator.py`), shared with `beam_search`:
- A hypothesis is its tokens Y without bos and eos. The maximum output length counts the tokens without eos; at
  that length eos is the only allowed token (with its own log-probability, not renormalised).
- pad and bos are never generated.

Greedy search lives apart from beam search because the train stage uses it (the sample translations it logs at
each validation) and beam search shapes nothing the train stage writes: a change to beam search must not rerun
training (tests/test_stage_deps.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from transformer.model import BOS_ID, EOS_ID, PAD_ID, Transformer


def max_output_length(src_len: int, max_len_a: float, max_len_b: int, max_positions: int) -> int:
    """⌊a · source length⌋ + b tokens (eos excluded); the decoder must also fit bos + tokens into its positions,
    so the length is capped at max_positions − 1."""
    return min(math.floor(max_len_a * src_len) + max_len_b, max_positions - 1)


def max_output_lengths(src: Tensor, max_len_a: float, max_len_b: int, max_positions: int) -> list[int]:
    """`max_output_length` of each sentence of src (N, S), padded with pad_id."""
    return [max_output_length(n, max_len_a, max_len_b, max_positions) for n in src.ne(PAD_ID).sum(dim=1).tolist()]


def mask_step(scores: Tensor, force_eos: Tensor | None) -> Tensor:
    """Forbid pad and bos in scores (R, V) (logits or log-probs); rows where `force_eos` (R,) is True may only
    take eos."""
    scores[:, PAD_ID] = -math.inf
    scores[:, BOS_ID] = -math.inf
    if force_eos is not None:
        eos = scores[:, EOS_ID].clone()
        scores.masked_fill_(force_eos[:, None], -math.inf)
        scores[:, EOS_ID] = eos
    return scores


def force_eos_rows(t: int, max_len: Tensor, max_len_min: int, beam: int) -> Tensor | None:
    """Rows (N·beam,) whose sentence has reached its maximum length at step t; None while none can have."""
    if t < max_len_min:
        return None
    return max_len.eq(t).repeat_interleave(beam)


@torch.inference_mode()
def greedy_search(model: Transformer, src: Tensor, max_len_a: float = 1.0, max_len_b: int = 50) -> list[list[int]]:
    """The most probable next token at each step, for each sentence of src (N, S) padded with pad_id."""
    N, device = src.shape[0], src.device
    if N == 0:
        return []
    limits = max_output_lengths(src, max_len_a, max_len_b, model.cfg.max_positions)
    state = model.init_state(model.encode(src), max(limits) + 1)
    max_len = torch.tensor(limits, device=device)  # (n,) for the sentences still in the batch
    ids = torch.arange(N, device=device)  # their positions in src
    tokens = torch.full((N,), BOS_ID, dtype=torch.long, device=device)
    history = torch.empty(N, 0, dtype=torch.long, device=device)  # (n, t)
    out: list[list[int]] = [[] for _ in range(N)]
    for t in range(max(limits) + 1):
        logits = model.decode_step(tokens, state, log_probs=False)  # the argmax needs no softmax
        tokens = mask_step(logits, force_eos_rows(t, max_len, min(limits), 1)).argmax(dim=-1)  # (n,)
        history = torch.cat([history, tokens[:, None]], dim=1)
        done = tokens.eq(EOS_ID)
        finished = done.nonzero()[:, 0].tolist()
        if not finished:
            continue
        for i, row in zip(ids[finished].tolist(), history[finished, :-1].tolist(), strict=True):
            out[i] = row
        if len(finished) == len(ids):
            break
        keep = (~done).nonzero()[:, 0]
        ids, max_len, tokens, history = ids[keep], max_len[keep], tokens[keep], history[keep]
        limits = [limits[i] for i in keep.tolist()]
        state = model.reorder_state(state, keep)
    return out
