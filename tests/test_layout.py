"""The house's layout (docs/layout.md), read from the source alone: no import circle among the project's modules
(imports inside functions count: a lazy import is still a dependency), training code never reaches the analysis,
and each function fits a screen (tests/test_mutation_list.py checks the mutation audit's entries still apply)."""
import ast
import os

from conftest import ROOT

FUNCTION_LINES, CLASS_LINES = 60, 150


def sources():
    """{module name: its file} of every .py of ours outside tests/ (data/__init__.py is `data`)."""
    out = {}
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in ("tests", "__pycache__"))
        for f in files:
            if f.endswith(".py"):
                parts = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].split(os.sep)
                out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = os.path.join(folder, f)
    return out


def imported(tree, name, modules):
    """The project's modules that module `name` imports anywhere in its file (`from data import shards` is
    data.shards, `from data import build_data` is data)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{name}: a relative import; name the module whole (this walk reads none)"
            base = node.module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:  # import a.b.c: the deepest of ours
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def graph():
    modules = sources()
    return {name: imported(ast.parse(open(path).read()), name, modules) for name, path in modules.items()}


def circles(edges):
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_project_has_no_import_circle():
    edges = graph()
    assert {"train", "data", "data.shards", "data.folder", "runformat"} <= set(edges)  # the walk saw them
    assert "data.shards" in edges["data.folder"] and "rundir" in edges["data.prepare"]  # and read their imports
    assert circles(edges) == []


def test_the_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_training_code_never_reaches_the_analysis():
    """train.py and everything it imports, directly or not: the analysis is above them (costs.py once imported
    analysis.runs for method names)."""
    edges, seen, todo = graph(), set(), ["train"]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += edges[m]
    assert {"options", "resume", "precision", "flops", "costs", "runformat"} <= seen
    assert sorted(m for m in seen if m.split(".")[0] in ("analysis", "benchmarks")) == []


def test_every_function_fits_a_screen_and_every_class_two():
    too_long = []
    for name, path in sources().items():
        rel = os.path.relpath(path, ROOT)
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                lines = node.end_lineno - node.lineno + 1
                limit = CLASS_LINES if isinstance(node, ast.ClassDef) else FUNCTION_LINES
                if lines > limit:
                    too_long.append(f"{rel}:{node.name} ({lines} lines)")
    assert too_long == []

