"""The repository modules each DVC stage's command runs: the import closure of `python -m pipeline.<stage>`,
walked in the AST (every import statement, also those inside functions), package `__init__` files included
(Python runs them on the way to a module). `tests/test_stage_deps.py` holds `dvc.yaml` to it.

    python tests/stage_closure.py      # each stage's deps as dvc.yaml should list them
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "transformer", "bench", "tools")


def module_file(name: str) -> Path | None:
    """The repository file of module `name` (a package's `__init__.py`), or None outside the repository."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = REPO.joinpath(*name.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def imported_names(path: Path) -> set[str]:
    """Every module an import statement of `path` may load: `from a.b import c` names `a.b` and `a.b.c` (c may
    be a submodule); relative imports resolved against the file's package."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return found


def with_packages(name: str) -> list[str]:
    """`a.b.c` and the packages Python imports first: `a`, `a.b`."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def closure(module: str) -> set[Path]:
    """The repository files that `python -m <module>` executes."""
    todo, seen = [module], set()
    files: set[Path] = set()
    while todo:
        name = todo.pop()
        for part in with_packages(name):
            if part in seen:
                continue
            seen.add(part)
            path = module_file(part)
            if path is not None:
                files.add(path)
                todo.extend(imported_names(path))
    return files


def stage_commands() -> dict[str, str]:
    """Each dvc.yaml stage's module (`python -m pipeline.<name>`)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    modules = {}
    for stage, spec in stages.items():
        found = re.findall(r"python -m ([\w.]+)", spec["cmd"])
        assert len(found) == 1, f"dvc.yaml: stage {stage} should run one `python -m` module, found {found}"
        modules[stage] = found[0]
    return modules


def declared_code(stage: str) -> set[Path]:
    """The Python files among a stage's `deps` in dvc.yaml."""
    deps = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"][stage].get("deps", [])
    return {REPO / d for d in deps if d.endswith(".py")}


def relative(paths: set[Path]) -> list[str]:
    return sorted(str(p.relative_to(REPO)) for p in paths)


if __name__ == "__main__":
    for stage, module in stage_commands().items():
        print(f"{stage}:")
        for path in relative(closure(module)):
            print(f"      - {path}")
