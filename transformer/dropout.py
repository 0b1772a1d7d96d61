"""Dropout (Srivastava et al. 2014) as the paper applies it (§5.4): each element of a sub-layer's output, and of
the embedding sums, kept with probability 1 - P_drop and scaled by 1 / (1 - P_drop), so evaluation needs no
rescaling; residual blocks add the dropped-out output to their input.

On CPU, `F.dropout` draws its mask with `bernoulli_` (MKL, one variate at a time, converted to float): ~8 ms
per million elements on 2 cores, and a `multi30k` step draws 17 such masks, ~13% of the step (bench/README.md).
Here the mask is cut from 64-bit random words: each 16-bit quarter is a uniform integer u, and an element is
kept where u ≥ the threshold P_drop · 2^16, which is Bernoulli(1 - P_drop') with P_drop' = round(P_drop · 2^16)
/ 2^16 (within 2^-17 of P_drop); kept elements are scaled by 1 / (1 - P_drop'), so the expectation is exactly the
input. The random words cost 0.8 ms per million elements, a tenth of `bernoulli_`; 16 bits a mask element
instead of 32 make a multi30k training step ~3% faster (bench/README.md). `residual + Dropout(sublayer)` is
one `addcmul` that keeps only the boolean mask for backward. On GPUs `F.dropout` is one fused kernel and is
used unchanged, so the same seed gives other masks there than on CPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BITS = 16  # random bits per mask element


def drop_steps(p: float) -> int:
    """P_drop in steps of 2^-16: the mask drops an element with probability drop_steps(p) / 2^16."""
    return round(p * 2**BITS)


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> Tensor:
    """A boolean mask of `shape`, each element True with probability 1 - drop_steps(p) / 2^16."""
    n = math.prod(shape)
    # random_(from=-2^63, to=None) draws every 64-bit pattern uniformly, so each 16-bit quarter is uniform too.
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)
    u = words.view(torch.int16)[:n]  # uniform over [-2^15, 2^15)
    threshold = drop_steps(p) - 2 ** (BITS - 1)  # P(u < threshold) = drop_steps(p) / 2^16
    return u.ge(threshold).view(shape)


class Dropout(nn.Dropout):
    """`nn.Dropout` (same constructor, state and semantics) with a cheaper CPU mask, and `residual(x, y)` =
    x + Dropout(y) in one pass."""

    def _cheap_mask(self, y: Tensor) -> bool:
        steps = drop_steps(self.p)  # 0 or 2^16: nothing or everything dropped, left to F.dropout
        return self.training and 0 < steps < 2**BITS and y.device.type == "cpu" and not self.inplace

    def _scale(self) -> float:
        return 2**BITS / (2**BITS - drop_steps(self.p))  # 1 / (1 - P_drop'): the kept share the mask has

    def forward(self, y: Tensor) -> Tensor:
        if not self._cheap_mask(y):
            return F.dropout(y, self.p, self.training, self.inplace)
        return y.mul(keep_mask(y.shape, self.p, y.device)).mul_(self._scale())

    def residual(self, x: Tensor, y: Tensor) -> Tensor:
        """x + Dropout(y), the residual connection around a sub-layer whose output is y (§5.4)."""
        if not self._cheap_mask(y):
            return x + F.dropout(y, self.p, self.training)
        # d out / d y = mask / (1 - P_drop'): autograd keeps the boolean mask, a quarter of a float one.
        return torch.addcmul(x, y, keep_mask(y.shape, self.p, y.device), value=self._scale())
