"""pytest in bench/: each collected ``bench_<op>.py`` is the module ``rwp_fast.bench.bench_<op>``.

By default pytest imports ``bench/bench_pgd_step.py`` as ``bench.bench_pgd_step`` (the folder has an
``__init__.py`` and the repo root goes on sys.path), a second copy of the module beside the one that
``rwp-fast bench`` and tests/ import; its module-level state (``common``'s, the op registries) would then
exist twice in one pytest process. Collecting through the package name keeps one copy.
"""

import importlib

import pytest


class _BenchModule(pytest.Module):
    def _getobj(self):
        name = "rwp_fast.bench" if self.path.stem == "__init__" else f"rwp_fast.bench.{self.path.stem}"
        module = importlib.import_module(name)
        self.config.pluginmanager.consider_module(module)  # what pytest's own import does after loading
        return module


def pytest_pycollect_makemodule(module_path, parent):
    return _BenchModule.from_parent(parent, path=module_path)
