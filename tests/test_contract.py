"""The stage contract (``deepfake_detector.contract``) against everything that follows it: dvc.yaml's
params, outs and code deps (each stage's import closure), MLproject's entry points, the Kubeflow
steps' inputs and caching, and the stages themselves, run on params that fail on any other key."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, make_dataset
from deepfake_detector.contract import PIPELINE, STAGES, Stage, from_stage_params, param_name, param_value, stage_params
from deepfake_detector.params import Params, ParamsError, flatten, load_params, with_overrides
from deepfake_detector.sources import pinned
from deepfake_detector.stages import download, evaluate, preprocess, register, train, twins

PACKAGE = ROOT / "src" / "deepfake_detector"
DVC_STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def covers(names: tuple[str, ...], key: str) -> bool:
    """Whether ``key`` is one of ``names`` or inside one of them (a section)."""
    return any(key == name or key.startswith(f"{name}.") for name in names)


def test_contract_names_real_keys_and_every_key_is_read():
    keys = flatten(Params())
    for stage in STAGES.values():
        for name in stage.params:
            assert any(covers((name,), key) for key in keys), f"{stage.name}: {name} is no params key"
    unread = [key for key in keys if not any(covers(s.params, key) for s in STAGES.values())]
    assert all(key.startswith("promote.") for key in unread), unread  # promote is a command, not a stage


def test_stage_params_are_exactly_the_stage_keys_and_rebuild_params():
    params = with_overrides(Params(), ["seed=42", "train.epochs=3", "model.channels=[8, 16]", "evaluate.threshold=0.7",
                                       "mlflow.experiment=x", "mlflow.alias=y"])
    flat = stage_params(params, "train")
    assert flat["seed"] == 42 and flat["train.epochs"] == 3 and flat["model.channels"] == [8, 16]
    assert flat["mlflow.experiment"] == "x"
    assert {k.split(".")[0] for k in flat} == {"seed", "model", "train", "mlflow"}
    assert [k for k in flat if k.startswith("mlflow.")] == ["mlflow.enabled", "mlflow.tracking_uri",
                                                            "mlflow.experiment"]
    rebuilt = from_stage_params("train", flat)
    assert (rebuilt.train, rebuilt.model, rebuilt.mlflow.experiment) == (params.train, params.model, "x")
    assert rebuilt.evaluate == Params().evaluate and rebuilt.mlflow.alias == "challenger"  # unread: defaults
    with pytest.raises(ParamsError, match=r"missing seed; not read by it evaluate\.threshold"):
        from_stage_params("train", {**{k: v for k, v in flat.items() if k != "seed"}, "evaluate.threshold": 0.1})
    # As a Kubeflow step receives them: every list as comma-separated text, an empty one as "".
    for only in ((), ("ae",), ("ae", "sd")):
        p = with_overrides(params, ["model.spectrum=true", f"model.spectrum_only=[{','.join(only)}]"])
        as_text = {k: param_value(v) for k, v in stage_params(p, "train").items()}
        assert from_stage_params("train", as_text).model == p.model


# --- dvc.yaml ----------------------------------------------------------------------------------

def dvc_paths(entries: list) -> list[str]:
    """Paths of a dvc.yaml list whose entries are a path or ``{path: options}``."""
    return [entry if isinstance(entry, str) else next(iter(entry)) for entry in entries]


def test_dvc_stages_follow_the_contract():
    assert list(DVC_STAGES) == [stage.name for stage in PIPELINE]
    for stage in PIPELINE:
        dvc = DVC_STAGES[stage.name]
        assert dvc["params"] == list(stage.params), stage.name
        outputs = dvc_paths(dvc.get("outs", []) + dvc.get("metrics", []) + dvc.get("plots", []))
        assert sorted(outputs) == sorted(stage.outputs), stage.name
        data_deps = [d for d in dvc_paths(dvc.get("deps", [])) if not d.startswith("src/")]
        assert data_deps == list(stage.inputs), stage.name
        assert dvc["cmd"].split()[:3] == ["PYTHONPATH=src", "deepfake", stage.name]  # the checkout's own code


def module_files(name: str, imported: str | None = None) -> set[str]:
    """The package files (relative to the package) that importing ``name`` (dotted), or ``imported``
    from it, runs: the module itself and the ``__init__.py`` of every package on its path."""
    parts = name.split(".")
    if parts[0] != "deepfake_detector":
        return set()
    parts = parts[1:] + ([imported] if imported else [])
    files = set()
    for depth in range(len(parts) + 1):
        folder = "/".join(parts[:depth])
        if (PACKAGE / folder / "__init__.py").exists():
            files.add(f"{folder}/__init__.py".lstrip("/"))
        elif depth and (PACKAGE / f"{folder}.py").exists():
            files.add(f"{folder}.py")
            break
        else:
            break  # a name inside a module (a function or class), not a module
    return files


def package_imports(path: Path) -> set[str]:
    """The package files that the imports in ``path`` run, at any depth (function bodies included)."""
    files = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            files |= {f for alias in node.names for f in module_files(alias.name)}
        elif isinstance(node, ast.ImportFrom) and node.module:
            files |= {f for alias in node.names for f in module_files(node.module, alias.name)}
    return files


def import_closure(stage: str) -> set[str]:
    """The package files that running ``stages/<stage>.py`` imports, at any depth (each module
    counts whole: which of its functions a stage calls is not followed)."""
    reached = {"__init__.py", "stages/__init__.py", f"stages/{stage}.py"}
    todo = sorted(reached)
    while todo:
        found = package_imports(PACKAGE / todo.pop()) - reached
        reached |= found
        todo += sorted(found)
    return reached


@pytest.mark.parametrize("stage", PIPELINE, ids=lambda s: s.name)
def test_dvc_code_deps_are_the_stage_import_closure(stage):
    """A change to any module a stage runs reruns it under `dvc repro`, and no other change does."""
    listed = {d for d in dvc_paths(DVC_STAGES[stage.name].get("deps", [])) if d.startswith("src/")}
    expected = {f"src/deepfake_detector/{module}" for module in import_closure(stage.name)}
    assert listed == expected, (f"dvc.yaml {stage.name} deps: add {sorted(expected - listed)}, "
                                f"remove {sorted(listed - expected)}")


def test_import_closure_holds_only_what_the_stage_runs():
    """Editing a plot, the model card, the robustness matrix, promotion or the scoring helpers reruns
    no stage before evaluate; editing the model reruns train and evaluate; download and preprocess
    never depend on training code."""
    closure = {stage.name: import_closure(stage.name) for stage in PIPELINE}
    for module in ("plots.py", "card.py", "robustness.py", "promote.py", "scoring.py", "detector.py",
                   "evaluate.py", "stages/evaluate.py", "stages/register.py"):
        assert module not in closure["download"] | closure["preprocess"] | closure["train"], module
    assert {"plots.py", "card.py", "robustness.py"} <= closure["evaluate"]
    assert "model.py" in closure["train"] and "model.py" in closure["evaluate"]
    assert "model.py" not in closure["download"] | closure["preprocess"]
    assert not {"train.py", "tracking.py", "metrics.py"} & (closure["download"] | closure["preprocess"])
    # The twins' autoencoder and torch stay out of preprocess; the twins stage runs no training code.
    assert "twins.py" in closure["twins"] and "twins.py" not in closure["preprocess"]
    assert not {"model.py", "train.py", "tracking.py"} & closure["twins"]
    assert {"metrics.py", "tracking.py"} <= closure["train"]
    assert not {"promote.py", "scoring.py", "cli.py"} & set().union(*closure.values())


def test_import_closure_follows_submodules_and_functions():
    source = PACKAGE / "stages" / "evaluate.py"
    expected = {"stages/register.py", "evaluate.py", "atomic.py", "__init__.py", "stages/__init__.py"}
    assert expected <= package_imports(source)
    assert module_files("deepfake_detector.stages", "register") == {"__init__.py", "stages/__init__.py",
                                                                   "stages/register.py"}
    assert module_files("deepfake_detector.metrics", "compute_metrics") == {"__init__.py", "metrics.py"}
    assert module_files("numpy") == set()


# --- MLproject ---------------------------------------------------------------------------------

def entry_point_yaml(stage: Stage, params: Params) -> str:
    """The MLproject entry point the contract asks for: every leaf key of the stage, underscored,
    defaulting to params.yaml's value (numbers as MLflow floats, the rest as text, lists in YAML),
    each passed on as `-S key=value`. The test prints it when MLproject differs."""
    flat = stage_params(params, stage.name)
    lines = [f"  {stage.name}:", "    parameters:"]
    for key, value in flat.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            kind, default = "float", repr(value)
        else:
            text = yaml.safe_dump(value, default_flow_style=True).strip() if isinstance(value, list) else value
            kind, default = "string", json.dumps(str(text).lower() if isinstance(value, bool) else text)
        lines.append(f"      {param_name(key)}: {{type: {kind}, default: {default}}}")
    lines += ["    command: >-", f"      deepfake {stage.name}"]
    for key in flat:
        option = f"-S {key}={{{param_name(key)}}}"
        if len(lines[-1]) + len(option) < 110:
            lines[-1] += f" {option}"
        else:
            lines.append(f"      {option}")
    return "\n".join(lines) + "\n"


def test_mlproject_stage_entry_points_take_the_stage_params():
    entry_points = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]
    params = load_params(ROOT / "params.yaml")
    for stage in PIPELINE:
        text = entry_point_yaml(stage, params)
        expected, actual = yaml.safe_load(text)[stage.name], entry_points[stage.name]
        fix = f"MLproject's {stage.name} entry point should read:\n{text}"
        assert actual["parameters"] == expected["parameters"], fix
        assert actual["command"].split() == expected["command"].split(), fix
        for key, value in stage_params(params, stage.name).items():
            # MLflow passes the default on as text; `-S` must read it back as the same value.
            default = expected["parameters"][param_name(key)]["default"]
            assert stage_params(with_overrides(params, [f"{key}={default}"]), stage.name)[key] == value, key


# --- Kubeflow ----------------------------------------------------------------------------------

def compiled(tmp_path: Path, *overrides: str) -> dict:
    from pipeline.pipeline import compile_pipeline

    out = compile_pipeline(with_overrides(load_params(ROOT / "params.yaml"), list(overrides)),
                           tmp_path / "pipeline.yaml")
    return next(yaml.safe_load_all(out.read_text()))


def step(spec: dict, name: str) -> dict:
    """What the compiled spec puts into a step's cache key: its task, component and container, and
    the defaults of the pipeline parameters it reads (the values a run without arguments passes it)."""
    tasks = spec["root"]["dag"]["tasks"]
    if name not in tasks:  # register sits inside the AUC gate
        tasks = spec["components"]["comp-condition-1"]["dag"]["tasks"]
    task = tasks[name]
    component = spec["components"][task["componentRef"]["name"]]
    consumed = {v["componentInputParameter"].removeprefix("pipelinechannel--")
                for v in task["inputs"]["parameters"].values() if "componentInputParameter" in v}
    defaults = spec["root"]["inputDefinitions"]["parameters"]
    return {"task": task, "component": component,
            "executor": spec["deploymentSpec"]["executors"][component["executorLabel"]],
            "params": task["inputs"]["parameters"]["params"]["runtimeValue"]["constant"],
            "reads": {name: defaults[name]["defaultValue"] for name in consumed}}


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> dict:
    return compiled(tmp_path_factory.mktemp("kfp"))


@pytest.mark.parametrize("name", STAGES)
def test_kfp_steps_get_only_their_stage_params(spec, name):
    keys = stage_params(Params(), name)
    got = step(spec, name)
    assert set(got["params"]) == set(keys)
    assert set(got["reads"]) == {param_name(k) for k in keys}


def test_evaluate_param_change_keeps_the_train_step_cached(spec, tmp_path):
    changed = compiled(tmp_path, "evaluate.threshold_rule=fixed")
    assert changed["root"]["inputDefinitions"]["parameters"]["evaluate_threshold_rule"]["defaultValue"] == "fixed"
    for name in ("download", "twins", "preprocess", "train"):
        assert step(changed, name) == step(spec, name), name
    assert step(changed, "evaluate")["reads"] != step(spec, "evaluate")["reads"]
    # A train param moves train (and evaluate, through the new model); download and preprocess stay cached.
    changed = compiled(tmp_path, "train.lr=0.01")
    assert step(changed, "preprocess") == step(spec, "preprocess")
    assert step(changed, "train")["reads"] != step(spec, "train")["reads"]
    # preprocess.split_ratios splits the twins as it splits the reals: both steps move with it.
    changed = compiled(tmp_path, "preprocess.split_ratios=[0.7, 0.15, 0.15]")
    assert step(changed, "download") == step(spec, "download")
    for name in ("twins", "preprocess"):
        assert step(changed, name)["reads"] != step(spec, name)["reads"], name


@pytest.mark.parametrize("source, sha256, expected", [
    ("kaggle:xhlulu/140k-real-and-fake-faces", "", False),
    ("https://example.org/faces.zip", "", False),
    ("https://example.org/faces.zip", "ab12", True),
    ("/data/faces.tar.gz", "ab12", True),
    ("/data/faces", "ab12", False),  # a folder: its sha256 is never checked
    ("dvc:https://github.com/org/deepfake-detector", "", False),
    ("dvc:https://github.com/org/deepfake-detector@v1.0", "", True),
    ("dvc:git@github.com:org/deepfake-detector", "", False),
    ("dvc:git@github.com:org/deepfake-detector@3f2c1a9", "", True),
    ("{a: dvc:https://github.com/org/faces@v1, b: dvc:https://github.com/org/sd@v2}", "", True),
    ("{a: dvc:https://github.com/org/faces@v1, b: /data/sd}", "", False),  # every source must be pinned
    ("[/data/a.tar.gz, /data/b.tar.gz]", "ab12", False),  # data.sha256 checks a lone archive only
])
def test_pinned_sources(source, sha256, expected):
    assert pinned(source, sha256) is expected


def test_download_step_is_cached_only_for_a_pinned_default_source(spec, tmp_path):
    cached = lambda s: {n: t.get("cachingOptions", {}).get("enableCache", False)  # noqa: E731
                        for n, t in s["root"]["dag"]["tasks"].items() if n != "condition-1"}
    assert cached(spec) == {"download": False, "twins": True, "preprocess": True, "train": True,
                            "evaluate": True}  # Kaggle
    pinned_spec = compiled(tmp_path, "data.source=dvc:https://github.com/org/deepfake-detector@v1.0")
    assert cached(pinned_spec) == {"download": True, "twins": True, "preprocess": True, "train": True,
                                   "evaluate": True}
    assert step(spec, "register")["task"]["cachingOptions"]["enableCache"]


# --- the stages themselves -----------------------------------------------------------------------

class Guarded:
    """Params (or a section of them) that refuse any key outside ``allowed``, noting it in ``outside``."""

    def __init__(self, value, allowed: tuple[str, ...], outside: list[str], prefix: str = "") -> None:
        self._value, self._allowed, self._outside, self._prefix = value, allowed, outside, prefix

    def __getattr__(self, name: str):
        key, value = self._prefix + name, getattr(self._value, name)
        if covers(self._allowed, key):
            return value
        if any(a.startswith(f"{key}.") for a in self._allowed):
            return Guarded(value, self._allowed, self._outside, f"{key}.")
        self._outside.append(key)
        raise AssertionError(f"read {key}, outside its stage's contract")


@pytest.mark.slow
def test_stages_read_only_their_params_and_write_only_their_outputs(tmp_path, monkeypatch):
    """Every stage, run as DVC runs it (evaluate registers) and register as the Kubeflow step does,
    on params that refuse the keys of other stages; each writes its outputs and nothing else."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # MLflow's artifacts go beside the database, not into the stages' folders
    root = tmp_path / "project"
    root.mkdir()
    params = with_overrides(Params(), [
        f"data.source={make_dataset(tmp_path / 'faces', per_class=4, size=32)}",
        "preprocess.image_size=32", "preprocess.min_source_size=16", "model.arch=cnn", "model.pretrained=none",
        "model.channels=[4]", "model.hidden=4",
        "model.convs_per_block=1", "train.epochs=1", "train.batch_size=8", "train.device=cpu",
        "twins.enabled=true", "twins.epochs=1", "twins.crop=16", "twins.device=cpu",
        "evaluate.robustness.jpeg_quality=[90]", "evaluate.robustness.blur_sigma=[1.0]", "evaluate.mistakes=2",
        "mlflow.register_min_auc=0", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    path = {p: root / p for p in ("data/raw", "data/twins", "data/processed", "models", "eval")}
    results = {}
    run = {
        "download": lambda p: download.run(p, path["data/raw"]),
        "twins": lambda p: twins.run(p, path["data/raw"], path["data/twins"]),
        "preprocess": lambda p: preprocess.run(p, path["data/raw"], path["data/processed"], workers=1,
                                               twins=path["data/twins"]),
        "train": lambda p: train.run(p, path["data/processed"], path["models"]),
        "evaluate": lambda p: evaluate.run(p, path["data/processed"], path["models"], path["eval"]),
        "register": lambda p: register.run(p, path["models"], path["eval"]),
    }
    files = lambda: {f.relative_to(root).as_posix() for f in root.rglob("*") if f.is_file()}  # noqa: E731
    outside: list[str] = []
    for name, stage in STAGES.items():
        assert all((root / i).exists() for i in stage.inputs), name
        before = files()
        results[name] = run[name](Guarded(params, stage.params, outside))
        assert all((root / o).exists() for o in stage.outputs), name
        written = files() - before
        assert [f for f in written if not any(f == o or f.startswith(f"{o}/") for o in stage.outputs)] == [], name
    assert outside == []
    assert results["evaluate"]["registered_version"] == "1" and results["register"] == "2"
    assert results["preprocess"]["sources"][-1] == "twins" and results["twins"]["enabled"]
    assert json.loads((path["models"] / "run.json").read_text())["run_id"]
