"""`transformer/` is a library of torch, numpy and the standard library: importing every module of it pulls in
none of the pipeline's heavy or optional dependencies. (Stage deps and import cycles: test_stage_deps.py.)"""

import subprocess
import sys
from pathlib import Path

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


def test_modules_that_locate_the_repository_find_it():
    """pyfunc ships pipeline/ and transformer/ as the MLflow model's code; tracking falls back to the repository
    for DVC's root: a module moved one folder deeper must not point one level short."""
    from pipeline.common import pyfunc, tracking

    for module in (pyfunc, tracking):
        assert (module.REPO / "dvc.yaml").is_file() and (module.REPO / "pipeline" / "common").is_dir(), module
