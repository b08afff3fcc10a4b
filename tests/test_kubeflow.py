"""Kubeflow: the compiled spec, a whole local run through kfp.local, the AUC gate, `submit` against
hosts that do not answer, DVC-versioned data as a source, and `mlflow run` of the MLproject."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import FACES_MINI, ROOT, free_port, make_dataset
from deepfake_detector.data import download
from deepfake_detector.params import flatten, load_params

needs_faces = pytest.mark.skipif(not (FACES_MINI / "real-vs-fake").is_dir(), reason="faces-mini not available")
SMALL = {"data_source": str(FACES_MINI), "preprocess_limit_per_class": 8, "preprocess_image_size": 32,
         "model_channels": "8", "model_hidden": 8, "train_epochs": 1}


def run_cli(*args: str, env: dict, cwd: Path = ROOT, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deepfake_detector.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def compile_spec(out_dir: Path, *options: str) -> dict:
    """The compiled pipeline (and its Kubernetes platform spec), from the CLI as a user runs it."""
    out = out_dir / "pipeline.yaml"
    result = run_cli("pipeline", "compile", "--params", str(ROOT / "params.yaml"), "--out", str(out),
                     "--image", "registry.example.com/deepfake-detector:v1", *options, env=dict(os.environ))
    assert result.returncode == 0, result.stderr
    docs = list(yaml.safe_load_all(out.read_text()))
    return {"pipeline": docs[0], "platform": docs[1]["platforms"]["kubernetes"]}


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> dict:
    """Compiled with the default cluster options."""
    return compile_spec(tmp_path_factory.mktemp("kfp"))


def train_step(spec: dict) -> tuple[dict, dict, dict, dict]:
    """The train task, its compile-time inputs (not params), its container and its Kubernetes config."""
    task = spec["pipeline"]["root"]["dag"]["tasks"]["train"]
    constants = {k: v["runtimeValue"]["constant"] for k, v in task["inputs"]["parameters"].items()
                 if k in ("nproc_per_node", "checkpoint_dir")}
    container = spec["pipeline"]["deploymentSpec"]["executors"]["exec-train"]["container"]
    return task, constants, container, spec["platform"]["deploymentSpec"]["executors"]["exec-train"]


def test_spec_has_the_stages_in_order_and_the_gate(spec):
    tasks = spec["pipeline"]["root"]["dag"]["tasks"]
    assert set(tasks) == {"download", "preprocess", "train", "evaluate", "condition-1"}
    artifact_from = lambda task: {a["taskOutputArtifact"]["producerTask"]  # noqa: E731
                                  for a in tasks[task]["inputs"].get("artifacts", {}).values()}
    assert artifact_from("preprocess") == {"download"}
    assert artifact_from("train") == {"preprocess"}
    assert artifact_from("evaluate") == {"preprocess", "train"}
    gate = tasks["condition-1"]["triggerPolicy"]["condition"]
    assert "evaluate-Output" in gate and "mlflow_register_min_auc" in gate and ">=" in gate
    inner = spec["pipeline"]["components"]["comp-condition-1"]["dag"]["tasks"]
    assert set(inner) == {"register"}
    assert tasks["download"]["retryPolicy"]["maxRetryCount"] == 3
    assert all(t.get("cachingOptions", {}).get("enableCache") for n, t in tasks.items() if n != "condition-1")


def test_spec_requests_a_gpu_for_training_only(spec):
    executors = spec["pipeline"]["deploymentSpec"]["executors"]
    train = executors["exec-train"]["container"]
    assert train["resources"]["accelerator"]["resourceCount"] == "1"
    assert train["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert train["resources"]["resourceCpuRequest"] == "4" and train["resources"]["resourceMemoryRequest"] == "16G"
    assert train["image"] == "registry.example.com/deepfake-detector:v1"
    assert all("accelerator" not in e["container"].get("resources", {}) for n, e in executors.items() if n != "exec-train")


def test_spec_trains_under_torchrun_with_retries_and_shared_memory(spec):
    task, constants, container, platform = train_step(spec)
    assert constants == {"nproc_per_node": 1, "checkpoint_dir": ""}  # one GPU; no volume, so no resume
    assert "torchrun_command(nproc_per_node" in container["command"][-1]
    assert task["retryPolicy"]["maxRetryCount"] == 2 and task["retryPolicy"]["backoffDuration"] == "60s"
    assert platform["emptyDirMounts"] == [{"volumeName": "dshm", "mountPath": "/dev/shm", "medium": "Memory"}]
    assert "pvcMount" not in platform


def test_spec_processes_follow_the_accelerator_limit_and_checkpoints_go_to_the_claim(tmp_path):
    gpus = compile_spec(tmp_path, "--accelerator-limit", "4", "--checkpoint-pvc", "ckpt-claim",
                        "--train-retries", "5")
    task, constants, container, platform = train_step(gpus)
    assert constants == {"nproc_per_node": 4, "checkpoint_dir": "/checkpoints/deepfake-detector"}
    assert container["resources"]["accelerator"]["resourceCount"] == "4"
    assert task["retryPolicy"]["maxRetryCount"] == 5
    (mount,) = platform["pvcMount"]
    assert mount["mountPath"] == "/checkpoints"
    assert mount["pvcNameParameter"]["runtimeValue"]["constant"] == "ckpt-claim"

    _, constants, container, _ = train_step(compile_spec(tmp_path, "--accelerator-limit", "0"))
    assert constants["nproc_per_node"] == 1 and "accelerator" not in container["resources"]


def test_spec_parameters_are_params_yaml_with_its_defaults(spec):
    inputs = spec["pipeline"]["root"]["inputDefinitions"]["parameters"]
    defaults = flatten(load_params(ROOT / "params.yaml"))
    assert set(inputs) == {k.replace(".", "_") for k in defaults}
    assert inputs["train_epochs"]["defaultValue"] == defaults["train.epochs"]
    assert inputs["data_source"]["defaultValue"] == defaults["data.source"]
    assert inputs["model_channels"]["defaultValue"] == ",".join(map(str, defaults["model.channels"]))


def test_mlflow_credentials_come_from_a_secret(spec):
    executors = spec["platform"]["deploymentSpec"]["executors"]
    assert set(executors) == {"exec-download", "exec-train", "exec-evaluate", "exec-register"}
    (download,) = executors.pop("exec-download")["secretAsEnv"]  # storage credentials only
    assert download["optional"] and "AWS_ACCESS_KEY_ID" in [k["secretKey"] for k in download["keyToEnv"]]
    for config in executors.values():
        required, optional = config["secretAsEnv"]
        assert required["secretName"] == "mlflow" and not required.get("optional")
        assert [k["secretKey"] for k in required["keyToEnv"]] == ["MLFLOW_TRACKING_URI"]
        assert optional["optional"] and "MLFLOW_TRACKING_PASSWORD" in [k["secretKey"] for k in optional["keyToEnv"]]


def run_local_pipeline(tmp_path: Path, monkeypatch, **params):
    """The whole pipeline through kfp.local, each step a subprocess in this environment."""
    from kfp import local

    from deepfake_detector.tracking import Tracker  # noqa: F401  (mlflow imported before chdir)
    from pipeline.pipeline import make_pipeline

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    make_pipeline(load_params(ROOT / "params.yaml"))(**{**SMALL, **params})


def registered(tmp_path: Path, alias: str = "challenger"):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        return client, client.get_model_version_by_alias("deepfake-detector", alias)
    except mlflow.exceptions.MlflowException:
        return client, None


@needs_faces
def test_whole_pipeline_runs_locally_and_registers(tmp_path, monkeypatch):
    run_local_pipeline(tmp_path, monkeypatch, mlflow_register_min_auc=0.0)
    client, version = registered(tmp_path)
    assert version is not None
    run = client.get_run(version.run_id)
    assert run.data.params["train.epochs"] == "1" and run.data.params["data.source"] == str(FACES_MINI)
    assert "test_roc_auc" in run.data.metrics and len(client.get_metric_history(run.info.run_id, "valid_auc")) == 1


@needs_faces
def test_auc_gate_skips_registration(tmp_path, monkeypatch):
    run_local_pipeline(tmp_path, monkeypatch, mlflow_register_min_auc=1.01)  # no model reaches AUC > 1
    client, version = registered(tmp_path)
    assert version is None
    runs = client.search_runs([client.get_experiment_by_name("deepfake-detector").experiment_id])
    assert len(runs) == 1 and "test_roc_auc" in runs[0].data.metrics  # trained and evaluated, not registered


def test_submit_to_a_port_with_nothing_listening_fails_fast(tmp_path):
    package = tmp_path / "pipeline.yaml"
    package.write_text("{}")
    port = free_port()
    start = time.monotonic()
    result = run_cli("pipeline", "submit", "--params", str(ROOT / "params.yaml"), "--package", str(package),
                     "--host", f"http://127.0.0.1:{port}", "-p", "train.epochs=2", env=dict(os.environ))
    assert time.monotonic() - start < 15
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"cannot reach KFP at http://127.0.0.1:{port}" in result.stderr


def test_submit_to_a_host_that_never_answers_times_out(tmp_path):
    package = tmp_path / "pipeline.yaml"
    package.write_text("{}")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()  # accepts connections, never speaks HTTP
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    try:
        start = time.monotonic()
        result = run_cli("pipeline", "submit", "--params", str(ROOT / "params.yaml"), "--package", str(package),
                         "--host", f"http://127.0.0.1:{server.getsockname()[1]}", "--timeout", "2",
                         env=dict(os.environ))
        assert time.monotonic() - start < 15
        assert result.returncode == 2 and "timed out" in result.stderr and "Traceback" not in result.stderr
    finally:
        server.close()


def test_submit_rejects_unknown_or_mistyped_parameters(tmp_path):
    package = tmp_path / "pipeline.yaml"
    package.write_text("{}")
    for bad, message in (("train.epoch=3", "not KEY=VALUE with a key"), ("train_epochs=many", "must be int")):
        result = run_cli("pipeline", "submit", "--params", str(ROOT / "params.yaml"), "--package", str(package),
                         "--host", "http://127.0.0.1:9", "-p", bad, env=dict(os.environ))
        assert result.returncode == 2 and message in result.stderr, result.stderr


def git_env() -> dict:
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    for key in ("GIT_AUTHOR", "GIT_COMMITTER"):
        env[f"{key}_NAME"], env[f"{key}_EMAIL"] = "test", "test@example.com"
    return env


def test_download_from_a_dvc_repository_at_a_revision(tmp_path):
    """`data.source: dvc:REPO@REV` gets that revision's data/raw from the repo's DVC remote."""
    env, repo = git_env(), tmp_path / "repo"
    repo.mkdir()
    sh = lambda *cmd: subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True, text=True)  # noqa: E731
    sh("git", "init", "-q", "-b", "main")
    sh("dvc", "init", "-q")
    sh("dvc", "remote", "add", "-d", "store", str(tmp_path / "remote"))
    make_dataset(repo / "data" / "raw", per_class=1, size=16)
    sh("dvc", "add", "data/raw")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "v1 data")
    sh("git", "tag", "v1")
    sh("dvc", "push", "-q")
    make_dataset(repo / "data" / "raw", per_class=2, size=16)  # v2: more images, only in the workspace

    info = download(f"dvc:{repo}@v1", tmp_path / "raw")
    assert info["kind"] == "dvc" and info["dvc"]["rev"] == "v1"
    assert info["files"]["train"] == {"real": 1, "fake": 1}
    lock = yaml.safe_load((repo / "data" / "raw.dvc").read_text())
    assert info["dvc"]["md5"] == lock["outs"][0]["md5"]


@needs_faces
def test_mlproject_main_runs_with_the_local_env(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    for name in ("MLproject", "python_env.yaml", "params.yaml"):
        shutil.copy(ROOT / name, project / name)
    env = git_env() | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    result = subprocess.run(
        [str(Path(sys.executable).parent / "mlflow"), "run", str(project), "-e", "main", "--env-manager", "local",
         "--experiment-name", "deepfake-detector", "-P", f"source={FACES_MINI}", "-P", "epochs=1",
         "-P", "image_size=32", "-P", "limit_per_class=8"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    client, version = registered(tmp_path)
    assert version is not None
    assert client.get_run(version.run_id).data.params["train.epochs"] == "1"
