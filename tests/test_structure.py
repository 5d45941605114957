"""The shape of the package: no import cycles, short functions, a small top floor."""
import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "kernelkit"
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in SRC.glob("*.py") if p.stem != "__main__"}


def _imports(tree: ast.Module) -> set[str]:
    """Package modules this one imports anywhere: top level, inside functions, under TYPE_CHECKING."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kernelkit."):
            found.add(node.module.split(".")[1])
    return found


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


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_inside_the_package():
    graph = {name: _imports(tree) - {"__init__"} for name, tree in _modules().items()}
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_metrics_and_decode_are_leaves_and_thresholds_sits_above_them():
    graph = {name: _imports(tree) for name, tree in _modules().items()}
    assert graph["metrics"] == set() and graph["decode"] == set()
    assert {"metrics", "decode"} <= graph["thresholds"]


def test_no_function_is_longer_than_60_lines():
    long = []
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {n} lines")
    assert not long, long


def test_the_old_top_floor_is_gone_and_the_new_one_is_small():
    assert not (SRC / "run.py").exists()
    for app in ("cli", "launch", "train_job", "infer_job"):
        assert len((SRC / f"{app}.py").read_text().splitlines()) < 250, app


def test_the_command_line_module_does_not_import_torch():
    import subprocess
    import sys
    code = ("import sys; sys.path.insert(0, %r); import kernelkit.cli; "
            "print('torch' in sys.modules)" % str(SRC.parent))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False", "options are checked before the slow imports"
