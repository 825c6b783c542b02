"""Checks the import direction of jaxdml: no import circle, no import up the layers.

  python scripts/check_imports.py        # prints the graph's problems; exit 1 if any

Every `import jaxdml...` / `from jaxdml... import` in jaxdml/ counts, also those inside
functions (a deferred import still ties two modules). LAYERS below is the house of
docs/architecture.md from the top floor down; a module may import its own floor or lower.
"""

from __future__ import annotations

import ast
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Floors, top first. A module is placed by the longest prefix that names it.
LAYERS = [
    ["jaxdml.__init__", "jaxdml.commands"],
    [
        "jaxdml.launch",
        "jaxdml.standby",
        "jaxdml.chaos",
        "jaxdml.chaos_random",
        "jaxdml.chaos_report",
        "jaxdml.export",
    ],
    ["jaxdml.training.trainer"],
    ["jaxdml.supervisor", "jaxdml.training.loop"],
    ["jaxdml.training.step", "jaxdml.training.tree_step", "jaxdml.training.optimizers"],
    ["jaxdml.training.step_common", "jaxdml.accounting", "jaxdml.liveness"],
    ["jaxdml.training.tiers"],
    ["jaxdml.memory_tier"],
    [
        "jaxdml.training.state",
        "jaxdml.training.hooks",
        "jaxdml.checkpoint",
        "jaxdml.training.rows",
        "jaxdml.training.progress",
    ],
    ["jaxdml.distributed", "jaxdml.pulse", "jaxdml.plots", "jaxdml.goodput"],
    ["jaxdml.data", "jaxdml.batcher", "jaxdml.cli", "jaxdml.tables", "jaxdml.configs"],
    ["jaxdml.config", "jaxdml.metrics"],
    ["jaxdml.models", "jaxdml.faults", "jaxdml.mesh", "jaxdml.mapped", "jaxdml.training.__init__"],
    ["jaxdml.constants"],
]


def module_name(path: str) -> str:
    rel = os.path.relpath(path, REPO)[: -len(".py")]
    return rel.replace(os.sep, ".")


def floor(module: str) -> int:
    """The floor of `module` (0 = top), by the longest matching prefix in LAYERS."""
    best, best_len = None, -1
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best_len:
                best, best_len = i, len(name)
    if best is None:
        raise SystemExit(f"{module} is in no layer: add it to LAYERS in {__file__}")
    return best


def imports_of(path: str, module: str) -> set[str]:
    """The jaxdml modules `path` imports (a package import names its __init__)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from jaxdml import mesh` ties to jaxdml.mesh, not to the package's __init__.
            subs = [f"{node.module}.{a.name}" for a in node.names]
            names = [n for n in subs if _resolve(n)] or [node.module]
        else:
            continue
        found.update(n for n in names if n == "jaxdml" or n.startswith("jaxdml."))
    return {_resolve(n) for n in found} - {None, module}


_MODULES: set[str] = set()


def _resolve(name: str) -> str | None:
    """An imported name -> the module file it loads (a package -> its __init__)."""
    if name in _MODULES:
        return name
    if f"{name}.__init__" in _MODULES:
        return f"{name}.__init__"
    return None  # a function or class imported from a module: the module counts already


def graph() -> dict[str, set[str]]:
    paths = []
    for root, _, files in os.walk(os.path.join(REPO, "jaxdml")):
        paths += [os.path.join(root, f) for f in files if f.endswith(".py")]
    _MODULES.update(module_name(p) for p in paths)  # before reading imports: _resolve uses it
    return {module_name(p): imports_of(p, module_name(p)) for p in paths}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def problems() -> list[str]:
    """Every circle and every upward import, as lines."""
    edges = graph()
    found = [f"circle: {' <-> '.join(c)}" for c in circles(edges)]
    for src, targets in sorted(edges.items()):
        for dst in sorted(targets):
            if floor(dst) < floor(src):
                found.append(
                    f"upward: {src} (floor {floor(src)}) imports {dst} (floor {floor(dst)})"
                )
    return found


def main() -> int:
    found = problems()
    print("\n".join(found) if found else "imports: no circle, none upward")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
