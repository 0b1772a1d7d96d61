"""Offline check of cluster.yaml before `ray up`: Ray's own validation, then this project's promises.

    python scripts/check_cluster.py cluster.yaml

Ray's part is what `ray up` runs before it touches the cloud (`prepare_config` fills defaults from the
provider's defaults.yaml, `validate_config` checks `ray-schema.json` and the node-type totals). Ray does not
check a node type's min_workers against its max_workers (the autoscaler silently clamps), nor that the head is
on-demand, nor anything about security, so those are checked here. Exit status 0: usable; 1: problems, one per
line, each naming the key.
"""

from __future__ import annotations

import argparse
import ast
import copy
import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
REMOTE_REPO = "~/transformer-wmt"  # where file_mounts puts the working tree on every node
PLACEHOLDER = "YOUR-BUCKET"
WORLD = {"0.0.0.0/0", "::/0"}

# Things that look like credentials. Ray's cluster token is a file made on the head, so "auth_token" as a path
# is fine; a key followed by a literal value is not.
CREDENTIAL_PATTERNS = [
    re.compile(r"aws_access_key_id", re.I),
    re.compile(r"aws_secret_access_key", re.I),
    re.compile(r"aws_session_token", re.I),
    re.compile(r"secret", re.I),
    re.compile(r"password", re.I),
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key ids
    re.compile(r"\b[\w-]*token[\w-]*\s*[:=]\s*\S", re.I),  # token: value / TOKEN=value
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]


class ClusterConfigError(ValueError):
    """A cluster config that `ray up` would reject or that breaks a promise of this project."""


def load_config(path: Path | str) -> tuple[str, dict]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ClusterConfigError(f"{path}: file not found") from None
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ClusterConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(config, dict):
        raise ClusterConfigError(f"{path}: expected a mapping at the top level")
    return text, config


def ray_validate(config: dict) -> dict:
    """What `ray up` does offline: defaults merged in, then Ray's schema and checks. Returns the result."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        prepared = prepare_config(copy.deepcopy(config))
        validate_config(prepared)
    except jsonschema.ValidationError as e:
        where = ".".join(str(p) for p in e.absolute_path) or "(top level)"
        raise ClusterConfigError(f"Ray rejects the config at '{where}': {e.message}") from None
    except (ValueError, KeyError, AssertionError) as e:
        raise ClusterConfigError(f"Ray rejects the config: {e}") from None
    return prepared


def _ray_aws_rule_functions() -> dict:
    """Ray's own functions that build the security group's inbound rules, taken from its source.

    Importing ray.autoscaler._private.aws.config needs boto3, which only the machine running `ray up` has; the
    three rule builders use nothing but itertools, so they are compiled from that file on their own.
    """
    import itertools

    import ray.autoscaler

    source_path = Path(ray.autoscaler.__file__).parent / "_private" / "aws" / "config.py"
    tree = ast.parse(source_path.read_text(encoding="utf-8"))
    wanted = {
        "_create_default_inbound_rules",
        "_create_default_intracluster_inbound_rules",
        "_create_default_ssh_inbound_rules",
    }
    defs = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in wanted]
    if {d.name for d in defs} != wanted:
        raise ClusterConfigError(f"{source_path}: Ray's security group rule builders have changed")
    namespace: dict = {"itertools": itertools}
    exec(compile(ast.Module(body=defs, type_ignores=[]), str(source_path), "exec"), namespace)
    return namespace


def effective_ingress(config: dict) -> list[dict]:
    """The inbound rules Ray's AWS provider puts on the cluster's security group: its defaults + ours."""
    extra = config.get("provider", {}).get("security_group", {}).get("IpPermissions", [])
    return _ray_aws_rule_functions()["_create_default_inbound_rules"](["sg-cluster"], extra)


def world_open_rules(rules: list[dict]) -> list[dict]:
    def cidrs(rule: dict) -> set[str]:
        v4 = {r.get("CidrIp") for r in rule.get("IpRanges", [])}
        v6 = {r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])}
        return v4 | v6

    return [rule for rule in rules if cidrs(rule) & WORLD]


def check_workers(prepared: dict) -> list[str]:
    problems = []
    total = prepared["max_workers"]
    for name, node_type in prepared["available_node_types"].items():
        lo, hi = node_type.get("min_workers", 0), node_type.get("max_workers", 0)
        if lo > hi:
            problems.append(f"available_node_types.{name}: min_workers {lo} > max_workers {hi}")
        if hi > total:
            problems.append(f"available_node_types.{name}: max_workers {hi} > global max_workers {total}")
        gpus = node_type.get("resources", {}).get("GPU", 0)
        if gpus and not any(k.startswith("accelerator_type:") for k in node_type["resources"]):
            problems.append(f"available_node_types.{name}: GPU type without an accelerator_type resource")
        if "IamInstanceProfile" not in node_type.get("node_config", {}):
            problems.append(f"available_node_types.{name}.node_config: no IamInstanceProfile")
    return problems


def check_markets(prepared: dict) -> list[str]:
    """The head stays on-demand: a reclaimed head takes the Ray Train driver, DVC's run and MLflow with it."""
    head = prepared["head_node_type"]
    market = prepared["available_node_types"][head]["node_config"].get("InstanceMarketOptions", {})
    if market.get("MarketType") == "spot":
        return [f"available_node_types.{head}: the head must be on-demand (it holds the driver, DVC and MLflow)"]
    return []


def check_security(text: str, config: dict) -> list[str]:
    problems = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for pattern in CREDENTIAL_PATTERNS:
            if pattern.search(line):
                problems.append(f"line {lineno}: looks like a credential ({pattern.pattern}): {line.strip()}")
    for rule in world_open_rules(effective_ingress(config)):
        if not (rule.get("IpProtocol") == "tcp" and rule.get("FromPort") == 22 and rule.get("ToPort") == 22):
            problems.append(f"provider.security_group: rule open to the internet beyond SSH: {rule}")
    return problems


def all_commands(prepared: dict) -> list[str]:
    keys = ["initialization_commands", "head_setup_commands", "worker_setup_commands"]
    keys += ["head_start_ray_commands", "worker_start_ray_commands"]
    return [cmd for key in keys for cmd in prepared.get(key, [])]


def check_install(prepared: dict) -> list[str]:
    """Every node installs the pinned lock first, then the project with --no-deps."""
    problems = []
    for key in ("head_setup_commands", "worker_setup_commands"):
        cmds = prepared[key]
        lock = [i for i, c in enumerate(cmds) if "pip install" in c and f"-r {REMOTE_REPO}/requirements.lock" in c]
        project = [i for i, c in enumerate(cmds) if "pip install" in c and f"--no-deps -e {REMOTE_REPO}" in c]
        if not lock:
            problems.append(f"{key}: no `pip install -r {REMOTE_REPO}/requirements.lock`")
        if not project:
            problems.append(f"{key}: no `pip install --no-deps -e {REMOTE_REPO}`")
        if lock and project and lock[0] > project[0]:
            problems.append(f"{key}: the project is installed before requirements.lock")
    return problems


def referenced_repo_files(prepared: dict) -> list[str]:
    """Repository paths the node commands use (`~/transformer-wmt/<path>`)."""
    pattern = re.compile(re.escape(REMOTE_REPO) + r"/([\w./-]+)")
    return sorted({m for cmd in all_commands(prepared) for m in pattern.findall(cmd)})


def check_files(prepared: dict, repo: Path = REPO) -> list[str]:
    return [
        f"commands use {REMOTE_REPO}/{p}, which is not in the repository"
        for p in referenced_repo_files(prepared)
        if not (repo / p).exists()
    ]


def check(path: Path | str, allow_placeholders: bool = False) -> dict:
    """Everything above; raises ClusterConfigError listing every problem. Returns Ray's prepared config."""
    text, config = load_config(path)
    prepared = ray_validate(config)
    problems = check_workers(prepared) + check_markets(prepared) + check_security(text, config)
    problems += check_install(prepared)
    problems += check_files(prepared)
    if not allow_placeholders and PLACEHOLDER in text:
        problems.append(f"{path}: replace {PLACEHOLDER} with your bucket: sed -i 's/{PLACEHOLDER}/my-bucket/g' {path}")
    if problems:
        raise ClusterConfigError("\n".join(f"{path}: {p}" if not p.startswith(str(path)) else p for p in problems))
    return prepared


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="cluster.yaml")
    parser.add_argument("--allow-placeholders", action="store_true", help=f"accept {PLACEHOLDER} (CI)")
    args = parser.parse_args(argv)
    try:
        prepared = check(args.config, args.allow_placeholders)
    except ClusterConfigError as e:
        print(e, file=sys.stderr)
        return 1
    types = ", ".join(
        f"{k} {v.get('min_workers', 0)}..{v.get('max_workers', 0)}" for k, v in prepared["available_node_types"].items()
    )
    print(f"{args.config}: OK (Ray {_ray_version()} validation and project checks). Node types: {types}")
    return 0


def _ray_version() -> str:
    import ray

    return ray.__version__


if __name__ == "__main__":
    sys.exit(main())
