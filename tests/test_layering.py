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


def core_modules(source: str) -> set[str]:
    """The core modules (``X`` of ``deepfake_detector.X``) that ``source``, a top-level core module,
    imports at any depth, however spelled: ``import deepfake_detector.X``, ``from deepfake_detector.X
    import ...``, ``from deepfake_detector import X`` or relatively."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module if not node.level else ".".join(filter(None, ("deepfake_detector", node.module)))
            names = [module, *(f"{module}.{alias.name}" for alias in node.names)]
        else:
            continue
        found.update(name.split(".")[1] for name in names if name.startswith("deepfake_detector."))
    return found


def test_core_modules_are_found_however_the_import_is_spelled():
    source = ("import deepfake_detector.errors\n"
              "from deepfake_detector.model import to_input\n"
              "def f():\n"
              "    from deepfake_detector import heads, spectrum as s\n"
              "from . import familiarity\n"
              "from .params import ModelParams\n"
              "import torch.nn\n")
    assert core_modules(source) == {"errors", "model", "heads", "spectrum", "familiarity", "params"}


def test_the_network_and_its_heads_know_nothing_of_each_other():
    """model.py runs whatever sits in its heads; spectrum.py and familiarity.py are fit on what the
    network gives. heads.py alone joins them."""
    imports = {name: core_modules((CORE / f"{name}.py").read_text())
               for name in ("model", "spectrum", "familiarity", "heads")}
    assert {"model", "spectrum", "familiarity"} <= imports["heads"]  # the walk finds both spellings there
    assert imports["model"] & {"spectrum", "familiarity", "heads"} == set()
    assert imports["spectrum"] & {"model", "heads"} == set()
    assert imports["familiarity"] & {"model", "heads"} == set()
