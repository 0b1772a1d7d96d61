"""For the tests that run the DAG with DVC (test_e2e, test_sweep): a git copy of this checkout, the environment
DVC's stages need, and the smoke preset shrunk to a few updates."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("download", "learn_bpe", "binarise", "train", "curve", "average", "decode", "score")
# The smoke preset with fewer updates: the wiring in about a minute (`make demo` runs the preset itself).
SMALL = ["-S", "preset=smoke", "-S", "train.max_updates=60", "-S", "train.checkpoint_every_updates=20"]
SMALL += ["-S", "train.validate_every_updates=20", "-S", "train.warmup=20"]


# The checkout's own pipeline results (after `make demo`), left out of a copy so that it starts from scratch.
RESULTS = ("dvc.lock", "metrics/", "plots/")


def copy_repository(dest: Path) -> None:
    """A git repository holding this checkout's files as they are now (tracked and new, not ignored), without
    its pipeline results."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        if (REPO / name).is_file() and not name.startswith(RESULTS):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    git = ["git", "-c", "user.name=e2e", "-c", "user.email=e2e@localhost"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "e2e copy"], cwd=dest, check=True)


def dvc_env() -> dict[str, str]:
    """This environment without MLflow and DVC settings, this venv's `python` first (the stages' commands)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env |= {"DVC_NO_ANALYTICS": "1", "HF_DATASETS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env |= {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}  # as tests/test_train_stage.py's FAST_POLL says
    return env


def run(repo: Path, env: dict[str, str], *cmd: str, timeout: float = 600) -> str:
    """Run `cmd` in `repo`; its output (stdout then stderr), or a failed assertion showing both."""
    out = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out.stdout + out.stderr


def ran(log: str) -> list[str]:
    """The stages DVC ran (not those it skipped or restored from its run-cache), in order."""
    return [s for s in STAGES if f"Running stage '{s}'" in log]
