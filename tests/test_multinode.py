"""Issue #6: the train stage on a two-node Ray cluster (two raylets on this machine, 1 CPU each), joined through
RAY_ADDRESS as on a real cluster; its two workers sit on different nodes and everything comes back."""

import json

import pytest
from ray.cluster_utils import Cluster
from test_train_stage import check_mlflow_run, make_project, run_stage

pytestmark = pytest.mark.slow


@pytest.fixture
def two_nodes():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


def test_training_spans_two_nodes(tmp_path, two_nodes):
    root = make_project(tmp_path / "p", workers=2, max_updates=4, keep_checkpoints=2)
    run_stage(root, extra_env={"RAY_ADDRESS": two_nodes.address})
    metrics = json.loads((root / "metrics/train.json").read_text())
    node_ids = {node.node_id for node in two_nodes.list_all_nodes()}
    assert len(node_ids) == 2
    assert metrics["workers"] == 2 and set(metrics["worker_nodes"]) == node_ids  # one worker on each node
    assert metrics["updates"] == 4
    files = sorted(p.name for p in (root / "models/checkpoints").iterdir())
    assert files == ["checkpoint_00000002.pt", "checkpoint_00000004.pt"]
    check_mlflow_run(root, updates=4, checkpoints=files)
