"""What the model attends to: the attention weights of every layer and head, for looking inside a model.

    with record_attention(model) as calls:        # any forward, encode or decode_step inside the block
        model(src, tgt_in)
    maps = AttentionMaps.from_calls(model, calls)  # per layer: (B, h, T_q, T_k)

Outside the block attention modules run `F.scaled_dot_product_attention`, which never forms the weights (fused
kernels on GPUs), or on a CPU for short sequences form them and drop them (`model.short_attention`); inside it,
the weights are formed explicitly and kept (see `MultiHeadAttention.attend`).
Incremental decoding records one query row per `decode_step`; `from_calls` stacks those rows into the same
(B, h, T, T) and (B, h, T, S) maps that one teacher-forced pass over the same tokens gives.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from transformer.model import BOS_ID, MultiHeadAttention, Transformer

Calls = dict[str, list[Tensor]]  # attention module name -> the weights of each of its calls, in order


@contextlib.contextmanager
def record_attention(model: Transformer) -> Iterator[Calls]:
    """Keep the attention weights of every call made inside the block, keyed by module name
    (`encoder.0.self_attn`, `decoder.0.self_attn`, `decoder.0.cross_attn`, ...)."""
    modules = {name: m for name, m in model.named_modules() if isinstance(m, MultiHeadAttention)}
    calls: Calls = {name: [] for name in modules}
    for name, module in modules.items():
        module.recorder = calls[name]
    try:
        yield calls
    finally:
        for module in modules.values():
            module.recorder = None


def stack_steps(rows: list[Tensor]) -> Tensor:
    """One call's weights (B, h, T, S) as they are; several calls of one query each (B, h, 1, S_t), S_t growing
    by one per step for cached self-attention, as (B, h, T, max S_t) with the keys not yet seen at 0."""
    if len(rows) == 1:
        return rows[0]
    width = max(r.shape[-1] for r in rows)
    return torch.cat([F.pad(r, (0, width - r.shape[-1])) for r in rows], dim=2)


class AttentionMaps(NamedTuple):
    """Per layer, bottom first: encoder self-attention (B, h, S, S), decoder self-attention (B, h, T, T) and
    decoder-encoder attention (B, h, T, S). Row i is what query position i attends to; rows sum to 1."""

    encoder: list[Tensor]
    decoder: list[Tensor]
    cross: list[Tensor]

    @classmethod
    def from_calls(cls, model: Transformer, calls: Calls) -> AttentionMaps:
        def layers(stack: str, kind: str, count: int) -> list[Tensor]:
            return [stack_steps(calls[f"{stack}.{i}.{kind}"]) for i in range(count)]

        cfg = model.cfg
        return cls(
            layers("encoder", "self_attn", cfg.encoder_layers) if calls["encoder.0.self_attn"] else [],
            layers("decoder", "self_attn", cfg.decoder_layers),
            layers("decoder", "cross_attn", cfg.decoder_layers),
        )

    def sentence(self, i: int) -> AttentionMaps:
        """Sentence i of the batch, each map (h, T_q, T_k)."""
        return AttentionMaps(*([m[i] for m in maps] for maps in self))


@torch.no_grad()
def teacher_forced_maps(model: Transformer, src: Tensor, output: Tensor) -> AttentionMaps:
    """The maps of one pass over src (B, S) and the output tokens (B, T) (eos included, padded), in eval mode:
    the decoder reads bos + output[:-1], and query i is the position that produced output[i]."""
    was_training = model.training
    model.eval()
    bos = torch.full_like(output[:, :1], BOS_ID)
    tgt_in = torch.cat([bos, output[:, :-1]], dim=1)  # (B, T)
    try:
        with record_attention(model) as calls:
            model(src, tgt_in)
    finally:
        model.train(was_training)
    return AttentionMaps.from_calls(model, calls)
