"""The examples in the docstrings of alignkd.models are doctests, run here on tiny models
written into a temporary folder, so an example that no longer runs fails the suite."""

import doctest
import importlib
import pkgutil

import pytest

import alignkd.models

MODULES = ["alignkd.models"] + [f"alignkd.models.{m.name}" for m in pkgutil.iter_modules(alignkd.models.__path__)]


@pytest.mark.parametrize("name", MODULES)
def test_every_models_module_shows_its_use_in_examples_that_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples write models/, data/, out/ where they run
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name}: no docstring example (>>>) shows how to use it"
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed (report above)"
