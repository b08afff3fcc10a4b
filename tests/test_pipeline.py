"""End to end on real faces: `dvc repro` through a real MLflow sqlite registry, then DVC's
incremental reruns, experiments, and push/pull to a remote from another clone."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import FACES_MINI, ROOT
from deepfake_detector.detector import Decision, Detector
from deepfake_detector.params import MlflowParams

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not (FACES_MINI / "real-vs-fake").is_dir(), reason="faces-mini not available")]

PROJECT_FILES = ["dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", ".dvc/config", ".dvc/.gitignore", "src"]
SMALL = {  # a slice of faces-mini and a small network: the whole pipeline in seconds
    ("preprocess", "limit_per_class"): 12,
    ("preprocess", "image_size"): 32,
    ("model", "arch"): "cnn",
    ("model", "pretrained"): "none",
    ("model", "channels"): [8, 16],
    ("model", "hidden"): 16,
    ("train", "epochs"): 2,
    ("train", "batch_size"): 16,
    ("mlflow", "register_min_auc"): 0.0,  # two epochs on 24 images may rank no better than chance
}


def sh(cmd: list[str], cwd: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def ran_stages(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


def set_params(repo: Path, values: dict) -> None:
    path = repo / "params.yaml"
    raw = yaml.safe_load(path.read_text())
    for (section, key), value in values.items():
        raw[section][key] = value
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import os
    import sys

    env = dict(os.environ, DVC_NO_ANALYTICS="1", CI="true")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.pop("MLFLOW_TRACKING_URI", None)
    for key in ("GIT_AUTHOR", "GIT_COMMITTER"):
        env[f"{key}_NAME"], env[f"{key}_EMAIL"] = "test", "test@example.com"
    return env


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, env) -> Path:
    """A git + DVC checkout of this project, pointed at faces-mini, after one `dvc repro` (its results
    not committed), built once in ``<base>/work/project`` and kept aside as ``<base>/pristine``; returns base."""
    base = tmp_path_factory.mktemp("e2e")
    repo = base / "work" / "project"
    for name in PROJECT_FILES:
        src, dst = ROOT / name, repo / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__")) if src.is_dir()
         else shutil.copy(src, dst))
    set_params(repo, {("data", "source"): str(FACES_MINI), **SMALL})
    sh(["git", "init", "-q", "-b", "main"], repo, env)
    sh(["dvc", "remote", "modify", "--local", "local", "url", str(repo.parent / "remote")], repo, env)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "project"], repo, env)
    first = sh(["dvc", "repro"], repo, env)
    repo.joinpath("first-repro.log").write_text(first.stdout + first.stderr)
    shutil.copytree(base / "work", base / "pristine", symlinks=True)
    return base


@pytest.fixture
def repo(pristine, monkeypatch) -> Path:
    """The checkout as one `dvc repro` left it, restored for each test: a test may change it freely, and
    sees the same state run alone or in any order. Restored at the path it was built at, because the
    MLflow store (artifact locations), models/run.json and DVC's local remote hold absolute paths."""
    # MLflow keeps one SQLAlchemy engine per database URI for the whole process; pooled connections
    # would keep reading the replaced mlflow.db, so none are pooled (read when the engine is made).
    monkeypatch.setenv("MLFLOW_SQLALCHEMYSTORE_POOLCLASS", "NullPool")
    shutil.rmtree(pristine / "work")
    shutil.copytree(pristine / "pristine", pristine / "work", symlinks=True)
    return pristine / "work" / "project"


def commit_results(repo: Path, env: dict) -> None:
    """Commit what the first `dvc repro` wrote (dvc.lock above all), as a baseline for experiments and clones."""
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "first repro's results"], repo, env)


def mlflow_client(repo: Path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    return mlflow.MlflowClient()


def test_repro_runs_every_stage_and_writes_metrics(repo):
    log = (repo / "first-repro.log").read_text()
    assert ran_stages(log) == ["download", "twins", "preprocess", "train", "evaluate"]
    metrics = json.loads((repo / "eval" / "metrics.json").read_text())
    assert metrics["n"] == 24 and 0.0 <= metrics["roc_auc"] <= 1.0
    assert {"accuracy", "precision", "recall", "f1", "average_precision", "tn", "fp", "fn", "tp"} <= set(metrics)
    for plot in ("roc.json", "predictions.csv", "images/roc.png", "images/confusion.png"):
        assert (repo / "eval" / "plots" / plot).stat().st_size > 0
    plots = sh(["dvc", "plots", "show", "--json"], repo, repo_env(repo))
    assert plots.returncode == 0


def repo_env(repo):  # the module env fixture, reachable from plain helpers
    import os
    import sys

    return dict(os.environ, DVC_NO_ANALYTICS="1",
                PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


def test_run_is_logged_and_registered_as_challenger(repo):
    client = mlflow_client(repo)
    version = client.get_model_version_by_alias("deepfake-detector", "challenger")
    run = client.get_run(version.run_id)
    assert json.loads((repo / "models" / "run.json").read_text())["run_id"] == run.info.run_id
    p, m, tags = run.data.params, run.data.metrics, run.data.tags
    assert p["train.epochs"] == "2" and p["model.channels"] == "[8, 16]"
    assert p["preprocess.image_size"] == "32" and p["data.source"] == str(FACES_MINI)
    assert p["evaluate.threshold"] == "0.5"
    assert len(client.get_metric_history(run.info.run_id, "valid_auc")) == 2  # one point per epoch
    assert m["test_roc_auc"] == pytest.approx(json.loads((repo / "eval" / "metrics.json").read_text())["roc_auc"])
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert tags["mlflow.source.git.commit"] == commit
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert tags["dvc.md5.data/processed"] == lock["stages"]["preprocess"]["outs"][0]["md5"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation/plots/images")}
    assert {"evaluation/plots/images/roc.png", "evaluation/plots/images/confusion.png"} <= artifacts
    assert version.tags["test_roc_auc"] == f"{m['test_roc_auc']:.4f}"


def test_registered_model_loads_and_predicts_like_the_checkpoint(repo, monkeypatch):
    # Loading a registered model downloads files and runs no logged code: nothing may need unpickling.
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    monkeypatch.chdir(repo)  # the sqlite store's relative artifact paths
    registered = Detector.load("models:/deepfake-detector@challenger",
                               MlflowParams(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}"))
    local = Detector.load(str(repo / "models"))  # the pipeline workspace: eval/detector.json beside models/
    files = sorted((FACES_MINI / "real-vs-fake" / "test" / "fake").glob("*.jpg"))[:4]
    files += sorted((FACES_MINI / "real-vs-fake" / "test" / "real").glob("*.jpg"))[:4]
    from_registry, errors, _ = registered.score_files(files)
    from_checkpoint, _, _ = local.score_files(files)
    assert not errors and from_registry.shape == (8,)
    np.testing.assert_allclose(from_registry, from_checkpoint, rtol=1e-5, atol=1e-6)
    assert np.all((from_registry >= 0) & (from_registry <= 1))
    # Same decision settings, so the same labels: the threshold chosen on valid, not 0.5.
    assert registered.decision == local.decision == Decision.read(repo / "eval" / "detector.json")
    assert registered.decision.rule == "eer" and "version" in registered.source
    assert [registered.label(p) for p in from_registry] == [local.label(p) for p in from_checkpoint]


def test_predict_cli_and_app_label_like_the_registered_model(repo, env, monkeypatch):
    """The same faces through `deepfake predict --model models`, `--model models:/...@challenger` and
    the app: the same P(fake) and labels, with no pickle allowed anywhere."""
    faces = repo.parent / "faces"
    faces.mkdir()
    for path in sorted((FACES_MINI / "real-vs-fake" / "test" / "fake").glob("*.jpg"))[:3]:
        shutil.copy(path, faces / path.name)
    safe = {**env, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
    tables = {}
    for name, model in (("local", "models"), ("registry", "models:/deepfake-detector@challenger")):
        sh(["deepfake", "predict", str(faces), "--model", model, "--out", f"{name}.csv"], repo, safe)
        with (repo / f"{name}.csv").open() as f:
            tables[name] = {Path(r["path"]).name: (float(r["p_fake"]), r["predicted"]) for r in csv.DictReader(f)}
        (repo / f"{name}.csv").unlink()
    assert tables["local"].keys() == tables["registry"].keys() and len(tables["local"]) == 3
    for face, (p_fake, label) in tables["local"].items():
        assert tables["registry"][face][1] == label and tables["registry"][face][0] == pytest.approx(p_fake, abs=1e-6)

    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{repo / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    monkeypatch.setenv("DEEPFAKE_MODEL_URI", "models:/deepfake-detector@challenger")
    monkeypatch.setenv("DEEPFAKE_SAMPLES", str(repo / "no-samples"))
    monkeypatch.chdir(repo)
    app = AppTest.from_file(str(ROOT / "app" / "streamlit_app.py"), default_timeout=120)
    app.run()
    face = sorted(faces.iterdir())[0]
    app.file_uploader[0].upload(face.name, face.read_bytes(), "image/jpeg").run()
    assert not app.exception, app.exception
    verdict = next(m.value for m in app.markdown if "P(fake)" in m.value)
    p_fake, label = tables["registry"][face.name]
    assert verdict.startswith(f"**{label.upper()}**: P(fake) {p_fake:.3f}")
    assert any("version" in c.value for c in app.caption)


def test_second_repro_does_nothing(repo, env):
    out = sh(["dvc", "repro"], repo, env)
    assert ran_stages(out.stdout) == []
    assert "up to date" in sh(["dvc", "status"], repo, env).stdout


def test_train_param_change_reruns_only_train_and_evaluate(repo, env):
    client = mlflow_client(repo)
    before = client.get_model_version_by_alias("deepfake-detector", "challenger").version
    set_params(repo, {("train", "lr"): 0.003})
    out = sh(["dvc", "repro"], repo, env)
    assert ran_stages(out.stdout) == ["train", "evaluate"]
    after = client.get_model_version_by_alias("deepfake-detector", "challenger")
    assert int(after.version) == int(before) + 1
    assert client.get_run(after.run_id).data.params["train.lr"] == "0.003"
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "lr 0.003 and its results"], repo, env)


def test_exp_run_and_show_list_the_runs(repo, env):
    commit_results(repo, env)
    sh(["dvc", "exp", "run", "-S", "train.epochs=1", "-n", "one-epoch"], repo, env)
    shown = json.loads(sh(["dvc", "exp", "show", "--json"], repo, env).stdout)
    names = [exp.get("name") for rev in shown for exp in (rev.get("experiments") or [])]
    assert "one-epoch" in names
    exps = [e for rev in shown for e in (rev.get("experiments") or []) if e.get("name") == "one-epoch"]
    data = exps[0]["revs"][0]["data"]
    assert data["params"]["params.yaml"]["data"]["train"]["epochs"] == 1
    assert "roc_auc" in data["metrics"]["eval/metrics.json"]["data"]
    client = mlflow_client(repo)
    runs = client.search_runs([client.get_experiment_by_name("deepfake-detector").experiment_id],
                              "tags.`dvc.exp_name` = 'one-epoch'")
    assert len(runs) == 1 and runs[0].data.params["train.epochs"] == "1"


def test_exp_run_in_a_temporary_clone_logs_to_the_repository(repo, env):
    """`dvc exp run --temp` (and `--queue`) run in `.dvc/tmp/exps/tmpXXX`, deleted afterwards: the
    run, its model and artifacts must land in the repository's own MLflow store."""
    commit_results(repo, env)
    sh(["dvc", "exp", "run", "--temp", "-S", "train.epochs=1", "-S", "train.lr=0.002", "-n", "in-temp"], repo, env)
    client = mlflow_client(repo)
    (run,) = client.search_runs([client.get_experiment_by_name("deepfake-detector").experiment_id],
                                "tags.`dvc.exp_name` = 'in-temp'")
    assert run.data.params["train.lr"] == "0.002" and "test_roc_auc" in run.data.metrics
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    assert artifacts.is_relative_to(repo) and (artifacts / "evaluation" / "metrics.json").exists()
    assert not list((repo / ".dvc" / "tmp" / "exps").glob("tmp*/mlflow.db"))


def test_push_and_pull_restore_data_and_model_in_another_clone(repo, env):
    commit_results(repo, env)  # the clone gets dvc.lock from git, the files it names from the remote
    sh(["dvc", "push"], repo, env)
    clone = repo.parent / "clone"
    sh(["git", "clone", "-q", str(repo), str(clone)], repo.parent, env)
    sh(["dvc", "remote", "modify", "--local", "local", "url", str(repo.parent / "remote")], clone, env)
    assert not (clone / "models" / "model.pt").exists()
    sh(["dvc", "pull"], clone, env)
    digest = lambda p: hashlib.md5(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(clone / "models" / "model.pt") == digest(repo / "models" / "model.pt")
    assert (clone / "data" / "processed" / "test" / "images.npy").exists()
    assert len(list((clone / "data" / "raw").rglob("*.jpg"))) == len(list((repo / "data" / "raw").rglob("*.jpg")))
    assert ran_stages(sh(["dvc", "repro"], clone, env).stdout) == []
