"""An ensemble of translation models behind the one narrow interface search uses (fairseq's `EnsembleModel`).

Each step, the next-token distribution is the average of the members' probabilities,
P(y | ·) = (1/M) Σ_m P_m(y | ·), returned as its log, log Σ_m exp(log P_m) − log M. Every member keeps its own
encoder output and incremental cache, reordered together, so greedy and beam search run over an ensemble
unchanged. Members must share a vocabulary (size and special ids): the ids of one mean nothing to another.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from transformer.model import DecoderState, EncoderOut, Transformer


@dataclass
class EnsembleState:
    """One decoder state per member, all at the same position with the same rows."""

    members: list[DecoderState]


class Ensemble(nn.Module):
    def __init__(self, models: Sequence[Transformer], names: Sequence[str] | None = None):
        super().__init__()
        if not models:
            raise ValueError("an ensemble needs at least one model")
        names = list(names) if names is not None else [f"model {i + 1}" for i in range(len(models))]
        first = models[0].cfg
        for name, m in zip(names[1:], models[1:], strict=True):
            c = m.cfg
            if (c.vocab_size, c.pad_id) != (first.vocab_size, first.pad_id):
                raise ValueError(
                    f"{name} has vocabulary size {c.vocab_size} (pad {c.pad_id}), but {names[0]} has "
                    f"{first.vocab_size} (pad {first.pad_id}): ensemble members must share one vocabulary"
                )
        self.members = nn.ModuleList(models)
        # The search caps output length by the positions every member has.
        self.cfg = replace(first, max_positions=min(m.cfg.max_positions for m in models))

    def encode(self, src: Tensor) -> list[EncoderOut]:
        """The members' encoder outputs, in member order."""
        return [m.encode(src) for m in self.members]

    def init_state(self, enc: Sequence[EncoderOut], max_len: int) -> EnsembleState:
        return EnsembleState([m.init_state(e, max_len) for m, e in zip(self.members, enc, strict=True)])

    def decode_step(self, tokens: Tensor, state: EnsembleState, log_probs: bool = True) -> Tensor:
        """tokens (R,); the log of the members' mean probability (R, V), float32. It is normalised already, so
        `log_probs=False` (a search asking for logits to normalise itself) gets the same: a logsumexp of it is 0.
        One member: exactly that member's step."""
        if len(self.members) == 1:
            return self.members[0].decode_step(tokens, state.members[0], log_probs=log_probs)
        steps = [m.decode_step(tokens, s, log_probs=True) for m, s in zip(self.members, state.members, strict=True)]
        return torch.logsumexp(torch.stack(steps), dim=0) - math.log(len(steps))  # (R, V)

    def reorder_state(
        self, state: EnsembleState, order: Tensor, beam: int | None = None, within_sentences: bool = False
    ) -> EnsembleState:
        return EnsembleState(
            [Transformer.reorder_state(s, order, beam=beam, within_sentences=within_sentences) for s in state.members]
        )
