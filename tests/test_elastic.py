"""Issue #29: elastic training and failing fast. A run with `train.workers: [min, max]` loses a node, goes on with
fewer workers, grows back, and ends with the weights of an uninterrupted 1-worker run; a run short of its minimum
waits a bounded time and names what it waits for; errors a restart cannot fix (non-finite training, a full disk)
end the run without a restart; a corrupt newest checkpoint is skipped for the one before it.

The Ray runs use `ray.cluster_utils.Cluster` (raylets of 1 CPU on this machine) or a local Ray, with the stage in
a subprocess as DVC runs it, and the cluster changed from the test's main thread."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs
import pytest
import ray
import torch
import yaml
from mlflow.tracking import MlflowClient
from ray.cluster_utils import Cluster
from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import get_or_create_autoscaling_coordinator
from test_train_stage import MODEL, final_weights, make_project, reference, stage_env, tracking_uri, without_key_bias

from pipeline.common.elastic import FreshClusterView, idle_line, lost, summarise
from pipeline.common.failures import FailFast, RunCannotContinue, cannot_continue
from pipeline.common.train_worker import CHECKPOINT_FILE, newest_intact_state, resume
from transformer.training import TooManyBadUpdates

STAGE = [sys.executable, "-m", "pipeline.train", "--data", "data/bin", "--out", "models/checkpoints"]


def attempts(root: Path) -> list[dict]:
    """The records rank 0 of each worker-group start wrote (pipeline/common/elastic.py), in order."""
    return [json.loads(p.read_text()) for p in sorted(root.glob("runs/ray/*/attempts/attempt_*.json"))]


def run_failing(root: Path, extra_env: dict | None = None, timeout=300) -> tuple[str, float]:
    t0 = time.time()
    proc = subprocess.run(STAGE, cwd=root, env=stage_env(root, extra_env), capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    log = proc.stdout + proc.stderr
    (root / "stage.log").write_text(log)
    assert proc.returncode != 0, log[-3000:]
    return log, time.time() - t0


# --- without Ray ---


def test_a_truncated_newest_checkpoint_is_skipped_for_the_one_before_it(tmp_path):
    for update in (2, 4):
        (tmp_path / f"checkpoint_{update:08d}").mkdir()
        torch.save(
            {"update": update, "weights": torch.ones(1000)}, tmp_path / f"checkpoint_{update:08d}" / CHECKPOINT_FILE
        )
    newest = tmp_path / "checkpoint_00000004" / CHECKPOINT_FILE
    newest.write_bytes(newest.read_bytes()[:2000])  # a node lost while its rank 0 copied it
    (tmp_path / "checkpoint_00000006").mkdir()  # persisted folder, file never written
    (state, path), skipped = newest_intact_state(pyarrow.fs.LocalFileSystem(), str(tmp_path))
    assert state["update"] == 2 and path == f"{tmp_path}/checkpoint_00000002/{CHECKPOINT_FILE}"
    assert len(skipped) == 2
    assert "checkpoint_00000006" in skipped[0] and "(missing)" in skipped[0]
    assert "checkpoint_00000004" in skipped[1] and "corrupt or half-written" in skipped[1]
    assert all(line.endswith("skipped for the one before it") for line in skipped)


def test_a_checkpoint_of_other_params_ends_the_run_naming_its_path():
    from test_training import model_cfg, tiny_corpus, train_cfg

    from transformer.training import Trainer

    state = Trainer(model_cfg(), train_cfg(), tiny_corpus()).state_dict()
    other = Trainer(model_cfg(dropout=0.2), train_cfg(), tiny_corpus())
    with pytest.raises(RunCannotContinue, match="cannot resume from runs/x/checkpoint_00000002/checkpoint.pt"):
        resume(other, (state, "runs/x/checkpoint_00000002/checkpoint.pt"), rank=0)


def test_errors_a_restart_cannot_fix_name_their_key_and_end_the_run():
    training = {"lr_factor": 1e9, "warmup": 2, "clip_norm": 0.0}
    fatal = cannot_continue(TooManyBadUpdates("10 consecutive updates had a non-finite loss"), training)
    assert "train.lr_factor: 1000000000.0" in str(fatal)
    full = OSError(28, "Error writing bytes to file. Detail: [errno 28] No space left on device")
    assert isinstance(cannot_continue(full, training), RunCannotContinue)
    assert cannot_continue(RuntimeError("Connection closed by peer"), training) is None  # a lost worker: retried
    # The controller sees the worker's exception inside Ray's wrapper, and raises it: the run ends.
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    with pytest.raises(RunCannotContinue, match="worker 1: disk"):
        FailFast().after_exception(None, {1: UserExceptionWithTraceback(RunCannotContinue("disk"), "traceback")})
    FailFast().after_exception(None, {0: UserExceptionWithTraceback(RuntimeError("gloo"), "traceback")})


def test_history_of_sizes_counts_restarts_resizes_and_losses():
    def record(workers, resumed_from, reached, started_at, saved_at=None):
        return dict(workers=workers, resumed_from=resumed_from, reached=reached, started_at=started_at,
                    checkpoint_saved_at=saved_at)  # fmt: skip

    runs = [record(2, None, 7, 0.0), record(1, 6, 15, 50.0, 40.0), record(2, 14, 30, 90.0, 80.0)]
    assert lost(runs[0], runs[1]) == (1, 10.0)
    assert summarise(runs) == {
        "worker_group_starts": 3, "restarts": 2, "resizes": 2, "worker_sizes": [2, 1, 2], "worker_counts_seen": [1, 2],
        "updates_lost": 2, "seconds_lost": 20.0,
    }  # fmt: skip
    assert summarise(runs[:1])["restarts"] == 0 and summarise([]) == {}
    assert idle_line(7, 1, 8).endswith("[0, 1, 2, 1, 3, 5, 0, 1]")


# --- through Ray ---


@pytest.mark.slow
def test_non_finite_training_fails_without_a_restart(tmp_path):
    root = make_project(tmp_path / "p", lr_factor=1e12, max_bad_updates=2, max_failures=3)
    log, seconds = run_failing(root)
    print(f"stage took {seconds:.1f} s")
    assert "RunCannotContinue" in log and "train.lr_factor: 1000000000000.0" in log, log[-3000:]
    assert len(attempts(root)) == 1  # one worker-group start: Ray did not restart the group


SITECUSTOMIZE = '''
import pyarrow.fs

_copy_files = pyarrow.fs.copy_files


def copy_files(source, destination, *args, **kwargs):
    """What pyarrow raises when Ray copies a checkpoint into a full storage_path."""
    if "/checkpoint_" in str(destination):
        raise OSError(28, "Error writing bytes to file. Detail: [errno 28] No space left on device")
    return _copy_files(source, destination, *args, **kwargs)


pyarrow.fs.copy_files = copy_files
'''


@pytest.mark.slow
def test_a_full_checkpoint_storage_fails_without_a_restart_naming_the_path(tmp_path):
    root = make_project(tmp_path / "p", max_failures=3)
    site = tmp_path / "site"  # imported at start-up by every Python process of the stage, Ray's workers included
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = stage_env(root)
    log, seconds = run_failing(root, {"PYTHONPATH": f"{site}:{env['PYTHONPATH']}"})
    print(f"stage took {seconds:.1f} s")
    (run,) = root.glob("runs/ray/*")
    assert f"no space left on device while writing checkpoint_00000002 to {run}/checkpoint_00000002" in log, log[-3000:]
    assert "train.storage_path" in log
    assert len(attempts(root)) == 1


@pytest.fixture
def cluster():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    yield cluster
    cluster.shutdown()


@pytest.mark.slow
def test_the_view_that_sizes_an_elastic_group_sees_a_new_node_at_once(cluster):
    # Ray's autoscaling coordinator, whose reservations the elastic policy counts workers from, looks at the
    # cluster every 20 s; FreshClusterView makes it look now. Here it must see a node added a moment ago.
    ray.init(address=cluster.address)
    try:
        coordinator = get_or_create_autoscaling_coordinator()

        def reserved_cpus() -> float:
            reserved = ray.get(coordinator.get_reserved_resources.remote("test"))
            return sum(resources.get("CPU", 0) for resources in reserved.values())

        ray.get(coordinator.request_resources.remote("test", [{"CPU": 1}] * 2, expire_after_s=60))
        assert reserved_cpus() == 1  # the head node's one CPU
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        FreshClusterView(every_s=60).refresh()
        assert reserved_cpus() == 2
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_a_cluster_short_of_the_minimum_fails_after_the_wait_naming_what_it_waits_for(tmp_path, cluster):
    # Two workers of 1 CPU wanted, one node of 1 CPU left: Ray would wait for ever.
    root = make_project(tmp_path / "p", workers=[2, 2], wait_for_workers_minutes=0.1)
    log, seconds = run_failing(root, {"RAY_ADDRESS": cluster.address})
    print(f"stage took {seconds:.1f} s")
    assert "WorkersUnavailable" in log, log[-3000:]
    assert "(train.wait_for_workers_minutes) for at least 2 worker(s) of {'CPU': 1} each (train.workers: [2, 2])" in log
    assert "the cluster has CPU 1 free of 1, GPU 0 free of 0 on 1 alive node(s)" in log
    assert seconds < 120


def wait_for(condition, what: str, proc: subprocess.Popen, log: Path, timeout: float = 240) -> list[dict]:
    deadline = time.time() + timeout
    while True:
        seen = condition()
        if seen:
            return seen
        assert proc.poll() is None, f"the stage ended before {what}:\n{log.read_text()[-4000:]}"
        assert time.time() < deadline, f"no {what} after {timeout} s:\n{log.read_text()[-4000:]}"
        time.sleep(0.5)


def last_attempt(root: Path, workers: int, updates_done: int):
    """A condition: the newest worker group has `workers` workers and has made `updates_done` updates."""

    def condition():
        seen = attempts(root)
        done = seen and seen[-1]["workers"] == workers
        return seen if done and seen[-1]["reached"] - (seen[-1]["resumed_from"] or 0) >= updates_done else None

    return condition


@pytest.mark.slow
def test_an_elastic_run_loses_a_node_and_grows_back_to_the_weights_of_one_worker(tmp_path, cluster):
    node = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    # A checkpoint at every update (each report waits for the controller's next poll, 0.5 s here): the run lasts long
    # enough for the cluster to change under it. Dropout on: the masks must not depend on the number of workers. Three
    # micro-batches per update: 2 workers sum their gradients in another order than 1 (and one pass idles).
    # lr_factor 0.25: at the tests' usual 1.0 this tiny task trains chaotically, and any rounding difference grows
    # (a 1e-7 nudge of one weight: 4e-5 after 30 updates, 9e-2 after 60; at 0.25: 8e-7 and 1e-6).
    root = make_project(
        tmp_path / "p", workers=[1, 2], update_tokens=180, max_updates=30, checkpoint_every_updates=1,
        validate_every_updates=10, resize_every_minutes=0.05, max_failures=5, lr_factor=0.25,
    )  # fmt: skip
    params = yaml.safe_load((root / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump({**params, "model": {**MODEL, "dropout": 0.1}}))
    # FreshClusterView has Ray's view of the cluster follow each change at once; were it stale, a group of the old
    # size would be tried first, for this long (30 s by default), and the run could end before the node comes back.
    env = stage_env(root, {"RAY_ADDRESS": cluster.address, "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10"})
    log = root / "stage.log"
    t0 = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(STAGE, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(last_attempt(root, 2, 3), "two workers at work", proc, log)
        cluster.remove_node(node)  # its worker dies with it
        wait_for(last_attempt(root, 1, 2), "one worker at work after the loss", proc, log)
        cluster.add_node(num_cpus=1)
        wait_for(last_attempt(root, 2, 1), "two workers again", proc, log)
        assert proc.wait(timeout=300) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"stage took {time.time() - t0:.1f} s")
    text = log.read_text()
    assert "resize 2 -> 1 workers" in text and "resize 1 -> 2 workers" in text, text[-4000:]
    assert "2 worker(s), 3 micro-batches per update, 1 idle pass(es) per update" in text
    metrics = json.loads((root / "metrics/train.json").read_text())
    assert metrics["updates"] == 30 and metrics["workers"] == 2 and metrics["worker_counts_seen"] == [1, 2]
    # Through RAY_ADDRESS, as on a real cluster: the last group's two workers (1 CPU each) sit on the two nodes, and
    # everything comes back to the driver (what tests/test_multinode.py checked before this test covered it).
    nodes = {n.node_id for n in cluster.list_all_nodes()}
    assert len(nodes) == 2 and set(metrics["worker_nodes"]) == nodes
    assert metrics["worker_sizes"][-3:] == [2, 1, 2] and metrics["resizes"] >= 2 and metrics["restarts"] >= 2
    assert metrics["updates_lost"] >= 0 and metrics["seconds_lost"] > 0
    client = MlflowClient(tracking_uri(root))
    experiment = client.get_experiment_by_name("test-train").experiment_id
    (run,) = client.search_runs([experiment], filter_string="tags.stage = 'train'")
    assert run.data.tags["worker_sizes"].endswith("2 -> 1 -> 2")
    assert [m.value for m in client.get_metric_history(run.info.run_id, "workers")][-3:] == [2, 1, 2]
    # The same weights as one uninterrupted worker, to float32 summation order: 2 workers add the 3 micro-batches'
    # gradients as (g0 + g2) + g1, 1 worker as (g0 + g1) + g2; training amplifies differences of ~1e-7 (Adam divides
    # by sqrt(v)) to ~1e-6 over 30 updates (2 gloo workers throughout: 9.8e-7, weights of magnitude <= 0.6). The key
    # biases, whose gradient is zero in exact arithmetic, are rounding noise and left out (tests/test_training.py).
    train = dict(update_tokens=180, checkpoint_every_updates=1, validate_every_updates=10, lr_factor=0.25)
    ref, ref_weights = reference(30, 0.1, **train)
    assert metrics["valid_loss"] == pytest.approx(ref.history["valid"][-1]["valid_loss"], abs=1e-5)
    update, weights = final_weights(root)
    assert update == 30
    diff = max(
        (without_key_bias(k, weights[k]) - without_key_bias(k, v)).abs().max().item() for k, v in ref_weights.items()
    )
    print(f"max abs difference from one uninterrupted worker: {diff:.2e}")
    assert diff < 2e-5
