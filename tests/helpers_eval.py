"""Tiny stand-ins for the eval tests: a workspace with raw text, a sentencepiece model and checkpoints."""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import sentencepiece as spm
import torch
import yaml

from transformer.checkpoint import save_atomic
from transformer.model import Transformer, make_config

# ../shared/data/multi30k beside the repository (a worktree sits one level deeper than the main checkout).
MULTI30K = next(
    (p / "shared" / "data" / "multi30k" for p in Path(__file__).resolve().parents if (p / "shared" / "data").is_dir()),
    Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k",
)
VOCAB = 120


def multi30k_pairs(split: str, n: int) -> list[dict]:
    with open(MULTI30K / f"{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(n), f, strict=False)]


def write_raw(raw: Path, n_test: int = 24) -> None:
    raw.mkdir(parents=True, exist_ok=True)
    for split, source, n in (("train", "train", 300), ("valid", "val", 12), ("test", "test", n_test)):
        pairs = multi30k_pairs(source, n)
        for lang in ("en", "de"):
            (raw / f"{split}.{lang}").write_text("".join(p[lang] + "\n" for p in pairs), encoding="utf-8")


def train_spm(raw: Path, bpe: Path) -> Path:
    bpe.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        input=[str(raw / "train.en"), str(raw / "train.de")],
        model_prefix=str(bpe / "spm"),
        vocab_size=VOCAB,
        model_type="bpe",
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        minloglevel=2,
    )
    return bpe / "spm.model"


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = make_config("tiny", VOCAB, encoder_layers=1, decoder_layers=1, d_model=32, d_ff=64, heads=2, dropout=0.0)
    return Transformer(cfg).eval()


def write_checkpoint(folder: Path, update: int, state: dict, config: dict, elapsed_s: float | None = None) -> Path:
    path = folder / f"checkpoint_{update:08d}.pt"
    save_atomic({"model": state, "config": config, "update": update, "optimizer": {}, "elapsed_s": elapsed_s}, path)
    return path


@functools.cache
def mlflow_store() -> str:
    """One SQLite store for the test session: creating one costs seconds (schema migrations)."""
    folder = tempfile.mkdtemp(prefix="eval-mlflow-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return f"sqlite:///{folder}/mlflow.db"


def write_params(root: Path, tracking_uri: str, experiment: str | None = None, **sections) -> str:
    """A params.yaml for the smoke-sized stages, with `sections` merged over it; returns the experiment name,
    unique to `root` unless given, so that tests sharing a store do not see each other's runs."""
    experiment = experiment or f"eval-{root.name}"
    params = {
        "preset": "smoke",
        "average": {"last": 3},
        "decode": {"max_tokens": 200, "max_len_b": 10},
        "mlflow": {"experiment": experiment, "tracking_uri": tracking_uri},
    }
    for key, value in sections.items():
        params.setdefault(key, {}).update(value)
    (root / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    return experiment


def make_workspace(root: Path, n_test: int = 24, updates: tuple[int, ...] = (100, 200, 300)) -> Transformer:
    """data/raw, data/bpe/spm.model and models/checkpoints under `root`; returns the last model."""
    write_raw(root / "data" / "raw", n_test)
    train_spm(root / "data" / "raw", root / "data" / "bpe")
    folder = root / "models" / "checkpoints"
    model = None
    for i, update in enumerate(updates):
        model = tiny_model(seed=i)
        write_checkpoint(folder, update, model.state_dict(), model.cfg.to_dict())
    return model
