"""The layout's promises: the sampling loop knows nothing of the speed-ups, and the library nothing of the CLIs.

Read from the source: every ``import`` of every module under ``ldm/`` (function-level ones too, since a lazy import
crosses the boundary as soon as it runs), followed transitively through module-level imports and package
``__init__`` files. One test also runs the check of the issue in a fresh interpreter.
"""

import ast
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("ldm.accel", "ldm.cli", "ldm.train", "ldm.eval")
# package → prefixes it must never reach
BOUNDARIES = {
    "ldm.pipeline": LIBRARY,
    "ldm.models": LIBRARY,
    "ldm.formats": LIBRARY,
    "ldm.data": LIBRARY,
    "ldm.train": ("ldm.accel", "ldm.cli"),
    "ldm.eval": ("ldm.cli",),
    "ldm.accel": ("ldm.cli", "ldm.train"),
}


def module_names() -> dict[str, Path]:
    names = {}
    for path in sorted((ROOT / "ldm").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


MODULES = module_names()


@cache
def imports_of(module: str) -> frozenset[str]:
    """The ldm modules that ``module``'s source imports anywhere, with the packages on their way."""
    found = set()
    tree = ast.parse(MODULES[module].read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from ldm.accel import fast`` names a module; ``from ldm.x import f`` names a function in ldm.x
            targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            found.update(".".join(parts[:i]) for i in range(2, len(parts) + 1) if ".".join(parts[:i]) in MODULES)
    return frozenset(found)


def reached_from(package: str) -> set[str]:
    """What ``package``'s modules reach; its ``__main__`` (``python -m ldm.data``) is a command that nothing imports,
    there to start the CLI, so it is not counted as the package's."""
    todo = [m for m in MODULES if (m == package or m.startswith(package + ".")) and not m.endswith(".__main__")]
    seen = set(todo)
    while todo:
        for target in imports_of(todo.pop()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


@pytest.mark.parametrize("package", sorted(BOUNDARIES))
def test_package_stays_inside_its_boundary(package):
    crossed = sorted(m for m in reached_from(package) if m.startswith(BOUNDARIES[package]))
    assert not crossed, f"{package} reaches {crossed}"


def test_the_check_sees_imports():
    """The check itself: the commands do reach the library, the loop and the speed-ups (so a crossing would show)."""
    reached = reached_from("ldm.cli")
    assert {"ldm.pipeline.text_to_image", "ldm.accel.fast", "ldm.train.loop", "ldm.models.unet"} <= reached


def test_importing_the_pipeline_loads_no_speed_up():
    """The issue's own check, in a fresh interpreter."""
    script = "import ldm.pipeline, sys; assert not [m for m in sys.modules if m.startswith(('ldm.accel', 'ldm.cli'))]"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr


@cache
def targets_of(module: str) -> frozenset[str]:
    """The modules ``module`` imports (anywhere in it), each resolved to the longest name that is a module."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            found.update(next(([".".join(parts[:i])] for i in range(len(parts), 1, -1) if ".".join(parts[:i]) in MODULES), []))
    return frozenset(found - {module})


def test_no_import_cycles():
    """A cycle (two modules that import each other, even lazily) means one of them is in the wrong place."""
    state: dict[str, str] = {}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(targets_of(module)):
            if state.get(target) == "open":
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(MODULES):
        if module not in state:
            visit(module, [module])
    assert not cycles, " ; ".join(" → ".join(c) for c in cycles)


def test_checking_a_dataset_does_not_load_torch():
    """``python -m ldm data check`` reads captions and decodes images only: torch, seconds to import, stays out."""
    script = "import sys, ldm.cli.data, ldm.data; assert 'torch' not in sys.modules, 'torch was imported'"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
