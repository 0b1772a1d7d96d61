"""Label-smoothed cross-entropy (§5.4, ε_ls = 0.1; Szegedy et al. 2016), summed so distributed
averaging is exact: workers all-reduce the sums and the token count, then divide once."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from transformer.model import PAD_ID


class LossSums(NamedTuple):
    loss: Tensor  # label-smoothed cross-entropy summed over non-pad tokens (the training objective)
    nll: Tensor  # plain negative log-likelihood summed over the same tokens (for perplexity)
    tokens: Tensor  # number of non-pad target tokens


def label_smoothed_nll_loss(
    logits: Tensor, target: Tensor, epsilon: float = 0.1, ignore_index: int = PAD_ID
) -> LossSums:
    """logits (..., V), target (...). The smoothed target puts 1 - ε on the reference and spreads ε
    uniformly over the other V - 1 classes, so loss = (1 - ε) · nll + ε/(V-1) · Σ_{k≠y} -log p_k."""
    V = logits.shape[-1]
    lprobs = F.log_softmax(logits.float(), dim=-1).reshape(-1, V)  # (N, V) in float32 even under bf16
    target = target.reshape(-1)  # (N,)
    keep = target.ne(ignore_index)
    nll = -lprobs.gather(1, target.unsqueeze(1)).squeeze(1)  # (N,)
    others = -lprobs.sum(dim=1) - nll  # Σ over k ≠ y of -log p_k
    eps_i = epsilon / (V - 1)
    loss = (1.0 - epsilon) * nll + eps_i * others
    zero = torch.zeros((), dtype=lprobs.dtype, device=lprobs.device)
    return LossSums(
        loss=torch.where(keep, loss, zero).sum(),
        nll=torch.where(keep, nll, zero).sum(),
        tokens=keep.sum(),
    )
