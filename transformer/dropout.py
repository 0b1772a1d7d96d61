"""Dropout (Srivastava et al. 2014) as the paper applies it (§5.4): each element of a sub-layer's output, and of
the embedding sums, kept with probability 1 - P_drop and scaled by 1 / (1 - P_drop), so evaluation needs no
rescaling; residual blocks add the dropped-out output to their input.

On CPU, `F.dropout` draws its mask with `bernoulli_` (MKL, one variate at a time, converted to float): ~8 ms
per million elements on 2 cores, and a `multi30k` step draws 17 such masks, ~13% of the step (bench/README.md).
Here the mask is cut from 64-bit random words: each 32-bit half is a uniform integer u, and an element is
kept where u ≥ the threshold P_drop · 2^32, which is Bernoulli(1 - P_drop) with P_drop rounded to a multiple of
2^-32 (finer than `torch.rand`'s 2^-24 floats), at a fifth of the cost. `residual + Dropout(sublayer)` is one
`addcmul` that keeps only the boolean mask for backward. On GPUs `F.dropout` is one fused kernel and is used
unchanged, so the same seed gives other masks there than on CPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> Tensor:
    """A boolean mask of `shape`, each element True with probability 1 - p (p rounded to a multiple of 2^-32)."""
    n = math.prod(shape)
    # random_(from=-2^63, to=None) draws every 64-bit pattern uniformly, so both 32-bit halves are uniform too.
    words = torch.empty((n + 1) // 2, dtype=torch.int64, device=device).random_(-(2**63), None)
    u = words.view(torch.int32)[:n]  # uniform over [-2^31, 2^31)
    threshold = round(p * 2**32) - 2**31  # P(u < threshold) = round(p · 2^32) / 2^32
    return u.ge(threshold).view(shape)


class Dropout(nn.Dropout):
    """`nn.Dropout` (same constructor, state and semantics) with a cheaper CPU mask, and `residual(x, y)` =
    x + Dropout(y) in one pass."""

    def _cheap_mask(self, y: Tensor) -> bool:
        return self.training and 0.0 < self.p < 1.0 and y.device.type == "cpu" and not self.inplace

    def forward(self, y: Tensor) -> Tensor:
        if not self._cheap_mask(y):
            return F.dropout(y, self.p, self.training, self.inplace)
        return y.mul(keep_mask(y.shape, self.p, y.device)).mul_(1.0 / (1.0 - self.p))

    def residual(self, x: Tensor, y: Tensor) -> Tensor:
        """x + Dropout(y), the residual connection around a sub-layer whose output is y (§5.4)."""
        if not self._cheap_mask(y):
            return x + F.dropout(y, self.p, self.training)
        # d out / d y = mask / (1 - p): autograd keeps the boolean mask, a quarter of a float one.
        return torch.addcmul(x, y, keep_mask(y.shape, self.p, y.device), value=1.0 / (1.0 - self.p))
