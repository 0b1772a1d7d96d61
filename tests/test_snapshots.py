"""Snapshots for the BLEU-over-time curve, at the library level (no Ray): a fake stage clock that advances a fixed
amount per update makes every mark, update and label derivable by hand. (Through Ray, the copy of rank 0's snapshots
from Ray's storage into models/snapshots is checked by tests/test_train_stage.py's killed-stage test, across a kill.)"""

import io
import types

import pytest
import torch
from test_training import model_cfg, tiny_corpus, train_cfg

from transformer import training
from transformer.training import Hooks, Trainer, marks_passed


@pytest.mark.parametrize(
    ("elapsed_s", "every", "marks"),
    [(0.0, 1.0, 0), (59.9, 1.0, 0), (60.0, 1.0, 1), (150.0, 1.0, 2), (899.0, 5.0, 2), (900.0, 5.0, 3)],
)
def test_marks_passed_counts_whole_intervals_of_the_stage_clock(elapsed_s, every, marks):
    assert marks_passed(elapsed_s, every) == marks


def test_no_interval_or_a_clock_before_the_start_passes_no_mark():
    assert marks_passed(10_000.0, None) == 0
    assert marks_passed(-5.0, 1.0) == 0


class Clock(Hooks):
    """Stands in for `time` inside transformer.training; each update takes `per_update` seconds."""

    def __init__(self, per_update: float):
        self.now, self.per_update, self.snapshots = 0.0, per_update, []

    def time(self) -> float:
        return self.now

    def on_update(self, trainer, step):
        self.now += self.per_update

    def on_snapshot(self, trainer, snapshot):
        buf = io.BytesIO()
        torch.save(snapshot, buf)  # what the Ray layer writes must load weights-only
        self.snapshots.append(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))


def run(monkeypatch, per_update: float, every: float | None, updates: int) -> Clock:
    clock = Clock(per_update)
    monkeypatch.setattr(training, "time", types.SimpleNamespace(time=clock.time))
    cfg = train_cfg(max_updates=updates, snapshot_every_minutes=every, start_time=0.0, validate_every_updates=100)
    Trainer(model_cfg(), cfg, tiny_corpus()).fit(clock)
    return clock


def test_one_snapshot_per_mark_taken_at_the_first_update_after_it(monkeypatch):
    # 30 s per update, a mark every minute: the flags are read before each update, so the clock shows 60 s
    # before update 3, 120 s before update 5, ... and the snapshot follows that update.
    clock = run(monkeypatch, per_update=30.0, every=1.0, updates=9)
    assert [s["update"] for s in clock.snapshots] == [3, 5, 7, 9]
    assert [s["minutes"] for s in clock.snapshots] == [1.0, 2.0, 3.0, 4.0]
    assert [s["elapsed_minutes"] for s in clock.snapshots] == [1.5, 2.5, 3.5, 4.5]


def test_the_end_of_training_adds_a_final_snapshot_labelled_with_its_own_time(monkeypatch):
    clock = run(monkeypatch, per_update=30.0, every=1.0, updates=8)
    assert [s["update"] for s in clock.snapshots] == [3, 5, 7, 8]
    assert clock.snapshots[-1]["minutes"] == clock.snapshots[-1]["elapsed_minutes"] == 4.0


def test_a_slow_update_skips_marks_rather_than_labelling_late_weights_early(monkeypatch):
    # 150 s per update: before update 2 the clock shows 150 s (2 marks passed); taken at 300 s, labelled 5.
    clock = run(monkeypatch, per_update=150.0, every=1.0, updates=3)
    assert [(s["update"], s["minutes"]) for s in clock.snapshots] == [(2, 5.0), (3, 7.5)]


def test_snapshots_hold_the_weights_of_their_update_and_no_optimiser(monkeypatch):
    class Keep(Clock):
        def on_update(self, trainer, step):
            super().on_update(trainer, step)
            self.weights = {k: v.clone() for k, v in trainer.module.state_dict().items()}

        def on_snapshot(self, trainer, snapshot):
            super().on_snapshot(trainer, snapshot)
            assert all(torch.equal(snapshot["model"][k], v) for k, v in self.weights.items())

    clock = Keep(30.0)
    monkeypatch.setattr(training, "time", types.SimpleNamespace(time=clock.time))
    Trainer(model_cfg(), train_cfg(max_updates=4, snapshot_every_minutes=1.0, start_time=0.0), tiny_corpus()).fit(clock)
    assert clock.snapshots
    assert set(clock.snapshots[0]) == {"model", "config", "update", "tokens", "minutes", "elapsed_minutes"}


def test_no_interval_means_no_snapshot(monkeypatch):
    assert run(monkeypatch, per_update=30.0, every=None, updates=6).snapshots == []


class CheckpointCosts(Clock):
    """A clock on which writing a checkpoint takes `cost` seconds (Ray's report, a slow store)."""

    def __init__(self, per_update: float, cost: float, now: float = 0.0):
        super().__init__(per_update)
        self.cost, self.now, self.states = cost, now, []

    def on_checkpoint(self, trainer, state, metrics):
        self.states.append(state)
        self.now += self.cost


def test_a_run_resumed_from_a_checkpoint_never_labels_a_second_snapshot_with_a_mark_already_taken(monkeypatch):
    # 30 s an update, a mark every minute, a checkpoint every 3 updates that takes 50 s to write. Update 3 runs
    # from 60 s to 90 s, past mark 1: snapshot (3, minute 1), then the checkpoint, whose clock reads 90 s. Resumed
    # from it, mark 2 is passed before update 5 (at 120 s), which ends at 150 s: (5, minute 2). With the checkpoint
    # written first, update 3's snapshot was taken at 140 s and labelled minute 2, and the resumed run labelled
    # update 5 minute 2 again: two points of the curve for one mark.
    cfg = dict(max_updates=6, snapshot_every_minutes=1.0, validate_every_updates=100, checkpoint_every_updates=3)
    first = CheckpointCosts(per_update=30.0, cost=50.0)
    monkeypatch.setattr(training, "time", types.SimpleNamespace(time=first.time))
    Trainer(model_cfg(), train_cfg(**cfg, start_time=0.0), tiny_corpus()).fit(first)
    assert [(s["update"], s["minutes"]) for s in first.snapshots][0] == (3, 1.0)
    assert first.states[0]["update"] == 3 and first.states[0]["elapsed_s"] == 90.0

    rerun = CheckpointCosts(per_update=30.0, cost=50.0, now=1000.0)
    monkeypatch.setattr(training, "time", types.SimpleNamespace(time=rerun.time))
    trainer = Trainer(model_cfg(), train_cfg(**cfg, start_time=1000.0), tiny_corpus())
    trainer.load_state_dict(first.states[0])
    trainer.fit(rerun)
    assert [(s["update"], s["minutes"]) for s in rerun.snapshots][0] == (5, 2.0)


def test_a_restart_deletes_the_snapshots_of_the_stretch_it_trains_again(tmp_path):
    """Snapshots after the update a run restarts from (and unfinished copies) go; those up to it stay."""
    import pyarrow.fs

    from pipeline.common.train_worker import drop_snapshots_after

    names = ["snapshot_00000003.pt", "snapshot_00000007.pt", "snapshot_00000008.pt", "snapshot_00000009.pt.tmp"]
    for name in [*names, "index.json"]:
        (tmp_path / name).write_bytes(b"x")
    fs = pyarrow.fs.LocalFileSystem()
    dropped = drop_snapshots_after(fs, str(tmp_path), 7)
    assert dropped == ["snapshot_00000008.pt", "snapshot_00000009.pt.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json", "snapshot_00000003.pt", "snapshot_00000007.pt"]
    assert drop_snapshots_after(fs, str(tmp_path), 0) == ["snapshot_00000003.pt", "snapshot_00000007.pt"]
    assert drop_snapshots_after(fs, str(tmp_path / "none"), 0) == []  # no snapshot taken yet
