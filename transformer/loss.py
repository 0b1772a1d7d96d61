"""Label-smoothed cross-entropy (§5.4, ε_ls = 0.1; Szegedy et al. 2016), summed so distributed
averaging is exact: workers all-reduce the sums and the token count, then divide once.

The (tokens × V) log-probabilities are the largest tensors of a training step, so the gradient is written by
hand: for the smoothed target q, d loss / d logits = softmax(logits) - q, one pass over V instead of the
five or so that autograd makes through gather, sum and log_softmax (see bench/README.md).
"""

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


class _SmoothedCrossEntropy(torch.autograd.Function):
    """Per-token (loss, nll) summed over kept tokens, from logits (N, V); gradients for both outputs."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, keep: Tensor, epsilon: float) -> tuple[Tensor, Tensor]:
        V = logits.shape[-1]
        dtype = torch.promote_types(logits.dtype, torch.float32)  # float32 even under bf16
        lprobs = F.log_softmax(logits, dim=-1, dtype=dtype)  # (N, V)
        nll = -lprobs.gather(1, target.unsqueeze(1)).squeeze(1)  # (N,)
        others = -lprobs.sum(dim=1) - nll  # Σ over k ≠ y of -log p_k
        eps_i = epsilon / (V - 1)
        loss = (1.0 - epsilon) * nll + eps_i * others
        zero = lprobs.new_zeros(())
        # An intermediate kept on ctx (not save_for_backward) so that backward may overwrite it in place:
        # on CPU a fresh (N, V) buffer costs page faults comparable to the arithmetic.
        ctx.lprobs, ctx.epsilon, ctx.logits_dtype = lprobs, epsilon, logits.dtype
        ctx.save_for_backward(target, keep)
        return torch.where(keep, loss, zero).sum(), torch.where(keep, nll, zero).sum()

    @staticmethod
    def backward(ctx, grad_loss: Tensor | None, grad_nll: Tensor | None):
        target, keep = ctx.saved_tensors
        if ctx.lprobs is None:
            raise RuntimeError("label_smoothed_nll_loss: backward twice through one loss (retain_graph) is unsupported")
        grad, ctx.lprobs = ctx.lprobs.exp_(), None  # softmax, in the log-probabilities' buffer
        V, eps = grad.shape[-1], ctx.epsilon
        eps_i = eps / (V - 1)
        zero = grad.new_zeros(())
        a = torch.where(keep, grad_loss if grad_loss is not None else zero, zero)  # (N,) weight of softmax - q
        b = torch.where(keep, grad_nll if grad_nll is not None else zero, zero)  # (N,) weight of softmax - onehot
        # q = ε/(V-1) everywhere but 1-ε at the reference, so
        # grad = softmax·(a+b) - a·ε/(V-1) - onehot·(a·(1-ε-ε/(V-1)) + b)
        grad.mul_((a + b).unsqueeze(1)).sub_((a * eps_i).unsqueeze(1))  # (N, V)
        grad.scatter_add_(1, target.unsqueeze(1), -(a * (1.0 - eps - eps_i) + b).unsqueeze(1))
        return grad.to(ctx.logits_dtype), None, None, None


def label_smoothed_nll_loss(
    logits: Tensor, target: Tensor, epsilon: float = 0.1, ignore_index: int = PAD_ID
) -> LossSums:
    """logits (..., V), target (...). The smoothed target puts 1 - ε on the reference and spreads ε
    uniformly over the other V - 1 classes, so loss = (1 - ε) · nll + ε/(V-1) · Σ_{k≠y} -log p_k."""
    V = logits.shape[-1]
    target = target.reshape(-1)  # (N,)
    keep = target.ne(ignore_index)
    loss, nll = _SmoothedCrossEntropy.apply(logits.reshape(-1, V), target, keep, float(epsilon))
    return LossSums(loss=loss, nll=nll, tokens=keep.sum())
