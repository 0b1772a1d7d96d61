"""Checkpoints: atomic writes, safe loads with clear errors, and §6.1 averaging against hand-derived values."""

import argparse
import ast
from pathlib import Path

import pytest
import torch

from transformer.checkpoint import (
    average_checkpoints,
    average_state_dicts,
    load,
    load_model,
    save_atomic,
    save_model,
)
from transformer.model import Transformer, make_config

REPO = Path(__file__).resolve().parents[1]


def _state(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((2, 3), value), "b": torch.full((3,), value), "steps": torch.tensor(7)}


def test_average_of_1_2_3_is_exactly_2():
    avg = average_state_dicts([_state(1.0), _state(2.0), _state(3.0)])
    assert torch.equal(avg["w"], torch.full((2, 3), 2.0))
    assert torch.equal(avg["b"], torch.full((3,), 2.0))
    assert avg["w"].dtype == torch.float32
    assert torch.equal(avg["steps"], torch.tensor(7))  # integer buffers are copied, not averaged


def test_average_refuses_mismatching_parameters():
    with pytest.raises(ValueError, match="different parameters"):
        average_state_dicts([_state(1.0), {"w": torch.zeros(2, 3)}])
    with pytest.raises(ValueError, match="parameter w has shape"):
        average_state_dicts([_state(1.0), {**_state(1.0), "w": torch.zeros(3, 2)}])
    with pytest.raises(ValueError, match="no checkpoints"):
        average_state_dicts([])


def test_average_checkpoints_from_files_and_refuse_other_configs(tmp_path):
    config = make_config("tiny", 20).to_dict()
    paths = []
    for i, v in enumerate((1.0, 2.0, 3.0)):
        paths.append(tmp_path / f"ckpt{i}.pt")
        save_atomic({"model": _state(v), "config": config, "update": i}, paths[-1])
    state, cfg = average_checkpoints(paths)
    assert cfg == config and torch.equal(state["w"], torch.full((2, 3), 2.0))

    other = tmp_path / "other.pt"
    save_atomic({"model": _state(4.0), "config": {**config, "d_model": 128}, "update": 3}, other)
    with pytest.raises(ValueError, match="other.pt: model config differs"):
        average_checkpoints([*paths, other])


def test_failing_write_leaves_the_existing_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    save_atomic({"x": torch.tensor([1.0])}, path)
    before = path.read_bytes()

    def half_write(obj, f):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_write)
    with pytest.raises(OSError, match="disk full"):
        save_atomic({"x": torch.tensor([2.0])}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary left behind


def test_load_names_the_file_it_cannot_read(tmp_path):
    bogus = tmp_path / "notes.txt"
    bogus.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.txt: not a readable checkpoint"):
        load(bogus)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load(tmp_path / "missing.pt")
    save_atomic({"weights": torch.zeros(1)}, tmp_path / "weights_only.pt")
    with pytest.raises(ValueError, match="weights_only.pt: not a model file"):
        load_model(tmp_path / "weights_only.pt")


def test_load_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"  # an arbitrary class: weights_only=True must refuse to unpickle it
    torch.save({"model": argparse.Namespace(run="code")}, path)
    with pytest.raises(ValueError, match="evil.pt"):
        load(path)


def test_model_file_round_trip(tmp_path):
    torch.manual_seed(0)
    model = Transformer(make_config("tiny", 30, max_positions=32)).eval()
    save_model(tmp_path / "m.pt", model, extra={"bpe_sha256": "abc"})
    loaded, extra = load_model(tmp_path / "m.pt")
    assert extra == {"bpe_sha256": "abc"} and loaded.cfg == model.cfg and not loaded.training
    src, tgt = torch.randint(4, 30, (2, 5)), torch.randint(4, 30, (2, 4))
    with torch.no_grad():
        assert torch.equal(loaded(src, tgt), model(src, tgt))


def _torch_load_calls(path) -> list[ast.Call]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "load"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "torch"
    ]


def test_every_torch_load_in_the_repository_is_weights_only():
    offenders, seen = [], 0
    for path in REPO.rglob("*.py"):
        if any(part.startswith(".") or part in {"data", "runs", "mlruns"} for part in path.relative_to(REPO).parts):
            continue
        for call in _torch_load_calls(path):
            seen += 1
            safe = any(
                kw.arg == "weights_only" and isinstance(kw.value, ast.Constant) and kw.value.value is True
                for kw in call.keywords
            )
            if not safe:
                offenders.append(f"{path.relative_to(REPO)}:{call.lineno}")
    assert seen >= 1  # the scan finds transformer/checkpoint.py's call
    assert not offenders, f"torch.load without weights_only=True: {offenders}"
