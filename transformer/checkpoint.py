"""Checkpoints on disk: written atomically, read with `torch.load(weights_only=True)`, averaged (§6.1).

A training checkpoint is a dict of tensors and plain Python values:
    {"model": state_dict, "config": TransformerConfig.to_dict(), "update": int, ...training state...}
A standalone model file (what `average` writes, and users load) holds
    {"model": state_dict, "config": dict, "extra": dict}  (extra: e.g. the BPE model's path and sha256).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from transformer.model import Transformer, TransformerConfig


def save_atomic(obj: dict, path: str | Path) -> None:
    """torch.save into a temporary sibling, then rename: a crash never leaves a truncated file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Safe load: tensors and plain containers only (no arbitrary pickled code)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: checkpoint not found") from None
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None


def average_state_dicts(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Element-wise mean of parameters (§6.1); accumulated in float64 so the order of files does not matter
    to float32 precision, then cast back to each tensor's dtype."""
    if not states:
        raise ValueError("no checkpoints to average")
    keys = list(states[0])
    for i, s in enumerate(states[1:], start=1):
        if list(s) != keys:
            raise ValueError(f"checkpoint {i} has different parameters from checkpoint 0")
    out = {}
    for k in keys:
        ref = states[0][k]
        if not ref.is_floating_point():
            out[k] = ref.clone()
            continue
        total = torch.zeros(ref.shape, dtype=torch.float64)
        for s in states:
            if s[k].shape != ref.shape:
                raise ValueError(f"parameter {k} has shape {tuple(s[k].shape)}, expected {tuple(ref.shape)}")
            total += s[k].to(torch.float64)
        out[k] = (total / len(states)).to(ref.dtype)
    return out


def average_checkpoints(paths: Sequence[str | Path]) -> tuple[dict[str, torch.Tensor], dict]:
    """Average the `model` entries of training checkpoints; returns (state_dict, config dict)."""
    ckpts = [load(p) for p in paths]
    configs = [c["config"] for c in ckpts]
    for p, c in zip(paths, configs, strict=True):
        if c != configs[0]:
            raise ValueError(f"{p}: model config differs from {paths[0]}; cannot average")
    return average_state_dicts([c["model"] for c in ckpts]), configs[0]


def save_model(path: str | Path, model: Transformer | tuple[dict, dict], extra: dict | None = None) -> None:
    """A standalone model file: weights, config and `extra` (plain values) in one atomic write."""
    if isinstance(model, Transformer):
        state, config = model.state_dict(), model.cfg.to_dict()
    else:
        state, config = model
    save_atomic({"model": state, "config": config, "extra": dict(extra or {})}, path)


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[Transformer, dict]:
    """The model of a standalone file (or of a training checkpoint), in eval mode, and its `extra`."""
    blob = load(path, map_location)
    if "model" not in blob or "config" not in blob:
        raise ValueError(f"{path}: not a model file (expected keys 'model' and 'config')")
    model = Transformer(TransformerConfig(**blob["config"]))
    model.load_state_dict(blob["model"])
    return model.to(map_location).eval(), blob.get("extra", {})
