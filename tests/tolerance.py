"""Float tolerances that follow the dtype and the magnitude, so that a test gives the same verdict on every CPU.

Two float32 computations of the same value that differ only in the order of their operations (other kernels on
AVX2 and AVX-512, other thread counts, another batch layout) agree to about eps · |value| per operation that
rounds: a sum of n terms of magnitude m may move by n · eps · m. A fixed 1e-6 on a score of 35 is below float32's
resolution there (the ulp of 35 is 3.8e-6).
"""

from __future__ import annotations

import torch

EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.bfloat16: torch.finfo(torch.bfloat16).eps}


def tol(magnitude: float, terms: int = 1, dtype: torch.dtype = torch.float32, slack: float = 4.0) -> float:
    """Absolute tolerance for two `dtype` results of size `magnitude` (at least 1) that each accumulated
    `terms` rounded operations in a different order; `slack` covers both sides' rounding and a little more."""
    return slack * EPS[dtype] * max(abs(magnitude), 1.0) * max(terms, 1)


def close(a: float, b: float, terms: int = 1, dtype: torch.dtype = torch.float32) -> bool:
    return abs(a - b) <= tol(max(abs(a), abs(b)), terms, dtype)


def at_least(a: float, b: float, terms: int = 1, dtype: torch.dtype = torch.float32) -> bool:
    """a >= b up to the rounding of `terms` operations at their magnitude."""
    return a >= b - tol(max(abs(a), abs(b)), terms, dtype)
