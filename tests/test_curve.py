"""Stage `curve`: one row per snapshot (or kept checkpoint) at its minute mark, scored on the valid split."""

import csv
import json

import pytest
import torch
from helpers_eval import make_workspace, mlflow_store, tiny_model, write_params

from pipeline import curve as stage
from pipeline.common.files import read_lines
from transformer.checkpoint import save_atomic


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    make_workspace(tmp_path, n_test=4)
    write_params(tmp_path, mlflow_store(), decode={"beam": 2, "max_len_b": 6})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(threads)


def write_snapshots(folder, marks):
    """Snapshots as the train stage writes them: weights-only files and index.json."""
    folder.mkdir(parents=True, exist_ok=True)
    index = []
    for i, (minutes, update) in enumerate(marks):
        model = tiny_model(seed=10 + i)
        name = f"snapshot_{update:08d}.pt"
        meta = {"minutes": minutes, "elapsed_minutes": minutes + 0.1, "update": update, "tokens": 1000 * update}
        save_atomic({"model": model.state_dict(), "config": model.cfg.to_dict(), **meta}, folder / name)
        index.append({"file": name, **meta})
    (folder / "index.json").write_text(json.dumps(index), encoding="utf-8")


def run_stage(root):
    stage.main(["--snapshots", "models/snapshots", "--checkpoints", "models/checkpoints", "--bpe", "data/bpe"]
               + ["--raw", "data/raw", "--out", "plots/bleu_curve.csv", "--png", "plots/bleu_curve.png"])  # fmt: skip
    with open(root / "plots" / "bleu_curve.csv", encoding="utf-8") as f:
        return list(csv.DictReader(f))


class Oracle:
    """Stands in for Translator: the model of update 200 returns the valid references, the others nothing."""

    refs: list[str] = []

    def __init__(self, model, sp, options):
        self.perfect = torch.equal(model.state_dict()["embed.weight"], Oracle.perfect_weights)

    def translate(self, sentences):
        return list(Oracle.refs) if self.perfect else [""] * len(sentences)


def test_one_row_per_snapshot_scored_against_the_valid_references(workspace, monkeypatch):
    write_snapshots(workspace / "models" / "snapshots", [(5.0, 100), (10.0, 200), (15.0, 300)])
    Oracle.refs = read_lines(workspace / "data" / "raw" / "valid.de")
    Oracle.perfect_weights = tiny_model(seed=11).state_dict()["embed.weight"]
    monkeypatch.setattr(stage, "Translator", Oracle)
    rows = run_stage(workspace)
    assert [(float(r["minutes"]), int(r["update"])) for r in rows] == [(5.0, 100), (10.0, 200), (15.0, 300)]
    assert [float(r["bleu"]) for r in rows] == [0.0, 100.0, 0.0]
    assert {r["source"] for r in rows} == {"snapshot"}
    assert (workspace / "plots" / "bleu_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_real_decoding_gives_a_bleu_per_snapshot(workspace):
    write_snapshots(workspace / "models" / "snapshots", [(1.0, 10), (2.0, 20)])
    rows = run_stage(workspace)
    assert len(rows) == 2 and all(0.0 <= float(r["bleu"]) <= 100.0 for r in rows)
    assert all(0.0 <= float(r["chrf"]) <= 100.0 for r in rows)


def test_without_snapshots_the_kept_checkpoints_are_the_points_at_their_minutes(workspace):
    (workspace / "models" / "snapshots").mkdir(parents=True)
    (workspace / "models" / "snapshots" / "index.json").write_text("[]", encoding="utf-8")
    for i, path in enumerate(sorted((workspace / "models" / "checkpoints").glob("checkpoint_*.pt"))):
        state = torch.load(path, weights_only=True)
        save_atomic({**state, "elapsed_s": 60.0 * (i + 1)}, path)
    rows = run_stage(workspace)
    assert [(float(r["minutes"]), int(r["update"]), r["source"]) for r in rows] == [
        (1.0, 100, "checkpoint"),
        (2.0, 200, "checkpoint"),
        (3.0, 300, "checkpoint"),
    ]


def test_a_checkpoint_without_its_minute_is_named(workspace):
    (workspace / "models" / "snapshots").mkdir(parents=True)
    (workspace / "models" / "snapshots" / "index.json").write_text("[]", encoding="utf-8")
    with pytest.raises(ValueError, match=r"checkpoint_00000100\.pt: no 'elapsed_s'"):
        run_stage(workspace)


def test_a_broken_index_is_named(workspace):
    folder = workspace / "models" / "snapshots"
    folder.mkdir(parents=True)
    (folder / "index.json").write_text('[{"file": "x.pt"}]', encoding="utf-8")
    with pytest.raises(ValueError, match=r"index\.json: entry 0 lacks \['elapsed_minutes', 'minutes'"):
        run_stage(workspace)


def test_curve_search_is_decodes_unless_curve_sets_beam_or_alpha():
    from pipeline.common.params import parse_params

    same = stage.curve_options(parse_params({"decode": {"beam": 5, "alpha": 1.0, "max_tokens": 300}}))
    assert (same.beam, same.alpha, same.max_tokens) == (5, 1.0, 300)
    greedy = stage.curve_options(parse_params({"decode": {"beam": 5, "max_tokens": 300}, "curve": {"beam": 1}}))
    assert (greedy.beam, greedy.alpha, greedy.max_tokens) == (1, 0.6, 300)
