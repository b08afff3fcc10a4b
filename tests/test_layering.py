"""The core, src/deepfake_detector, depends on nothing built on it: no Kubeflow (kfp, pipeline/,
components/), no app (streamlit, app/), and MLflow only in the modules allowed to hold it.
Checked on the source with `ast`, every import statement at any depth (inside functions too)."""

from __future__ import annotations

import ast

from conftest import ROOT

CORE = ROOT / "src" / "deepfake_detector"
# Packages built on the core; importing one back would make the core need them.
NOT_IN_CORE = frozenset({"kfp", "pipeline", "components", "streamlit", "app"})
# The core modules that may import mlflow, relative to CORE. tracking.py holds runs and registry;
# a serving module (the logged pyfunc) would be the other one.
MLFLOW_MODULES = ("tracking.py", "serving.py")  # serving.py: the model MLflow logs from code


def imported_packages(source: str) -> set[str]:
    """Top-level package of every absolute import in ``source``, wherever the statement is."""
    packages = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            packages.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:  # relative imports stay in the core
            packages.add(node.module.partition(".")[0])
    return packages


def core_imports() -> dict[str, set[str]]:
    """Each core module (path relative to CORE) and the packages it imports."""
    return {path.relative_to(CORE).as_posix(): imported_packages(path.read_text())
            for path in sorted(CORE.rglob("*.py"))}


def test_imports_are_found_at_any_depth():
    source = ("import os.path\n"
              "def f():\n"
              "    if True:\n"
              "        from kfp import dsl\n"
              "    class C:\n"
              "        def g(self):\n"
              "            import mlflow.pyfunc as m\n"
              "from . import params\n")
    assert imported_packages(source) == {"os", "kfp", "mlflow"}


def test_core_imports_neither_kubeflow_nor_the_app():
    imports = core_imports()
    assert "cli.py" in imports and "tracking.py" in imports  # the walk found the core
    assert {module: sorted(found & NOT_IN_CORE) for module, found in imports.items() if found & NOT_IN_CORE} == {}


def test_mlflow_is_imported_only_by_the_allowed_modules():
    importing = sorted(module for module, found in core_imports().items() if "mlflow" in found)
    assert importing == sorted(MLFLOW_MODULES), "MLflow belongs in tracking.py (or a serving module in MLFLOW_MODULES)"
