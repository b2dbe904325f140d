"""Rules of the package layout (docs/architecture.md), checked on the source: no import cycles, even
through imports inside functions, and no code outside ds_moekd/methods deciding on a method's name."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO

PACKAGES = {"ds_moekd": REPO / "ds_moekd", "ds_moekd.kernels": REPO / "kernels" / "ds_moekd_kernels"}


def _modules() -> dict[str, Path]:
    found = {}
    for package, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that can run: module level or inside functions, but not under
    `if TYPE_CHECKING:` (annotations only)."""
    typing_only = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom) and id(n) not in typing_only]


def import_graph() -> dict[str, set[str]]:
    """module → the project modules its imports execute. Importing `a.b.c` from outside package `a.b`
    also runs `a.b`'s __init__, so that is an edge too."""
    modules = _modules()

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets = []
        for node in _runtime_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets += [alias.name for alias in node.names]
                continue
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets += [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        edges = set()
        for target in filter(None, map(owner, targets)):
            parts = target.split(".")
            ancestors = {".".join(parts[:i]) for i in range(2, len(parts))}
            edges |= {target} | {a for a in ancestors if a in modules and not module.startswith(a + ".")}
        graph[module] = edges - {module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_sees_imports_inside_functions_and_skips_type_checking_blocks(tmp_path):
    tree = ast.parse("import x\nif TYPE_CHECKING:\n    import y\ndef f():\n    from z import w\n")
    assert [ast.unparse(n) for n in _runtime_imports(tree)] == ["import x", "from z import w"]


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 100  # the whole package was read
    assert cycles(graph) == []


def _compares_a_method_name(node: ast.AST) -> bool:
    """`<...>.method == "kd"`, `method in ("kd", "sft")`, `cfg.method != "sft"`: deciding on a name."""
    if not isinstance(node, ast.Compare):
        return False
    operands = [node.left, *node.comparators]

    def is_method(expr):
        return (isinstance(expr, ast.Attribute) and expr.attr == "method") or (
            isinstance(expr, ast.Name) and expr.id == "method")

    def is_name_literal(expr):
        return (isinstance(expr, ast.Constant) and isinstance(expr.value, str)) or (
            isinstance(expr, ast.Tuple | ast.List | ast.Set) and all(isinstance(e, ast.Constant) for e in expr.elts))

    return any(map(is_method, operands)) and any(map(is_name_literal, operands))


def test_only_the_methods_package_decides_on_a_method_name():
    offenders = []
    for module, path in _modules().items():
        if module.startswith("ds_moekd.methods"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if _compares_a_method_name(node):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
    assert offenders == []
    assert _compares_a_method_name(ast.parse('cfg.method in ("sft", "kd")').body[0].value)
    assert not _compares_a_method_name(ast.parse('cfg.name == "kd"').body[0].value)


def test_every_package_is_listed_for_installation():
    """pyproject.toml lists the packages one by one (ds_moekd.kernels lives elsewhere): a subpackage
    missing there is absent from a regular install."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {module for module, path in _modules().items() if path.name == "__init__.py"}
    assert found == listed


def test_no_test_file_imports_another():
    """Shared test code lives in tests/helpers/; a test module is never a library for another."""
    offenders = []
    for path in (REPO / "tests").rglob("test_*.py"):
        for node in _runtime_imports(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            offenders += [f"{path.relative_to(REPO)}: {name}" for name in names if name.split(".")[-1].startswith("test_")]
    assert offenders == []
