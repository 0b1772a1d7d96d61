"""`transformer/` is a library of torch, numpy and the standard library: importing every module of it pulls in
none of the pipeline's heavy or optional dependencies."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = ("ray", "mlflow", "dvc", "yaml", "transformers", "pydantic", "hydra", "omegaconf", "datasets")

PROGRAM = f"""
import importlib, pkgutil, sys
import transformer
for info in pkgutil.walk_packages(transformer.__path__, "transformer."):
    importlib.import_module(info.name)
print(sorted({{m.split(".")[0] for m in sys.modules}} & set({FORBIDDEN!r})))
"""


def test_transformer_package_imports_no_pipeline_dependency():
    out = subprocess.run([sys.executable, "-c", PROGRAM], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"transformer/ imported {out.stdout.strip()}"


def stage_modules() -> set[str]:
    """The pipeline modules dvc.yaml runs as stages (`python -m pipeline.<name>`)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    return {m for stage in stages.values() for m in re.findall(r"-m (pipeline\.\w+)", stage["cmd"])}


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def test_stage_modules_do_not_import_each_other():
    stages = stage_modules()
    assert {"pipeline.train", "pipeline.curve", "pipeline.average", "pipeline.decode"} <= stages
    for stage in sorted(stages):
        others = imported_modules(REPO / (stage.replace(".", "/") + ".py")) & (stages - {stage})
        assert not others, f"{stage} imports the stage(s) {sorted(others)}: move what they share to a shared module"
