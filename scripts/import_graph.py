"""tomoe's module import graph, read with ``ast`` (nothing is imported): modules, edges, imports inside functions
and import cycles.

    python scripts/import_graph.py [--edges]

An edge A -> B means that importing A may execute B: B is named by an import statement of A, at module level or
inside a function (a function-level import runs when the function does, so it can close a cycle just as well), or B
is a package above a module A imports (importing ``tomoe.report.collect`` runs ``tomoe/report/__init__.py``).
Packages above A itself are left out, since they are already running when A is imported. Imports under
``if TYPE_CHECKING:`` are not executed and are not counted. ``tests/test_import_graph.py`` asserts that there are no
cycles and that the layers import downward only.
"""

from __future__ import annotations

import argparse
import ast
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "tomoe"


@dataclass
class ImportGraph:
    modules: list[str]
    edges: dict[str, set[str]] = field(default_factory=dict)  # importer -> modules it may execute
    function_level: list[tuple[str, str, int]] = field(default_factory=list)  # (importer, imported, line)
    function_level_statements: int = 0  # import statements inside functions, of any module (stdlib, torch, ...)

    @property
    def edge_count(self) -> int:
        return sum(len(targets) for targets in self.edges.values())


def module_names(package_dir: Path = PACKAGE_DIR) -> dict[str, Path]:
    """Dotted module name -> source file, for every ``.py`` file of the package."""
    root = package_dir.parent
    names = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _is_type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and isinstance(test, (ast.Name, ast.Attribute)) and ast.unparse(test).endswith("TYPE_CHECKING")


def _imports(tree: ast.Module):
    """(import node, inside a function?) for every executed import statement of a module."""
    stack = [(node, False) for node in tree.body]
    while stack:
        node, in_function = stack.pop()
        if _is_type_checking_block(node):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, in_function
        nested = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        stack.extend((child, nested) for child in ast.iter_child_nodes(node))


def _named_modules(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, known: set[str]) -> set[str]:
    """The package's modules an import statement names (``from P import m`` names the module P.m when there is one)."""
    if isinstance(node, ast.Import):
        candidates = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            anchor = importer.split(".")[: len(importer.split(".")) - node.level + (1 if is_package else 0)]
            base = ".".join(anchor + ([base] if base else []))
        candidates = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
    named = set()
    for name in candidates:
        while name and name not in known:  # `import tomoe.export.build.x` style names: their longest module prefix
            name = name.rpartition(".")[0]
        if name:
            named.add(name)
    return named


def build_graph(package_dir: Path = PACKAGE_DIR) -> ImportGraph:
    files = module_names(package_dir)
    known = set(files)
    graph = ImportGraph(modules=sorted(files), edges={name: set() for name in files})
    for importer, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        running = set(_ancestors(importer)) | {importer}
        for node, in_function in _imports(tree):
            graph.function_level_statements += in_function
            for named in _named_modules(node, importer, path.name == "__init__.py", known):
                targets = {named} | {package for package in _ancestors(named) if package in known} - running
                graph.edges[importer] |= targets - {importer}
                if in_function and named != importer:
                    graph.function_level.append((importer, named, node.lineno))
    return graph


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The graph's strongly connected components of more than one module (Tarjan), each sorted: every import cycle
    lies inside one of them."""
    index, low, on_stack, stack, components, counter = {}, {}, set(), [], [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return sorted(components)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edges", action="store_true", help="also list every edge and every function-level import")
    args = parser.parse_args()
    graph = build_graph()
    cycles = find_cycles(graph.edges)
    print(f"modules                {len(graph.modules)}")
    print(f"edges                  {graph.edge_count}")
    print(f"function-level imports {graph.function_level_statements} statements, {len(graph.function_level)} of tomoe modules")
    print(f"cycles                 {len(cycles)}")
    for cycle in cycles:
        print("  " + " <-> ".join(cycle))
    if args.edges:
        print("edges:")
        for importer in graph.modules:
            for target in sorted(graph.edges[importer]):
                print(f"  {importer} -> {target}")
        print("function-level imports:")
        for importer, named, line in sorted(graph.function_level):
            print(f"  {importer}:{line} -> {named}")


if __name__ == "__main__":
    main()
