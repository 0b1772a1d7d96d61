"""Translating token ids with a trained model: the one token-level inference path.

The decode and curve stages, the `translate` command and the MLflow model all go through `translate_ids`:
sources grouped into batches by a budget of padded source tokens (longest first, `batching.translation_batches`),
padded (`batching.pad_right`), searched with beams (§6.1, `beam_search`), and returned in input order. The text
side (sentencepiece, files) stays in `pipeline/`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from transformer.batching import pad_right, translation_batches
from transformer.beam_search import beam_search
from transformer.model import Transformer


@dataclass(frozen=True)
class SearchOptions:
    """§6.1: beam 4, length penalty α = 0.6, maximum output length = input length + 50."""

    beam: int = 4
    alpha: float = 0.6
    max_len_a: float = 1.0
    max_len_b: int = 50
    max_tokens: int = 8000  # padded source tokens per batch


@torch.inference_mode()
def search_batch(model: Transformer, sources: Sequence[Sequence[int]], options: SearchOptions) -> list[list[int]]:
    """Best hypothesis (token ids, no bos/eos) for each source (ids ending in eos), same order, as one batch."""
    device = next(model.parameters()).device
    src = pad_right(sources).to(device)  # (B, S)
    # bf16 autocast on GPUs only: CPUs without AVX-512 lack native bf16 and run it ~100× slower (STACK-FACTS).
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    o = options
    with autocast:
        nbest = beam_search(
            model, src, beam=o.beam, alpha=o.alpha, max_len_a=o.max_len_a, max_len_b=o.max_len_b, nbest=1
        )
    return [list(hyps[0].tokens) for hyps in nbest]


def translate_in_batches(
    search: Callable[[list[Sequence[int]]], list[list[int]]],
    sources: Sequence[Sequence[int]],
    max_tokens: int,
    progress: Callable[[int], object] | None = None,
) -> list[list[int]]:
    """`search` (a batch of sources -> their best hypotheses) over batches of at most `max_tokens` padded source
    tokens, results in input order; `progress(n)` is called after each batch of n sentences. Any engine's search
    (this library's, or another's such as CTranslate2) gets the same batches."""
    out: list[list[int]] = [[] for _ in sources]
    for batch in translation_batches([len(s) for s in sources], max_tokens):
        rows = batch.tolist()
        for i, tokens in zip(rows, search([sources[i] for i in rows]), strict=True):
            out[i] = tokens
        if progress is not None:
            progress(len(rows))
    return out


def translate_ids(
    model: Transformer,
    sources: Sequence[Sequence[int]],
    options: SearchOptions,
    progress: Callable[[int], object] | None = None,
) -> list[list[int]]:
    """Best hypothesis for each source, in input order, by this library's beam search."""
    return translate_in_batches(
        lambda batch: search_batch(model, batch, options), sources, options.max_tokens, progress
    )
