"""dvc.yaml knows each stage's code: a stage's `deps` list exactly the repository modules its command imports,
directly or not (tests/stage_closure.py walks them), so a change to any module reruns exactly the stages it
shapes. `test_e2e.py` shows the same with DVC itself (`dvc status` after a change).

On a mismatch, `python tests/stage_closure.py` prints the lists to paste into dvc.yaml."""

import ast
from pathlib import Path

import pytest
from stage_closure import PACKAGES, REPO, closure, declared_code, imported_names, module_file, relative, stage_commands

STAGES = ("download", "learn_bpe", "binarise", "train", "curve", "average", "decode", "score")


@pytest.mark.parametrize("stage", STAGES)
def test_stage_deps_are_exactly_the_modules_its_command_imports(stage):
    code = closure(stage_commands()[stage])
    declared = declared_code(stage)
    assert not code - declared, f"dvc.yaml: stage {stage} misses deps {relative(code - declared)}"
    assert not declared - code, f"dvc.yaml: stage {stage} lists {relative(declared - code)}, which it never imports"


def test_every_stage_is_checked():
    assert set(stage_commands()) == set(STAGES)


def code_of(stage: str) -> set[str]:
    return set(relative(closure(stage_commands()[stage])))


def test_closures_hold_only_what_shapes_the_outputs():
    """Beam search shapes no output of the train stage (greedy search does: the sample translations it logs to
    MLflow at each validation), so a change to it must not rerun training; the data stages load no model. The
    average stage does depend on beam search: it logs the averaged model to MLflow as a translator (pyfunc) with
    this code inside, so a new search makes a new logged model."""
    search = {"transformer/beam_search.py", "transformer/inference.py", "pipeline/common/translator.py"}
    assert not code_of("train") & search
    assert "transformer/search.py" in code_of("train")
    assert search <= code_of("decode") & code_of("curve") & code_of("average")
    for stage in ("download", "learn_bpe", "binarise", "score"):
        assert "transformer/model.py" not in code_of(stage), stage
    assert "pipeline/common/metrics.py" in code_of("score") & code_of("curve")


def test_closure_follows_imports_inside_functions_and_package_inits(tmp_path):
    """The walk sees what Python runs: `import a.b` runs `a/__init__.py` too, and an import inside a function
    counts (train.py imports transformer.corpus in one)."""
    assert REPO / "pipeline" / "__init__.py" in closure("pipeline.train")
    assert REPO / "transformer" / "corpus.py" in closure("pipeline.train")
    assert "transformer.corpus" in imported_names(REPO / "pipeline" / "train.py")


def all_modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the repository modules it imports by name (the implicit imports of package inits aside: ours
    hold only a docstring)."""
    modules = all_modules()
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in imported_names(path):
            file = module_file(imported)
            if file is not None and file.name != "__init__.py":
                targets.add(imported)
        graph[name] = targets - {name}
    return graph


def test_no_import_cycle_anywhere():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_package_inits_import_nothing():
    """So that importing one module of a package does not load, and make a stage depend on, the others."""
    for package in ("pipeline", "pipeline.common", "pipeline.commands", "transformer", "bench", "tools"):
        tree = ast.parse(module_file(package).read_text(encoding="utf-8"))
        assert not [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)], package


def test_no_module_of_pipeline_imports_a_stage():
    """Stages share code through `pipeline.common`, never through each other; commands use it too."""
    stages = set(stage_commands().values())
    for name, path in all_modules().items():
        if name.startswith("pipeline."):
            imported = {m for m in imported_names(path) if m in stages} - {name}
            assert not imported, f"{path.relative_to(REPO)} imports the stage(s) {sorted(imported)}"
