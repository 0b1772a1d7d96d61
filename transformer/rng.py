"""Random streams of a training worker: dropout reseeded by data position, and the generators' state for
checkpoints, so that a resumed run draws exactly the masks and numbers the uninterrupted run would."""

from __future__ import annotations

import random

import numpy as np
import torch


def reseed(*key: int) -> None:
    """Seed torch's generator from a key such as (seed, rank, epoch, batch index): distinct keys give
    independent streams (numpy's SeedSequence hashes the whole key), equal keys the same one."""
    torch.manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint64)[0] >> 1))


def rng_state() -> dict:
    """torch's, numpy's and Python's generator states, as tensors and plain types (`weights_only` loads them)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2])},
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"]["key"].numpy().astype(np.uint32), state["numpy"]["pos"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
