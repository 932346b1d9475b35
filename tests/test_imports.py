"""The pipeline's import graph: no cycles, and every stage's DVC deps cover what it imports.

The graph is read from the source (function-level imports count), so a stage's deps in
dvc.yaml cannot drift from its code: editing any module a stage imports must rerun it.
"""

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pipeline"


def module_file(name: str) -> Path | None:
    """The file of module `name` (pipeline.x.y), or None when it is not one of ours."""
    path = ROOT.joinpath(*name.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


def imported_modules(path: Path) -> set[str]:
    """The pipeline modules a file imports anywhere, with the packages whose __init__ runs
    first (`from pipeline.store import x` runs pipeline/__init__ and pipeline/store/__init__;
    `from pipeline.data import glyphs` imports the module pipeline.data.glyphs)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names
                         if module_file(f"{node.module}.{alias.name}"))
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    with_parents = set()
    for name in names:
        if name == "pipeline" or name.startswith("pipeline."):
            parts = name.split(".")
            with_parents.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {name for name in with_parents if module_file(name)}


def import_graph() -> dict[str, set[str]]:
    """module -> the pipeline modules it imports anywhere in its source."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        graph[name] = {target for target in imported_modules(path)
                       if target != name and not name.startswith(target + ".")
                       and target != "pipeline"}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}  # "open" while on the DFS stack, then "done"

    def visit(node, path):
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return path + [node, target]
            if target not in state and (cycle := visit(target, path + [node])):
                return cycle
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [])):
            return cycle
    return None


def test_the_import_graph_is_acyclic():
    graph = import_graph()
    assert "pipeline.train.checkpoints" in graph["pipeline.train.evaluate"]
    assert "pipeline.train.runs" not in graph["pipeline.train.evaluate"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def import_closure(script: Path) -> set[Path]:
    """Every file of the package that running `script` can execute, docstring-only package
    files left out (they cannot change a result)."""
    seen, todo = set(), list(imported_modules(script))
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(imported_modules(module_file(name)))
    files = {module_file(name) for name in seen}
    return {path for path in files if not _docstring_only(path)}


def _docstring_only(path: Path) -> bool:
    body = ast.parse(path.read_text(encoding="utf-8")).body
    return all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
               for node in body)


def code_deps_problems(stages: dict) -> list[str]:
    """One line per stage whose code deps miss a file its script imports, or list a
    pipeline path none of its imports lies in (a dep that reruns it for nothing)."""
    problems = []
    for name, stage in stages.items():
        stage = stage.get("do", stage)  # foreach stages
        script = next(word for word in stage["cmd"].split() if word.startswith("stages/"))
        deps = [ROOT / dep for dep in stage["deps"] if isinstance(dep, str)]
        closure = import_closure(ROOT / script) | {ROOT / script}
        for path in sorted(closure):
            if not any(path == dep or dep in path.parents for dep in deps):
                problems.append(f"{name}: imports {path.relative_to(ROOT)}, not in its deps")
        for dep in deps:
            if dep.relative_to(ROOT).parts[0] in ("pipeline", "stages") and not any(
                    path == dep or dep in path.parents for path in closure):
                problems.append(f"{name}: depends on {dep.relative_to(ROOT)}, never imported")
    return problems


def dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def test_every_stage_depends_on_exactly_the_code_it_imports():
    assert code_deps_problems(dvc_stages()) == []


@pytest.mark.parametrize("stage, dep", [("train_student", "pipeline/stream"),
                                        ("dump_logits", "pipeline/store"),
                                        ("prepare", "pipeline/data")])
def test_a_missing_dep_is_named(stage, dep):
    stages = dvc_stages()
    entry = stages[stage].get("do", stages[stage])
    entry["deps"] = [d for d in entry["deps"] if d != dep]
    problems = code_deps_problems({stage: stages[stage]})
    assert problems and all(p.startswith(f"{stage}: imports {dep}/") for p in problems)


def test_a_dep_never_imported_is_named():
    stages = dvc_stages()
    stages["figures"]["deps"].append("pipeline/store")
    assert code_deps_problems({"figures": stages["figures"]}) == [
        "figures: depends on pipeline/store, never imported"]
