"""The package's imports go one way: entry points -> build -> (data, model, callbacks) ->
artefacts, with schema.py the config vocabulary that model/ may import too. Imports made inside
functions count too, since that is where a cycle hides."""

import ast
from pathlib import Path

import cifar_lightning

PACKAGE = Path(cifar_lightning.__file__).parent
SCRIPTS = PACKAGE.parent / "scripts"
BENCHMARKS = PACKAGE.parent / "benchmarks"
ENTRY_POINTS = {
    "train",
    "evaluate",
    "predict",
    "prepare",
    "export",
    "lr_find",
    "report_cli",
    "notebook",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path, known: set[str]) -> set[str]:
    """Every cifar_lightning module that `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from cifar_lightning import train` imports the module cifar_lightning.train
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        else:
            continue
        found |= {n for n in names if n in known}
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(paths)
    # a package's __init__ is imported with any of its modules, and ours are empty
    return {m: project_imports(p, known) - {"cifar_lightning"} - {m} for m, p in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search with a path stack)."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_find_cycle_sees_a_cycle_through_three_modules():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_project_imports_count_imports_inside_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from cifar_lightning.schema import compose\n")
    assert project_imports(source, {"cifar_lightning.schema"}) == {"cifar_lightning.schema"}


def test_the_package_has_no_import_cycles():
    assert find_cycle(import_graph()) is None


def test_data_and_model_do_not_import_policy():
    # how a run is put together (build, train) is policy; the schema's key names are not
    policy = {"cifar_lightning.train", "cifar_lightning.build"}
    graph = import_graph()
    wrong = {
        f"{m} imports {n}"
        for m, names in graph.items()
        if m.startswith(("cifar_lightning.data", "cifar_lightning.model"))
        for n in names & policy
    }
    assert not wrong
    assert not graph["cifar_lightning.schema"] & policy
    # the Classifier and the checkpoint reader take their hyperparameters in the schema's terms
    for m in ("cifar_lightning.model.module", "cifar_lightning.model.checkpoint"):
        assert "cifar_lightning.schema" in graph[m]


def test_entry_points_are_leaves():
    """No module, script or benchmark imports an entry point: what several share lives in
    build.py, inference.py and cli.py, so changing one command can't change another's
    behaviour."""
    entries = {f"cifar_lightning.{e}" for e in ENTRY_POINTS}
    assert all((PACKAGE / f"{e}.py").is_file() for e in ENTRY_POINTS)
    known = set(import_graph()) | entries
    found = {
        f"{p.name} imports {n}"
        for p in [*PACKAGE.rglob("*.py"), *SCRIPTS.glob("*.py"), *BENCHMARKS.glob("*.py")]
        for n in project_imports(p, known) & entries
    }
    assert not found


def test_every_entry_point_has_a_console_script():
    import tomllib

    scripts = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]["scripts"]
    targets = {v for v in scripts.values()}
    for e in ENTRY_POINTS - {"notebook"}:
        assert f"cifar_lightning.{e}:main" in targets
