"""cluster.yaml: Ray's own offline validation (what `ray up` runs first), the autoscaler's choice of node
types, and the security and install promises of the cluster walkthrough (docs/cluster.md). Nothing here talks to AWS."""

import collections
import copy
import importlib.util
import re
import subprocess

import pytest
import yaml
from conftest import REPO

CLUSTER_YAML = REPO / "cluster.yaml"
DOCS = REPO / "docs" / "cluster.md"


def _load_checker():
    spec = importlib.util.spec_from_file_location("check_cluster", REPO / "scripts" / "check_cluster.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cc = _load_checker()


@pytest.fixture(scope="module")
def shipped():
    text, config = cc.load_config(CLUSTER_YAML)
    return text, config, cc.ray_validate(config)


def test_shipped_config_passes_ray_validation_and_project_checks(shipped):
    _, config, prepared = shipped
    on_demand = {"gpu8-a100", "gpu8-h100", "gpu1-a10g"}
    assert set(prepared["available_node_types"]) == {"head"} | on_demand | {f"{t}-spot" for t in on_demand}
    assert prepared["head_node_type"] == "head"
    assert prepared["available_node_types"]["head"]["max_workers"] == 0  # Ray's default for the head
    assert prepared["provider"]["type"] == "aws"
    cc.check(CLUSTER_YAML, allow_placeholders=True)


def test_placeholder_must_be_replaced_before_use(tmp_path):
    with pytest.raises(cc.ClusterConfigError, match="replace YOUR-BUCKET"):
        cc.check(CLUSTER_YAML)
    filled = tmp_path / "cluster.yaml"
    filled.write_text(CLUSTER_YAML.read_text().replace("YOUR-BUCKET", "my-bucket"))
    cc.check(filled)  # one sed, as the header says, and nothing else is missing


def _broken(config, edit):
    broken = copy.deepcopy(config)
    edit(broken)
    return broken


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(max_worker=c.pop("max_workers")), "max_worker"),  # misspelled top-level key
        (lambda c: c.update(max_workers="eight"), "max_workers"),
        (lambda c: c["available_node_types"]["gpu8-a100"].update(max_workers=2.5), "max_workers"),
        (lambda c: c["available_node_types"]["gpu1-a10g"].update(min_worker=1), "min_worker"),
        (lambda c: c["available_node_types"]["gpu8-a100"].update(min_workers=13), "sum of `min_workers`"),
        (lambda c: c.update(head_node_type="gpu-head"), "head_node_type"),
        (lambda c: c["provider"]["security_group"].update(Name="x"), "Name"),
    ],
    ids=["typo-top-level", "max-not-int", "node-max-float", "typo-node-key", "min-over-global", "head", "sg"],
)
def test_ray_rejects_broken_copies(shipped, edit, message):
    _, config, _ = shipped
    with pytest.raises(cc.ClusterConfigError, match=re.escape(message)):
        cc.ray_validate(_broken(config, edit))


def test_min_over_max_in_a_node_type_is_caught_here_not_by_ray(shipped):
    _, config, _ = shipped
    broken = _broken(config, lambda c: c["available_node_types"]["gpu8-h100"].update(min_workers=9))
    prepared = cc.ray_validate(broken)  # Ray accepts it (the autoscaler clamps silently) ...
    problems = cc.check_workers(prepared)
    assert problems == ["available_node_types.gpu8-h100: min_workers 9 > max_workers 8"]  # ... we do not


def test_node_types_fit_the_global_limit_and_carry_profiles_and_accelerator_tags(shipped):
    _, _, prepared = shipped
    assert cc.check_workers(prepared) == []
    types = prepared["available_node_types"]
    assert types["gpu8-a100"]["resources"]["GPU"] == types["gpu8-h100"]["resources"]["GPU"] == 8
    assert types["gpu1-a10g"]["resources"]["GPU"] == 1
    assert all(t.get("min_workers", 0) == 0 for t in types.values())  # GPUs only while a job wants them
    # 8 nodes x 8 GPUs = the 64-GPU row of the scaling table
    assert types["gpu8-a100"]["max_workers"] * 8 == 64 <= prepared["max_workers"] * 8


def _autoscale(prepared, demand):
    """Nodes the autoscaler launches for a Ray Train worker group (a placement group: one gang of bundles).

    `ray up` in Ray 2.60 runs autoscaler v2 (RAY_UP_enable_autoscaler_v2 defaults to 1), whose scheduler honours
    a node type's `priority`; v1's `get_nodes_for` ignores it and breaks ties by name."""
    from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig
    from ray.autoscaler.v2.scheduler import ResourceDemandScheduler, SchedulingRequest
    from ray.autoscaler.v2.utils import ResourceRequestUtil
    from ray.core.generated.autoscaler_pb2 import GangResourceRequest

    node_types = AutoscalingConfig(copy.deepcopy(prepared), skip_content_hash=True).get_node_type_configs()
    gang = GangResourceRequest(requests=[ResourceRequestUtil.make(bundle) for bundle in demand])
    reply = ResourceDemandScheduler().schedule(
        SchedulingRequest(
            disable_launch_config_check=True,
            node_type_configs=node_types,
            max_num_nodes=prepared["max_workers"],  # no head in current_instances, so workers only
            gang_resource_requests=[gang],
        )
    )
    assert list(reply.infeasible_gang_resource_requests) == []
    launched = collections.Counter()
    for launch in reply.to_launch:
        launched[launch.instance_type] += launch.count  # v2 names the node type `instance_type`
    return dict(launched)


@pytest.mark.parametrize(
    ("workers", "pin", "expected"),
    [
        (1, None, {"gpu1-a10g": 1}),  # a trial run: one cheap GPU
        (8, None, {"gpu8-a100": 1}),  # one 8-GPU node, not eight 1-GPU nodes
        (64, None, {"gpu8-a100": 8}),
        (8, "H100", {"gpu8-h100": 1}),  # a pinned accelerator type picks its node type
        (1, "A100", {"gpu8-a100": 1}),
    ],
)
def test_autoscaler_launches_the_node_types_the_docs_promise(shipped, workers, pin, expected):
    """Ray Train asks for {CPU: 1, GPU: 1} per worker (+ accelerator_type:X when pinned)."""
    _, _, prepared = shipped
    bundle = {"CPU": 1, "GPU": 1} | ({f"accelerator_type:{pin}": 0.001} if pin else {})
    assert _autoscale(prepared, [bundle] * workers) == expected


ON_DEMAND = ("gpu8-a100", "gpu8-h100", "gpu1-a10g")


def _is_spot(node_type: dict) -> bool:
    return node_type["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"


def test_every_gpu_type_has_a_spot_twin_and_the_head_is_on_demand(shipped):
    _, _, prepared = shipped
    types = prepared["available_node_types"]
    assert not _is_spot(types["head"])  # the head holds the Ray Train driver, DVC and the MLflow server
    for name in ON_DEMAND:
        on_demand, spot = types[name], types[f"{name}-spot"]
        assert not _is_spot(on_demand) and _is_spot(spot)
        assert spot["resources"] == on_demand["resources"]  # same GPUs, CPUs and accelerator_type tag
        twin_config = {k: v for k, v in spot["node_config"].items() if k != "InstanceMarketOptions"}
        assert twin_config == on_demand["node_config"]  # same instance type, image, profile and disk
        assert spot["node_config"]["InstanceMarketOptions"] == {"MarketType": "spot"}  # no MaxPrice, no options
        assert spot["min_workers"] == 0 and spot["max_workers"] == on_demand["max_workers"]
        assert spot.get("priority", 0) < on_demand.get("priority", 0)  # on-demand first, as shipped
    assert cc.check_markets(prepared) == []


def test_a_spot_head_is_refused(shipped):
    _, config, _ = shipped
    spot_head = _broken(config, lambda c: c["available_node_types"]["head"]["node_config"].update(
        InstanceMarketOptions={"MarketType": "spot"}))  # fmt: skip
    assert cc.check_markets(cc.ray_validate(spot_head)) == [
        "available_node_types.head: the head must be on-demand (it holds the driver, DVC and MLflow)"
    ]


def _with_priority(config, priority):
    def edit(c):
        for name in ON_DEMAND:
            c["available_node_types"][f"{name}-spot"]["priority"] = priority

    return _broken(config, edit)


def _without(config, names):
    return _broken(config, lambda c: [c["available_node_types"][n].update(max_workers=0) for n in names])


@pytest.mark.parametrize(
    ("variant", "workers", "expected"),
    [
        ("shipped", 8, {"gpu8-a100": 1}),
        ("shipped", 72, {"gpu8-a100": 8, "gpu8-a100-spot": 1}),  # spot only past on-demand's max_workers
        ("spot first", 8, {"gpu8-a100-spot": 1}),  # priority 1 on the spot twins, as cluster.yaml says
        ("spot first", 72, {"gpu8-a100-spot": 8, "gpu8-a100": 1}),
        ("spot only", 8, {"gpu8-a100-spot": 1}),  # max_workers 0 on the on-demand twins
        ("spot only", 1, {"gpu1-a10g-spot": 1}),
        ("on-demand only", 72, {"gpu8-a100": 8, "gpu8-h100": 1}),
    ],
)
def test_the_market_is_chosen_by_priority_or_max_workers(shipped, variant, workers, expected):
    _, config, _ = shipped
    config = {
        "shipped": config,
        "spot first": _with_priority(config, 1),
        "spot only": _without(config, ON_DEMAND),
        "on-demand only": _without(config, [f"{n}-spot" for n in ON_DEMAND]),
    }[variant]
    assert _autoscale(cc.ray_validate(config), [{"CPU": 1, "GPU": 1}] * workers) == expected


def test_no_credentials_in_the_file_and_injected_ones_are_caught(shipped):
    text, config, _ = shipped
    assert cc.check_security(text, config) == []
    for line in [
        "aws_access_key_id: abc",
        "  AWS_SECRET_ACCESS_KEY=abc",
        "aws_session_token: abc",
        "key: AKIAIOSFODNN7EXAMPLE",
        "export MLFLOW_TRACKING_TOKEN=abc",
        "auth_token: 0123456789abcdef",
    ]:
        assert cc.check_security(text + "\n# " + line + "\n", config), line


def test_only_ssh_is_open_to_the_internet(shipped):
    _, config, _ = shipped
    rules = cc.effective_ingress(config)
    world = cc.world_open_rules(rules)
    assert world == [{"FromPort": 22, "ToPort": 22, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]
    # Everything else (Ray 6379/8265/10001, MLflow 5000, NCCL) is allowed only from the cluster's own group.
    inside = [r for r in rules if r not in world]
    assert inside == [
        {"FromPort": -1, "ToPort": -1, "IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": "sg-cluster"}]}
    ]
    opened = _broken(
        config,
        lambda c: c["provider"]["security_group"]["IpPermissions"].append(
            {"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp", "Ipv6Ranges": [{"CidrIpv6": "::/0"}]}
        ),
    )
    (problem,) = cc.check_security("", opened)
    assert "beyond SSH" in problem and "8265" in problem


def test_every_node_installs_the_lock_then_the_project_without_deps(shipped):
    _, config, prepared = shipped
    assert cc.check_install(prepared) == []

    def drop_lock_install(c):
        c["setup_commands"] = [cmd for cmd in c["setup_commands"] if "requirements.lock" not in cmd]

    stripped = _broken(config, drop_lock_install)
    problems = cc.check_install(cc.ray_validate(stripped))
    assert any("requirements.lock" in p for p in problems)


def test_workers_learn_the_mlflow_uri_from_the_head_before_ray_starts(shipped):
    _, _, prepared = shipped
    (start,) = [c for c in prepared["worker_start_ray_commands"] if "ray start" in c]
    assert start.index("export MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000") < start.index("ray start")
    head = prepared["head_start_ray_commands"]
    mlflow_at = next(i for i, c in enumerate(head) if "cluster_mlflow.sh s3://" in c)
    assert mlflow_at < next(i for i, c in enumerate(head) if "ray start --head" in c)
    assert not any("--dashboard-host" in c for c in head)  # dashboard stays on the head's localhost


def test_working_tree_is_synced_without_local_outputs(shipped):
    _, _, prepared = shipped
    assert prepared["file_mounts"] == {"~/transformer-wmt": "."}
    assert prepared["file_mounts_sync_continuously"] is False
    assert {"/.venv", "/data", "/runs", "/mlruns", "/models", "/.dvc/cache"} <= set(prepared["rsync_exclude"])
    assert "/.git" not in prepared["rsync_exclude"]  # DVC on the head needs the git repository


def test_files_the_node_commands_use_exist(shipped):
    _, _, prepared = shipped
    used = cc.referenced_repo_files(prepared)
    assert {"requirements.lock", "requirements-cluster.lock", "scripts/cluster_mlflow.sh"} <= set(used)
    assert cc.check_files(prepared) == []


def test_files_the_readme_cluster_steps_reference_exist():
    text = DOCS.read_text(encoding="utf-8")
    paths = set(re.findall(r"(?<![\w/~.-])((?:scripts|docs|bench|conf/preset|tests)/[\w./-]+\.\w+)", text))
    paths |= set(re.findall(r"(?<![\w/.-])(cluster\.yaml|requirements[\w-]*\.lock|dvc\.yaml)\b", text))
    assert {"cluster.yaml", "scripts/cluster_iam.sh", "scripts/cluster_tunnel.sh"} <= paths
    assert sorted(p for p in paths if not (REPO / p).exists()) == []
    presets = set(re.findall(r"preset=([\w-]+)", text))
    assert presets and all((REPO / "conf" / "preset" / f"{p}.yaml").exists() for p in presets)


@pytest.mark.parametrize("script", sorted((REPO / "scripts").glob("*.sh")), ids=lambda p: p.name)
def test_shell_scripts_parse(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_mlflow_script_refuses_the_placeholder_bucket():
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "cluster_mlflow.sh"), "s3://YOUR-BUCKET/mlflow"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "YOUR-BUCKET" in done.stderr


def test_checker_cli_exit_status(tmp_path, capsys):
    assert cc.main([str(CLUSTER_YAML), "--allow-placeholders"]) == 0
    assert "OK" in capsys.readouterr().out
    bad = tmp_path / "cluster.yaml"
    bad.write_text(yaml.safe_dump({"cluster_name": "x", "max_wrokers": 1, "provider": {"type": "aws"}}))
    assert cc.main([str(bad)]) == 1
    assert "max_wrokers" in capsys.readouterr().err
