"""Optimiser and learning-rate schedule of §5.3."""

from __future__ import annotations

import torch
from torch import nn


def rate(step: int, d_model: int, warmup: int = 4000, factor: float = 1.0) -> float:
    """lrate = factor · d_model^-0.5 · min(step^-0.5, step · warmup^-1.5); step counts from 1."""
    step = max(step, 1)
    return factor * d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)


def peak_rate(d_model: int, warmup: int = 4000, factor: float = 1.0) -> float:
    """The schedule's maximum, reached at step = warmup: factor · (d_model · warmup)^-0.5."""
    return rate(warmup, d_model, warmup, factor)


def make_optimizer(
    model: nn.Module,
    d_model: int,
    warmup: int = 4000,
    factor: float = 1.0,
    betas: tuple[float, float] = (0.9, 0.98),
    eps: float = 1e-9,
) -> tuple[torch.optim.Adam, torch.optim.lr_scheduler.LambdaLR]:
    """Adam(β1 0.9, β2 0.98, ε 1e-9) with the schedule applied per update (`scheduler.step()` after each
    `optimizer.step()`). The base lr is 1 so that LambdaLR's multiplier is the learning rate itself."""
    # fused=None lets torch pick the fused kernel on GPU and the foreach one on CPU.
    optimizer = torch.optim.Adam(model.parameters(), lr=1.0, betas=betas, eps=eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda index: rate(index + 1, d_model, warmup, factor))
    return optimizer, scheduler
