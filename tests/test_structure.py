"""The shape of the package: stage packages that import only downwards, no import cycles, short
functions, a small top floor. Every module is found by walking src/ recursively, by dotted name."""
import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "kernelkit"
MAX_FUNCTION_LINES = 60
# Bottom-up: a package may import from its own level or any level below, never above.
LEVELS = ("core", "inputs", "data", "model", "decide", "engine", "build", "app")


def _dotted(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    """Every module under src/kernelkit, at any depth, by dotted name."""
    return {_dotted(p): ast.parse(p.read_text(), str(p)) for p in sorted(SRC.rglob("*.py")) if p.stem != "__main__"}


def _package_of(name: str, is_package: bool) -> str:
    return name if is_package else name.rpartition(".")[0]


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> set[str]:
    """The kernelkit modules an ImportFrom names, as dotted names (`from ..core import env` names
    kernelkit.core.env; `from .x import y` names the module x)."""
    if node.level == 0:
        base = node.module or ""
        if not base.startswith("kernelkit"):
            return set()
    else:
        parts = _package_of(importer, is_package).split(".")
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
    return {base} | {f"{base}.{a.name}" for a in node.names}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    packages = {_dotted(p) for p in SRC.rglob("__init__.py")}
    graph = {}
    for name, tree in mods.items():
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                found |= _resolve(name, name in packages, node)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("kernelkit.")}
        graph[name] = {m for m in found if m in mods and m not in packages and m != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def _level(module: str) -> int:
    parts = module.split(".")
    return LEVELS.index(parts[1]) if len(parts) > 2 else -1


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_every_module_is_found_at_any_depth():
    names = set(_modules())
    on_disk = {p for p in SRC.rglob("*.py") if p.stem != "__main__"}
    assert len(names) == len(on_disk)
    assert "kernelkit.engine.trainer" in names and "kernelkit.core.config" in names


def test_every_module_lives_in_a_stage_package_with_a_docstring():
    loose = [p.name for p in SRC.glob("*.py") if p.stem not in ("__init__", "__main__")]
    assert not loose, f"modules outside the stage packages: {loose}"
    assert sorted(p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()) == sorted(LEVELS)
    for level in LEVELS:
        doc = ast.get_docstring(ast.parse((SRC / level / "__init__.py").read_text()))
        assert doc and len(doc) > 100, f"{level}/__init__.py says what it owns and what it may import"


def test_the_import_graph_resolves_relative_imports():
    graph = _graph()
    assert "kernelkit.core.config" in graph["kernelkit.core.context"]
    assert "kernelkit.engine.evaluate" in graph["kernelkit.engine.trainer"]
    assert "kernelkit.app.launch" in graph["kernelkit.app.cli"]


def test_no_import_cycle_inside_the_package():
    graph = _graph()
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_a_package_imports_only_from_its_own_level_or_below():
    upward = [f"{m} -> {n}" for m, deps in _graph().items() for n in deps if _level(n) > _level(m)]
    assert not upward, upward


def test_the_level_check_catches_an_upward_import():
    assert _level("kernelkit.app.cli") > _level("kernelkit.core.config")
    assert _level("kernelkit.engine.trainer") > _level("kernelkit.decide.metrics")


def test_metrics_and_labels_are_leaves_and_thresholds_sits_above_them():
    graph = _graph()
    assert graph["kernelkit.decide.metrics"] == set() and graph["kernelkit.decide.labels"] == set()
    assert {"kernelkit.decide.metrics", "kernelkit.decide.labels"} <= graph["kernelkit.decide.thresholds"]


def test_no_function_is_longer_than_60_lines():
    long = []
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {n} lines")
    assert not long, long


def test_the_top_floor_is_small():
    for app in ("cli", "launch", "train_job", "infer_job"):
        assert len((SRC / "app" / f"{app}.py").read_text().splitlines()) < 250, app


def test_no_comment_points_outside_the_project():
    outside = []
    for path in SRC.rglob("*.py"):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if "../shared" in line or "seeds/" in line or "DEVELOPERS" in line:
                outside.append(f"{path.relative_to(SRC)}:{i}")
    assert not outside, outside


def test_the_command_line_module_does_not_import_torch():
    code = ("import sys; sys.path.insert(0, %r); import kernelkit.app.cli; "
            "print('torch' in sys.modules)" % str(SRC.parent))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False", "options are checked before the slow imports"
