"""The names of the files one stage writes and others read, in one place: stage modules never import each
other (a stage is a thin CLI; what two stages share lives in a shared module like this one)."""

from __future__ import annotations

import re
from pathlib import Path

SPM_PREFIX = "spm"  # in data/bpe: the joint sentencepiece model (learn_bpe writes spm.model and spm.vocab)
SPM_FILE = f"{SPM_PREFIX}.model"
SNAPSHOT_INDEX = "index.json"  # in models/snapshots: one entry per snapshot (train writes, curve reads)
CHECKPOINT_NAME = re.compile(r"^checkpoint_(\d+)\.pt$")  # in models/checkpoints (train)


def checkpoint_name(update: int) -> str:
    """Zero-padded, so that names sort like updates."""
    return f"checkpoint_{update:08d}.pt"


def find_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(update, path) of every `checkpoint_<update>.pt` in `folder`, oldest update first."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: checkpoint folder not found (run the train stage first)")
    found = []
    for path in folder.iterdir():
        m = CHECKPOINT_NAME.match(path.name)
        if m and path.is_file():
            found.append((int(m.group(1)), path))
    if not found:
        raise FileNotFoundError(f"{folder}: no checkpoint_<update>.pt files to average")
    return sorted(found)
