"""alignkd.data never imports alignkd.models: the models import the data package, and what
the data side needs from a model is the small `batching.BatchModel` protocol."""

import ast
import pkgutil
from pathlib import Path

import pytest

import alignkd.data
from fresh_imports import run_fresh

DATA_MODULES = ["alignkd.data"] + [f"alignkd.data.{m.name}" for m in pkgutil.iter_modules(alignkd.data.__path__)]


def _names_models(node: ast.AST) -> bool:
    if isinstance(node, ast.Import):
        modules = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        modules = [node.module or ""] + [f"{node.module}.{alias.name}" for alias in node.names]
    else:
        return False
    return any(m == "alignkd.models" or m.startswith("alignkd.models.") for m in modules)


def test_no_data_module_imports_a_models_module_anywhere_in_its_source():
    found = []
    for path in sorted(Path(alignkd.data.__path__[0]).glob("*.py")):
        found += [f"{path.name}:{node.lineno}" for node in ast.walk(ast.parse(path.read_text())) if _names_models(node)]
    assert not found, f"alignkd.data imports alignkd.models at {found}"


@pytest.fixture(scope="module")
def models_loaded_by():
    """data module -> the alignkd.models modules importing it loaded, each in a fresh interpreter."""
    code = "import sys, {}; print(sorted(m for m in sys.modules if m.split('.')[:2] == ['alignkd', 'models']))"
    return dict(zip(DATA_MODULES, (out.strip() for out in run_fresh([code.format(m) for m in DATA_MODULES]))))


@pytest.mark.parametrize("module", DATA_MODULES)
def test_importing_a_data_module_in_a_fresh_interpreter_loads_no_models_module(models_loaded_by, module):
    assert models_loaded_by[module] == "[]", f"importing {module} loaded {models_loaded_by[module]}"
