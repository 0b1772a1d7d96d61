"""The `train` stage through Ray Train, run as DVC runs it (`python -m pipeline.train ...` in a subprocess):
2 workers equal 1 worker, a worker that crashes once is resumed from its checkpoint, a killed stage resumes when
rerun, and the MLflow run holds params, metric histories and checkpoint artifacts. Each Ray run costs ~20 s,
so there are only three of them."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from transformer.batching import PackedCorpus
from transformer.checkpoint import load
from transformer.model import EOS_ID, make_config
from transformer.training import Trainer, TrainingConfig

REPO = Path(__file__).resolve().parents[1]
VOCAB = 40
MODEL = {
    "arch": "tiny",
    "d_model": 32,
    "d_ff": 64,
    "heads": 2,
    "encoder_layers": 1,
    "decoder_layers": 1,
    "dropout": 0.0,
}
TRAIN = {
    "update_tokens": 120,
    "max_tokens": 60,
    "max_updates": 6,
    "warmup": 2,
    "checkpoint_every_minutes": None,
    "checkpoint_every_updates": 2,
    "keep_checkpoints": 2,
    "validate_every_updates": 2,
    "log_every_updates": 1,
    "workers": 1,
    "cpus_per_worker": 1,
    "storage_path": "runs/ray",
}

pytestmark = pytest.mark.slow


def pairs(n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        src = rng.integers(4, VOCAB, rng.integers(2, 10)).tolist() + [EOS_ID]
        out.append((src, [(t + 1) % VOCAB or 4 for t in src[:-1]] + [EOS_ID]))
    return out


def write_bin(folder: Path) -> None:
    """A binarised corpus in the data stage's on-disk format (transformer.corpus)."""
    from transformer.corpus import SideWriter, write_meta

    folder.mkdir(parents=True)
    sizes = {"train": 64, "valid": 16, "test": 8}
    for seed, (split, n) in enumerate(sizes.items()):
        data = pairs(n, seed)
        for lang, side in (("en", 0), ("de", 1)):
            writer = SideWriter(folder, split, lang, "uint16")
            seqs = [np.array(p[side]) for p in data]
            writer.append(np.concatenate(seqs), np.array([len(s) for s in seqs]))
            writer.close()
    meta = {"vocab_size": VOCAB, "dtype": "uint16", "langs": {"source": "en", "target": "de"}, "splits": sizes}
    write_meta(folder, meta)


def make_project(root: Path, **train) -> Path:
    """A working directory as DVC would run the stage in: params.yaml, data/bin, an MLflow store of its own."""
    root.mkdir(parents=True, exist_ok=True)
    params = {"model": MODEL, "train": {**TRAIN, **train}, "mlflow": {"experiment": "test-train"}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    if not (root / "data/bin").exists():
        write_bin(root / "data/bin")
    client = MlflowClient(tracking_uri(root))
    if client.get_experiment_by_name("test-train") is None:  # artifacts inside root, not in the repository
        client.create_experiment("test-train", artifact_location=(root / "mlruns").as_uri())
    return root


def tracking_uri(root: Path) -> str:
    return f"sqlite:///{root}/mlflow.db"


# Ray Train's controller takes a worker's report at its next poll of the workers (every 2 s by default), and a
# worker's second report waits for the first to be taken: tiny runs that checkpoint every few updates spent most
# of their time waiting. Polled every 0.5 s here; the semantics are the same.
FAST_POLL = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def stage_env(root: Path, extra_env: dict | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": tracking_uri(root), **FAST_POLL}
    env.pop("RAY_ADDRESS", None)
    return {**env, **(extra_env or {})}


def run_stage(root: Path, timeout=240, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pipeline.train", "--data", "data/bin", "--out", "models/checkpoints"]
    env = stage_env(root, extra_env)
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def reference(max_updates: int, dropout: float = 0.0, **train) -> tuple[Trainer, dict]:
    """The same training in this process, 1 worker, no Ray, no interruption."""
    cfg = TrainingConfig(
        **{k: v for k, v in {**TRAIN, "max_updates": max_updates, **train}.items() if k in TRAINING_KEYS}
    )
    corpus = PackedCorpus.from_pairs(pairs(64, 0)), PackedCorpus.from_pairs(pairs(16, 1))
    overrides = {k: v for k, v in MODEL.items() if k not in ("arch", "dropout")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a Ray worker with 1 CPU: the same reduction order
    try:
        trainer = Trainer(make_config("tiny", VOCAB, **overrides, dropout=dropout), cfg, *corpus)
        trainer.fit()
    finally:
        torch.set_num_threads(threads)
    return trainer, trainer.module.state_dict()


TRAINING_KEYS = set(TrainingConfig.__dataclass_fields__) - {"start_time", "deadline"}


def final_weights(root: Path, key: str = "model") -> tuple[int, dict]:
    files = sorted((root / "models/checkpoints").glob("checkpoint_*.pt"))
    blob = load(files[-1])
    return blob["update"], blob[key]


def without_key_bias(name, t):
    # Zero-gradient key biases amplify summation-order noise through Adam (see tests/test_training.py).
    if name.endswith("in_proj.bias"):
        d = t.shape[0] // 3
        return torch.cat([t[:d], t[2 * d :]])
    return t[t.shape[0] // 2 :] if name.endswith("kv_proj.bias") else t


def test_two_workers_with_a_crash_finish_like_one_uninterrupted_worker(tmp_path):
    root = make_project(tmp_path / "p", workers=2)
    t0 = time.time()
    proc = run_stage(root, extra_env={"TRANSFORMER_TEST_CRASH_AT_UPDATE": "3"})
    print(f"stage took {time.time() - t0:.1f} s")
    (tmp_path / "stage.log").write_text(proc.stdout + proc.stderr)
    assert "injected crash at update 3" in proc.stdout + proc.stderr
    # One progress line per update run (Ray Train's print patch doubled them): update 3 ran, crashed in its
    # hook and ran again after the resume from 2.
    log = proc.stdout + proc.stderr
    assert [log.count(f"update {n:>7} | loss") for n in range(1, 7)] == [1, 1, 2, 1, 1, 1], log[-3000:]
    assert "Failed to query Ray Train Controller" not in log  # once a second without the skip regex
    metrics = json.loads((root / "metrics/train.json").read_text())
    assert metrics["updates"] == 6 and metrics["workers"] == 2 and metrics["skipped_updates"] == 0
    assert metrics["resumed_from_update"] == 2  # the checkpoint before the crash, not a fresh start
    # Outputs: the last 2 checkpoints, plots with one row per logged update / validation.
    files = sorted(p.name for p in (root / "models/checkpoints").iterdir())
    assert files == ["checkpoint_00000004.pt", "checkpoint_00000006.pt"]
    train_rows = (root / "plots/train.csv").read_text().splitlines()
    assert train_rows[0].startswith("update,loss") and [r.split(",")[0] for r in train_rows[1:]] == list("123456")
    assert (root / "plots/valid.csv").read_text().splitlines()[0] == "update,valid_loss,valid_nll,valid_ppl"
    # 2 workers through Ray, crashed and resumed, end where 1 uninterrupted worker ends (summation order
    # differs between 1 and 2 workers, hence 1e-5 rather than bit equality; bit equality is tested below).
    ref, ref_weights = reference(6)
    update, weights = final_weights(root)
    assert update == 6
    for k, v in ref_weights.items():
        torch.testing.assert_close(without_key_bias(k, weights[k]), without_key_bias(k, v), rtol=1e-5, atol=1e-5)
    assert metrics["valid_loss"] == pytest.approx(ref.history["valid"][-1]["valid_loss"], abs=1e-5)
    check_mlflow_run(root, updates=6, checkpoints=files)


def check_mlflow_run(root: Path, updates: int, checkpoints: list[str]) -> None:
    client = MlflowClient(tracking_uri(root))
    exp = client.get_experiment_by_name("test-train")
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.stage = 'train'")
    assert run.info.status == "FINISHED"
    assert run.data.params["train.update_tokens"] == "120" and run.data.params["model.d_model"] == "32"
    assert {"torch_version", "ray_version", "git_commit", "devices"} <= set(run.data.tags)
    # One loss point per update (logged every update); a restarted segment logs its updates again.
    steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "loss")})
    assert steps == list(range(1, updates + 1))
    valid_steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "valid_loss")})
    assert valid_steps == list(range(2, updates + 1, 2))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert artifacts == {f"checkpoints/{name}" for name in checkpoints}


def ray_checkpoints(root: Path) -> list[Path]:
    return sorted(root.glob("runs/ray/*/checkpoint_*/checkpoint.pt"))


def test_killed_stage_resumes_when_rerun_and_ends_bit_exact(tmp_path):
    # Dropout on, 1 worker: the resumed run must replay the uninterrupted run exactly, the moving average of the
    # weights (train.ema_decay) included; a snapshot at about every update (a mark every 12 ms) changes nothing.
    model = {**MODEL, "dropout": 0.2}
    root = make_project(
        tmp_path / "p", max_updates=12, checkpoint_every_updates=3, keep_checkpoints=10, ema_decay=0.9,
        snapshot_every_minutes=0.0002,
    )  # fmt: skip
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["model"] = model
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = [sys.executable, "-m", "pipeline.train", "--data", "data/bin", "--out", "models/checkpoints"]
    log = open(root / "first.log", "w")  # noqa: SIM115 -- closed below
    # The kill lands at a known update: the worker stops after its checkpoint at update 6 (12 tiny updates take
    # well under a second, so a kill on the first checkpoint seen once found the run already at its end).
    env = stage_env(root, {"TRANSFORMER_TEST_HANG_AT_UPDATE": "6"})
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while "hanging after the checkpoint" not in (root / "first.log").read_text() and time.time() < deadline:
        assert proc.poll() is None, (root / "first.log").read_text()[-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the stage, its local Ray and its workers, at once
    proc.wait()
    log.close()
    assert [int(p.parent.name[-8:]) for p in ray_checkpoints(root)] == [3, 6], (root / "first.log").read_text()[-3000:]
    assert not (root / "metrics/train.json").exists()
    # A kill between rank 0 persisting a checkpoint and Ray's controller registering it leaves a checkpoint that
    # Ray's registry does not list; the rerun resumes from it and must keep it. Made certain: no registry at all.
    for registry in root.glob("runs/ray/*/checkpoint_manager_snapshot.json"):
        registry.unlink()

    run_stage(root)
    metrics = json.loads((root / "metrics/train.json").read_text())
    assert metrics["updates"] == 12
    assert metrics["resumed_from_update"] == 6
    assert sum(metrics["time_s"].values()) == pytest.approx(metrics["wall_time_s"], abs=0.1 * len(metrics["time_s"]))
    assert {"ray_init", "worker_group_start", "steps", "checkpoints", "snapshots"} <= set(metrics["time_s"])
    assert 0 <= metrics["step_share"] < 1  # 6 tiny updates in ~25 s: a share that rounds to 0.001 or 0.0
    ref, ref_weights = reference(12, 0.2, ema_decay=0.9)
    kept = sorted((root / "models/checkpoints").glob("checkpoint_*.pt"))
    assert [load(f)["update"] for f in kept] == [3, 6, 9, 12]  # 3 and 6 of the killed stage, 9 and 12 of the rerun
    update, weights = final_weights(root)
    assert update == 12
    for k, v in ref_weights.items():
        assert torch.equal(weights[k], v), k
    _, ema = final_weights(root, "ema")
    for k, v in ref.ema.weights().items():
        assert torch.equal(ema[k], v), k
    # One curve across the kill: the killed stage's snapshots up to the update resumed from, then the rerun's, on
    # one clock (each mark once, in update order); not only the rerun's, as when each stage start had a folder.
    folder = root / "models/snapshots"
    index = json.loads((folder / "index.json").read_text())
    updates, marks = [e["update"] for e in index], [e["minutes"] for e in index]
    assert updates == sorted(set(updates)) and updates[-1] == 12
    assert updates[0] <= metrics["resumed_from_update"] < updates[-1]
    assert marks == sorted(set(marks))
    # Copied from Ray's storage with an index that lists exactly the files; regular marks are whole multiples of
    # the interval, taken at or after the mark; the last (end of training) holds the final weights.
    assert sorted(p.name for p in folder.glob("snapshot_*.pt")) == [e["file"] for e in index]
    assert len(index) >= 3 and metrics["snapshots"] == len(index)
    for e in index[:-1]:
        assert e["minutes"] / 0.0002 == pytest.approx(round(e["minutes"] / 0.0002))
        assert e["elapsed_minutes"] >= e["minutes"]
    last = torch.load(folder / index[-1]["file"], weights_only=True)
    assert last["update"] == 12 and all(torch.equal(weights[k], v) for k, v in last["model"].items())


def test_the_kept_checkpoints_are_the_newest_intact_ones_and_must_end_where_training_did(tmp_path):
    from pipeline.train import write_checkpoints

    def state(update):
        return {"model": {"w": torch.full((2,), float(update))}, "config": {}, "update": update, "tokens": 10 * update}

    # As train_worker.intact_states lists a run's storage: newest first, a line for a half-written one.
    found = ["checkpoint runs/x/checkpoint_00000005/checkpoint.pt is corrupt or half-written (missing)"]
    found += [(state(u), f"runs/x/checkpoint_{u:08d}/checkpoint.pt") for u in (4, 3, 2, 1)]
    assert write_checkpoints(iter(found), 3, 4, tmp_path / "out") == [2, 3, 4]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"checkpoint_{u:08d}.pt" for u in (2, 3, 4)]
    assert load(tmp_path / "out" / "checkpoint_00000004.pt")["tokens"] == 40
    # Training ended at update 6, but the newest checkpoint is 4's: an error naming it, and nothing written.
    with pytest.raises(RuntimeError, match="ended at update 6, .* from update 4: runs/x/checkpoint_00000004"):
        write_checkpoints(iter(found), 3, 6, tmp_path / "stale")
    assert not (tmp_path / "stale").exists()


def test_the_stage_time_adds_up_from_its_milestones_and_the_loop_ledger():
    from pipeline.train import time_breakdown

    marks = {"stage_start": 100.0, "ray_up": 104.0, "fit_called": 106.0, "fit_returned": 181.0}
    worker = {"worker_entered": 115.0, "data_fetched": 116.0, "trainer_ready": 118.0}
    worker |= {"loop_done": 174.0, "worker_done": 175.5}
    loop = {"first_update": 1.0, "steps": 50.0, "checkpoints": 3.0}
    summary = {"marks": worker, "startup_s": 20.0, "time_s": loop}  # the first update started at 120
    parts = time_breakdown(summary, 85.0, marks)  # the outputs were written at 185
    assert parts == {
        "ray_init": 4.0, "driver_data": 2.0, "worker_group_start": 9.0, "data_to_worker": 1.0,
        "model_and_resume": 2.0, "first_batch": 2.0, "first_update": 1.0, "steps": 50.0, "checkpoints": 3.0,
        "worker_wrap_up": 1.5, "ray_wrap_up": 5.5, "outputs": 4.0, "other": 0.0,
    }  # fmt: skip
    assert sum(parts.values()) == 85.0
    # A loop that did not say where it ended (a worker of an older version): the wrap-up stays in "other".
    del worker["loop_done"], worker["worker_done"]
    parts = time_breakdown(summary, 85.0, marks)
    assert "worker_wrap_up" not in parts and "ray_wrap_up" not in parts
    assert parts["outputs"] == 4.0 and parts["other"] == 7.0


def test_a_rerun_resumes_only_a_run_of_the_same_trajectory(tmp_path):
    """A rerun resumes the Ray run named by `fingerprint`. On the paper's schedule a longer budget continues a run;
    with a cool-down the rate follows the budget, so another budget is another run (a 20-minute rerun of the
    multi30k preset once resumed a 60-minute run's checkpoints). Checkpointing and logging never matter."""
    from pipeline.common.params import parse_params
    from pipeline.train import fingerprint

    write_bin(tmp_path / "bin")

    def run_name(**train) -> str:
        return fingerprint(parse_params({"model": MODEL, "train": {**TRAIN, **train}}), tmp_path / "bin")

    assert run_name(max_updates=100) == run_name(max_updates=200)
    assert run_name(max_minutes=20) == run_name(max_minutes=60)
    assert run_name(cooldown=0.3, max_updates=100) != run_name(cooldown=0.3, max_updates=200)
    assert run_name(cooldown=0.3, max_minutes=20) != run_name(cooldown=0.3, max_minutes=60)
    quiet = dict(keep_checkpoints=2, checkpoint_every_updates=5, validate_every_updates=7, log_every_updates=9)
    assert run_name(cooldown=0.3, max_minutes=20, **quiet) == run_name(cooldown=0.3, max_minutes=20)
    assert run_name(cooldown=0.3) != run_name(cooldown=0.2)
    assert run_name(lr_factor=0.5) != run_name()
