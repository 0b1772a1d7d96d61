"""An exponential moving average of the weights, kept during training (not in the paper; opt-in).

§6.1 averages the last 5 or 20 checkpoints written at 10-minute intervals; an exponential moving average
(Polyak and Juditsky 1992) averages every update instead, weighting update i of n by decay^(n-i). It is kept in
float32 beside the weights, updated after each applied optimiser step, and never feeds back into training: a
run with it follows the same trajectory as one without.

The average is bias-corrected as Adam corrects its moments (Kingma and Ba 2015, §3): the shadow starts at
zero, s_n = decay · s_(n-1) + (1 - decay) · θ_n, and the weights are s_n / (1 - decay^n), which is exactly

    Σ_i decay^(n-i) · θ_i / Σ_i decay^(n-i)        (i = 1 … n)

so the initial weights never enter it and it needs no warm-up rule. Its span is about 1 / (1 - decay) updates
(decay 0.998: the last ~500 updates carry 63% of the weight).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class WeightAverage:
    """The bias-corrected exponential moving average of a module's parameters."""

    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.module, self.decay, self.count = module, decay, 0
        self.names = [name for name, _ in module.named_parameters()]
        self.params = [p for _, p in module.named_parameters()]
        self.shadow = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """s ← decay · s + (1 - decay) · θ, after an applied optimiser step."""
        params = [p.detach().float() for p in self.params]
        torch._foreach_mul_(self.shadow, self.decay)
        torch._foreach_add_(self.shadow, params, alpha=1.0 - self.decay)
        self.count += 1

    def weights(self) -> dict[str, Tensor]:
        """A state_dict of the module with the averaged parameters (other entries as they are)."""
        return averaged_weights(self.state_dict(), self.module.state_dict())

    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "count": self.count,
            "shadow": {n: s.clone() for n, s in zip(self.names, self.shadow, strict=True)},
        }

    def load_state_dict(self, state: dict) -> None:
        if state["decay"] != self.decay:
            raise ValueError(f"checkpoint ema decay {state['decay']} differs from {self.decay}")
        if list(state["shadow"]) != self.names:
            raise ValueError("checkpoint ema holds other parameters than the model")
        with torch.no_grad():
            for s, saved in zip(self.shadow, state["shadow"].values(), strict=True):
                s.copy_(saved)
        self.count = state["count"]


def averaged_weights(state: dict, model_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The averaged weights of a saved `WeightAverage.state_dict()`, as a state_dict shaped like `model_state`
    (each parameter s / (1 - decay^count) in its dtype; entries that are not parameters copied)."""
    if state["count"] < 1:
        raise ValueError("the weight average has seen no update yet")
    correction = 1.0 - state["decay"] ** state["count"]
    shadow = state["shadow"]
    out = {}
    for name, value in model_state.items():
        out[name] = (shadow[name] / correction).to(value.dtype) if name in shadow else value.detach().clone()
    return out
