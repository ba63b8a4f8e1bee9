"""The package layout: imports point one way (eval/ and train/ use the library, never each other; the
library uses neither), and no module grows past a size a reader can hold."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.quick  # the day-to-day tier (scripts/test.sh -m quick)

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gptoss_jax", "eval", "train")
MAX_LINES = 500
# What each package must never import.
FORBIDDEN = {"gptoss_jax": ("eval", "train"), "eval": ("train",), "train": ("eval",)}


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def imported(path: Path, root: Path = ROOT) -> set[str]:
    """Every module the file imports, at the top or inside functions, relative imports resolved;
    importlib.import_module / __import__ with a literal name count too."""
    package = path.relative_to(root).parts[:-1]  # the package a relative import starts from
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)  # `from eval import tasks`
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            function = node.func
            name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names.add(node.args[0].value)
    return names


def is_within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_point_one_way(package):
    bad = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in modules(package)
        for module in sorted(imported(path))
        if any(is_within(module, other) for other in FORBIDDEN[package])
    ]
    assert not bad, "\n".join(bad)


def test_the_import_reader_sees_lazy_and_relative_imports(tmp_path):
    # The check above is only as good as this reader: it must see what a lazy import hides.
    package = tmp_path / "gptoss_jax" / "sub"
    package.mkdir(parents=True)
    source = package / "mod.py"
    source.write_text(
        "import os\n"
        "def f():\n"
        "    from train.loop import Trainer\n"
        "    import importlib\n"
        "    importlib.import_module('eval.tasks')\n"
        "from . import sibling\n"
        "from .. import top\n"
    )
    assert imported(source, tmp_path) >= {"os", "train.loop", "eval.tasks", "gptoss_jax.sub.sibling", "gptoss_jax.top"}


def test_the_bench_does_not_load_train():
    code = "import eval.bench, sys; assert not any(m == 'train' or m.startswith('train.') for m in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_library_loads_neither_eval_nor_train():
    code = (
        "import gptoss_jax, gptoss_jax.chat, gptoss_jax.cli, gptoss_jax.training, sys; "
        "assert not any(m.split('.')[0] in ('eval', 'train') for m in sys.modules), sorted(sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_no_module_is_longer_than_a_reader_can_hold():
    long = [
        f"{path.relative_to(ROOT)}: {count} lines"
        for package in PACKAGES
        for path in modules(package)
        if (count := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    ]
    assert not long, f"over {MAX_LINES} lines: " + ", ".join(long)
