"""The project's own modules import only downwards: no cycle, every module imports on its own, and the rooms keep
their rules (RULES: what a room may never reach, directly or through another module).

The graph is read from the source (AST), so checking it imports nothing: module-level AND function-level
imports count (a function-level import is a cycle waiting for its first caller), `if TYPE_CHECKING:` blocks
do not (they never run).
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("tropd", "trainer", "services")
EXTRA_FILES = ("tests/helpers.py",)


def module_name(path_rel: Path) -> str:
    """`trainer/toy/tasks/__init__.py` -> `trainer.toy.tasks`; `trainer/losses.py` -> `trainer.losses`."""
    parts = list(path_rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the project's packages (and the shared test helpers), by dotted name."""
    files = [p for pkg in PACKAGES for p in sorted((root / pkg).rglob("*.py"))]
    files += [root / f for f in EXTRA_FILES]
    return {module_name(p.relative_to(root)): p for p in files}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(node: ast.AST, package: str) -> list[list[str]]:
    """What a tree imports, skipping TYPE_CHECKING blocks: each import as its candidate targets, most specific first.

    `from a import b` imports the module a.b if there is one, else the name b of a: candidates [a.b, a].
    Relative imports are resolved against `package`.
    """
    found: list[list[str]] = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.orelse:
                found += _imports(ast.Module(body=[stmt], type_ignores=[]), package)
            continue
        if isinstance(child, ast.Import):
            found += [[alias.name] for alias in child.names]
        elif isinstance(child, ast.ImportFrom):
            if child.level:
                parts = package.split(".")
                base = parts[: len(parts) - child.level + 1]
                stem = ".".join(base + ([child.module] if child.module else []))
            else:
                stem = child.module or ""
            found += [[f"{stem}.{alias.name}", stem] for alias in child.names]
        found += _imports(child, package)
    return found


def _ancestors(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports.

    Importing a.b.c also runs the packages a and a.b: those count too, except the importer's own packages
    (already running when it is imported). A name taken from a package (`from a import name`) is an edge to it.
    """
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for candidates in _imports(ast.parse(path.read_text(), str(path)), package):
            target = next((c for c in candidates if c in modules), None)
            if target is None:
                continue
            edges |= {target} | ((_ancestors(target) & modules.keys()) - _ancestors(name))
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, white/grey/black)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


LOOP = tuple(
    f"trainer.{m}"
    for m in ("config", "train", "pipeline", "methods", "losses", "student", "teacher_link", "evaluation", "parallel",
              "models", "checkpoint", "rundir", "runlog", "plot")
)  # fmt: skip
LOOP_TOP = ("trainer.train", "trainer.pipeline", "trainer.evaluation", "trainer.student", "trainer.teacher_link")
COMMANDS = ("tropd.cli", "trainer.cli", "services.teacher.cli")
BENCHES = ("trainer.bench", "services.teacher.bench")

# (a room: module names or packages, what it may never reach, why)
RULES = [
    (LOOP, ("trainer.toy", "trainer.run", *BENCHES, *COMMANDS), "the loop takes its prompts from a source it is given"),
    (("trainer.rollout",), ("trainer.data", "trainer.toy", "trainer.run", *LOOP_TOP, *BENCHES, *COMMANDS),
     "the rollout engines sample a model; they know no source and no loop"),
    (("trainer.data",), ("trainer.rollout", "trainer.toy", "trainer.run", *LOOP_TOP, *BENCHES, *COMMANDS),
     "the data room gives prompts; the toy world implements its protocol, one level up"),
    (("trainer.toy",), ("trainer.run", *LOOP_TOP, *BENCHES, *COMMANDS), "the toy world is one source, below the loop"),
    (("trainer.run",), (*BENCHES, *COMMANDS), "a run is assembled below the commands and the benchmarks"),
    (BENCHES, COMMANDS, "the benchmarks sit below the commands that start them"),
    (("services",), ("trainer",), "the service knows nothing of training"),
    (("services.teacher.engines",),
     ("services.teacher.app", "services.teacher.batching", "services.teacher.launch", *BENCHES, *COMMANDS),
     "an engine knows nothing of the service around it"),
    (("services.teacher.protocol", "services.teacher.client"),
     ("services.teacher.app", "services.teacher.engines", "services.teacher.batching"),
     "the trainer's client imports no web framework and no engine"),
]  # fmt: skip


def _in(name: str, room: tuple[str, ...]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in room)


def reach(graph: dict[str, set[str]], start: str) -> dict[str, str]:
    """Every module `start` imports, directly or not: module -> the module it was first reached through."""
    seen: dict[str, str] = {}
    todo = [(start, n) for n in sorted(graph.get(start, ()))]
    while todo:
        via, node = todo.pop()
        if node in seen:
            continue
        seen[node] = via
        todo += [(node, n) for n in sorted(graph.get(node, ())) if n not in seen]
    return seen


def broken_rules(graph: dict[str, set[str]]) -> list[str]:
    broken = []
    for room, never, why in RULES:
        for name in sorted(n for n in graph if _in(n, room)):
            for target, via in reach(graph, name).items():
                if _in(target, never) and not _in(target, room):
                    how = "directly" if via == name else f"through {via}"
                    broken.append(f"{name} reaches {target} ({how}): {why}")
    return sorted(broken)


def test_rule_checker_finds_a_planted_breach():
    graph = {"trainer.train": {"trainer.data.files"}, "trainer.data.files": {"trainer.toy.source"},
             "trainer.toy.source": set()}  # fmt: skip
    assert broken_rules(graph) == [
        "trainer.data.files reaches trainer.toy.source (directly): the data room gives prompts; "
        "the toy world implements its protocol, one level up",
        "trainer.train reaches trainer.toy.source (through trainer.data.files): the loop takes its prompts from a "
        "source it is given",
    ]


def test_the_rooms_keep_their_import_rules():
    graph = import_graph(project_modules())
    for room, _, _ in RULES:
        assert any(_in(n, room) for n in graph), f"no module in {room}: update RULES to the tree"
    assert broken_rules(graph) == []


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_graph_reads_function_level_imports_and_skips_type_checking(tmp_path):
    pkg = tmp_path / "tropd"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from tropd import c\ndef f():\n    from . import b\n"
    )
    (pkg / "b.py").write_text("import tropd.a\n")
    (pkg / "c.py").write_text("")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "helpers.py").write_text("")
    graph = import_graph(project_modules(tmp_path))
    assert graph["tropd.a"] == {"tropd.b"}
    assert find_cycle(graph) == ["tropd.a", "tropd.b", "tropd.a"]


def test_no_import_cycle():
    graph = import_graph(project_modules())
    assert len(graph) > 50, "the project's modules were not found"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


MODULES = sorted(n for n in project_modules() if not n.endswith(".__main__"))  # __main__: scripts
# third-party libraries imported once before the fork (the time a fresh interpreter spends on most modules)
PRELOADED = ("numpy", "torch", "transformers", "safetensors", "httpx", "pydantic", "fastapi", "yaml")
IMPORT_EACH_ALONE = r"""
import importlib, json, os, sys, traceback
for lib in sys.argv[2:]:
    try:
        importlib.import_module(lib)
    except ImportError:
        pass
assert not {m.split(".")[0] for m in sys.modules} & {"tropd", "trainer", "services", "tests"}, "a project module"
results = {}
for name in json.loads(sys.argv[1]):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child imports one module into an interpreter that holds no project module, then exits
        os.close(read)
        try:
            importlib.import_module(name)
            message = b""
        except BaseException:
            message = (traceback.format_exc() or "failed").encode()[-4000:]
        os.write(write, message)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        message = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    results[name] = message or ("" if status == 0 else f"the child exited with status {status}")
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def imported_alone() -> dict[str, str]:
    """Each module imported by a child forked from one interpreter that holds the third-party libraries and no
    project module: the error text per module ("" when it imported)."""
    import json

    proc = subprocess.run([sys.executable, "-c", IMPORT_EACH_ALONE, json.dumps(MODULES), *PRELOADED], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("name", MODULES)
def test_module_imports_alone(name, imported_alone):
    """Each module imports on its own, with no project module imported before it (no order of earlier imports
    hides a cycle or a missing import)."""
    assert imported_alone[name] == "", imported_alone[name]


@pytest.mark.slow
def test_tests_import_their_helpers_however_pytest_is_started(tmp_path):
    """`pytest` (not only `python -m pytest`), from another directory: the test files still import `tests.helpers`."""
    pytest_bin = Path(sys.executable).with_name("pytest")
    proc = subprocess.run(
        [str(pytest_bin), str(ROOT / "tests" / "test_parallel.py"), "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "collected" in proc.stdout and "error" not in proc.stdout.lower()
