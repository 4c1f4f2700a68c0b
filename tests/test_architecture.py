"""The package's layers and where it reads private names of torch and Lightning, stated as tests.

- The layers, lowest first; a module imports its own layer and those below, never one above (``LAYERS``):
  ``functional/`` (pure torch: nothing of the package outside itself, and no Lightning) → ``_lightning/``
  (Lightning's facts), ``metrics``, ``dashboard`` → ``step/`` (the intercepted step) → ``callbacks/``,
  ``monitors/``, ``gan/`` → ``manual``, the package root.
- ``monitors/`` and ``gan/`` import no ``callbacks/``: what they share lives in ``step/``.
- No circle of imports between modules.
- A private name of torch is read only in ``functional/_torch_private.py``; one of Lightning (or torchmetrics)
  only in ``_lightning/private.py``.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "lightning_gp"
FILES = sorted(PACKAGE.rglob("*.py"))
TORCH_PRIVATE = PACKAGE / "functional" / "_torch_private.py"
LIGHTNING_PRIVATE = PACKAGE / "_lightning" / "private.py"
# A module's layer, read off its path inside the package (the first matching prefix wins).
LAYERS = {"functional/": 0, "_lightning/": 1, "metrics.py": 1, "dashboard.py": 1, "step/": 2, "callbacks/": 3,
          "monitors/": 3, "gan/": 3, "manual.py": 4, "__init__.py": 4}


def _rel(path: pathlib.Path) -> str:
    return path.relative_to(PACKAGE.parent).as_posix()


def _imports(path: pathlib.Path) -> list[str]:
    """Every module ``path`` imports, at the top or inside a function."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
            out += [f"{node.module}.{alias.name}" for alias in node.names]
    return out


def _in(path: pathlib.Path, folder: str) -> bool:
    return _rel(path).startswith(f"lightning_gp/{folder}/")


@pytest.mark.parametrize("path", [p for p in FILES if _in(p, "functional")], ids=_rel)
def test_functional_imports_only_itself_and_torch(path):
    bad = [m for m in _imports(path) if (m.startswith("lightning_gp") and not m.startswith("lightning_gp.functional"))
           or m.split(".")[0] in ("lightning", "lightning_utilities", "torchmetrics", "wandb")]
    assert not bad, f"{_rel(path)} imports {bad}: the functional layer is pure torch"


@pytest.mark.parametrize("path", [p for p in FILES if _in(p, "monitors") or _in(p, "gan")], ids=_rel)
def test_monitors_and_gan_import_no_callbacks(path):
    bad = [m for m in _imports(path) if m.startswith("lightning_gp.callbacks")]
    assert not bad, f"{_rel(path)} imports {bad}: shared plumbing belongs in step/"


def _layer(path: pathlib.Path) -> int:
    inside = path.relative_to(PACKAGE).as_posix()
    return next(layer for prefix, layer in LAYERS.items() if inside.startswith(prefix))


def _module_path(module: str) -> pathlib.Path | None:
    """The file of ``lightning_gp.a.b`` (or of ``a`` when ``b`` is a name defined in it)."""
    parts = module.split(".")[1:]
    while parts:
        for candidate in (PACKAGE.joinpath(*parts).with_suffix(".py"), PACKAGE.joinpath(*parts, "__init__.py")):
            if candidate.is_file():
                return candidate
        parts = parts[:-1]
    return None


@pytest.mark.parametrize("path", FILES, ids=_rel)
def test_imports_run_down_the_layers(path):
    up = sorted({f"{m} (layer {_layer(target)})" for m in _imports(path) if m.startswith("lightning_gp.")
                 and (target := _module_path(m)) is not None and target.name != "__init__.py"
                 and _layer(target) > _layer(path)})
    assert not up, f"{_rel(path)} (layer {_layer(path)}) imports from a higher layer: {up}"


def test_every_module_has_a_layer_and_the_check_can_fail():
    assert all(isinstance(_layer(p), int) for p in FILES)
    assert _layer(PACKAGE / "functional" / "gan.py") < _layer(PACKAGE / "step" / "_chain.py")
    assert _module_path("lightning_gp.step._chain.run_chain") == PACKAGE / "step" / "_chain.py"


def _package_names() -> set[str]:
    """Every name the package itself defines: functions, classes, arguments, and attributes it assigns."""
    names: set[str] = set()
    for path in FILES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
                names.add(node.value)  # `self.__dict__["_draw"]`, `setattr(obj, "_x", ...)`
    return names


def _foreign_private(path: pathlib.Path, own: set[str]) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            name = node.attr
        elif isinstance(node, ast.ImportFrom) and node.module:
            found += [f"import from {node.module}" for part in node.module.split(".") if part.startswith("_")
                      and not part.startswith("__") and not node.module.startswith("lightning_gp")]
            found += [f"import {a.name}" for a in node.names if a.name.startswith("_") and not
                      node.module.startswith("lightning_gp") and not a.name.startswith("__")]
            continue
        else:
            continue
        if name.startswith("_") and not name.startswith("__") and name not in own:
            found.append(f"line {node.lineno}: .{name}")
    return found


def test_private_names_of_torch_and_lightning_are_read_in_one_module_each():
    own = _package_names()
    offenders = {_rel(p): bad for p in FILES if p not in (TORCH_PRIVATE, LIGHTNING_PRIVATE)
                 and (bad := _foreign_private(p, own))}
    assert not offenders, f"private names of torch/Lightning read outside the two accessor modules: {offenders}"


def test_the_accessor_modules_do_read_private_names():
    """The check above can fail: it finds the names the two accessor modules read."""
    own = _package_names()
    assert any("_version" in s for s in _foreign_private(TORCH_PRIVATE, own))
    assert any("_batches_that_stepped" in s for s in _foreign_private(LIGHTNING_PRIVATE, own))
    assert not any(_rel(LIGHTNING_PRIVATE) == _rel(p) for p in FILES if _in(p, "functional"))


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_two_modules_import_each_other():
    """The package is a layered house: no circle of imports between its modules, lazy imports included."""
    modules = {_module_name(p): p for p in FILES}
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for target in _imports(path):
            while target and target not in modules:  # `from a.b import c`: c is a name of a.b, or a module
                target = target.rpartition(".")[0]
            if target and target != name and not modules[target].name == "__init__.py":
                graph[name].add(target)
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*trail[trail.index(nxt):], nxt] if nxt in trail else [node, nxt]
                raise AssertionError(f"import circle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
