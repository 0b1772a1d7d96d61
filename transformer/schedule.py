"""Optimiser and learning-rate schedule of §5.3."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def rate(step: int, d_model: int, warmup: int = 4000, factor: float = 1.0) -> float:
    """lrate = factor · d_model^-0.5 · min(step^-0.5, step · warmup^-1.5); step counts from 1."""
    step = max(step, 1)
    return factor * d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)


def peak_rate(d_model: int, warmup: int = 4000, factor: float = 1.0) -> float:
    """The schedule's maximum, reached at step = warmup: factor · (d_model · warmup)^-0.5."""
    return rate(warmup, d_model, warmup, factor)


def cooldown(progress: float, fraction: float) -> float:
    """Multiplier that takes the rate linearly to zero over the last `fraction` of the run's budget.

    `progress` is the share of the budget spent (updates or wall clock); 1 until 1 - fraction, 0 at the end;
    fraction 0 leaves the schedule as the paper's. Not in the paper: with a short budget the inverse-sqrt rate
    is still high when the clock stops, and annealing it in the last part (warm-up, stable, decay) gives the
    final checkpoints the lower loss that a longer run would reach only later.
    """
    if fraction <= 0.0:
        return 1.0
    return min(1.0, max(0.0, (1.0 - progress) / fraction))


def make_optimizer(
    model: nn.Module,
    d_model: int,
    warmup: int = 4000,
    factor: float = 1.0,
    betas: tuple[float, float] = (0.9, 0.98),
    eps: float = 1e-9,
    cooldown_fraction: float = 0.0,
    progress: Callable[[], float] = lambda: 0.0,
) -> tuple[torch.optim.Adam, torch.optim.lr_scheduler.LambdaLR]:
    """Adam(β1 0.9, β2 0.98, ε 1e-9) with the schedule applied per update (`scheduler.step()` after each
    `optimizer.step()`). The base lr is 1 so that LambdaLR's multiplier is the learning rate itself.
    `progress()` is read at each `scheduler.step()`: the budget spent so far, for the `cooldown` multiplier."""
    # The fused kernel (CPU and CUDA) updates every parameter in one pass: 3x faster than the default foreach
    # path on a 2-core CPU (19 -> 6 ms a step for the multi30k preset), the same arithmetic.
    optimizer = torch.optim.Adam(model.parameters(), lr=1.0, betas=betas, eps=eps, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda index: rate(index + 1, d_model, warmup, factor) * cooldown(progress(), cooldown_fraction)
    )
    return optimizer, scheduler
