"""Checkpoints on disk: written atomically, read with `torch.load(weights_only=True)`, averaged (§6.1).

A training checkpoint is a dict of tensors and plain Python values:
    {"model": state_dict, "config": TransformerConfig.to_dict(), "update": int, ...training state...}
A standalone model file (what `average` writes, and users load) holds
    {"model": state_dict, "config": dict, "extra": dict}  (extra: e.g. the BPE model's path and sha256).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
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


def average_state_dicts(states: Iterable[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Element-wise mean of parameters (§6.1); accumulated in float64 so the order of files does not matter
    to float32 precision, then cast back to each tensor's dtype. States are consumed one at a time: averaging
    the big model's last 20 checkpoints holds two of them in memory, not 20."""
    keys: list[str] = []
    total: dict[str, torch.Tensor] = {}  # float64 sums of the floating-point entries
    kept: dict[str, torch.Tensor] = {}  # the other entries (integer buffers), copied from the first state
    dtypes: dict[str, torch.dtype] = {}
    n = 0
    for i, s in enumerate(states):
        if i == 0:
            keys = list(s)
            for k, v in s.items():
                if v.is_floating_point():
                    total[k], dtypes[k] = torch.zeros(v.shape, dtype=torch.float64), v.dtype
                else:
                    kept[k] = v.clone()
        elif list(s) != keys:
            raise ValueError(f"checkpoint {i} has different parameters from checkpoint 0")
        for k, acc in total.items():
            if s[k].shape != acc.shape:
                raise ValueError(f"parameter {k} has shape {tuple(s[k].shape)}, expected {tuple(acc.shape)}")
            acc += s[k].to(torch.float64)
        n += 1
    if n == 0:
        raise ValueError("no checkpoints to average")
    return {k: (total[k] / n).to(dtypes[k]) if k in total else kept[k] for k in keys}


def average_checkpoints(paths: Sequence[str | Path], key: str = "model") -> tuple[dict[str, torch.Tensor], dict]:
    """Average the `model` entries of training checkpoints (or another entry holding a state_dict, e.g. `ema`),
    read one at a time; returns (state_dict, config)."""
    configs: list[dict] = []

    def states() -> Iterator[dict[str, torch.Tensor]]:
        for p in paths:
            ckpt = load(p)
            if configs and ckpt["config"] != configs[0]:
                raise ValueError(f"{p}: model config differs from {paths[0]}; cannot average")
            configs.append(ckpt["config"])
            if key not in ckpt:
                hint = " (train with train.ema_decay set)" if key == "ema" else ""
                raise ValueError(f"{p}: no '{key}' entry{hint}")
            yield ckpt[key]

    return average_state_dicts(states()), configs[0]


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
