"""The house rules of docs/architecture.md, checked on the code itself."""

import ast
import importlib.util
import os

from tests.conftest import REPO


def _check_imports():
    path = os.path.join(REPO, "scripts", "check_imports.py")
    spec = importlib.util.spec_from_file_location("check_imports", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_import_circle_and_no_import_up_the_layers():
    assert _check_imports().problems() == []


def test_the_import_checker_sees_circles_and_upward_imports():
    check = _check_imports()
    assert check.circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert check.circles({"a": {"b"}, "b": set()}) == []
    assert check.floor("jaxdml.training.trainer") < check.floor("jaxdml.models.linear")
    assert check.floor("jaxdml.models.linear") < check.floor("jaxdml.constants")


def _attributes_assigned(path: str, class_name: str) -> dict[str, set[str]]:
    """{method: the self.X attributes it assigns} for one class."""
    with open(path) as f:
        tree = ast.parse(f.read())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    out = {}
    for method in (n for n in cls.body if isinstance(n, ast.FunctionDef)):
        out[method.name] = {
            leaf.attr
            for leaf in ast.walk(method)
            if isinstance(leaf, ast.Attribute)
            and isinstance(leaf.value, ast.Name)
            and leaf.value.id == "self"
            and isinstance(leaf.ctx, ast.Store)
        }
    return out


def test_the_supervisor_creates_its_attributes_in_init_only():
    assigned = _attributes_assigned(os.path.join(REPO, "jaxdml", "supervisor.py"), "Supervisor")
    created_in_init = assigned.pop("__init__")
    later = set().union(*assigned.values())
    assert later <= created_in_init, later - created_in_init
    assert "recoveries" in later  # the check sees assignments in methods


def test_the_supervisor_uses_only_the_recovery_interface():
    """Every `target.X` the supervisor touches is a member of the Recoverable protocol."""
    path = os.path.join(REPO, "jaxdml", "supervisor.py")
    with open(path) as f:
        tree = ast.parse(f.read())
    protocol = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Recoverable")
    verbs = {n.name for n in protocol.body if isinstance(n, ast.FunctionDef)}
    used = {
        n.attr
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "target"
    }
    assert used and used <= verbs, used - verbs


def test_no_python_file_over_600_lines():
    """A file that long is several topics in one: split it into modules."""
    long = []
    for top in ("jaxdml", "scripts", "experiments", "configs", "tests"):
        for root, _, files in os.walk(os.path.join(REPO, top)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(root, name)
                    with open(path) as f:
                        n = sum(1 for _ in f)
                    if n > 600:
                        long.append((os.path.relpath(path, REPO), n))
    assert long == []
