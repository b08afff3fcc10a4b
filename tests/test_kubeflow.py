"""Kubeflow: the compiled spec, a whole local run through kfp.local, the AUC gate, `deepfake-pipeline
submit` against a stand-in of the KFP API and against hosts that do not answer, the README's cluster
snippets, the project image's Dockerfile, DVC-versioned data as a source, and `mlflow run` of the
MLproject."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.parse
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml

from conftest import FACES_MINI, ROOT, free_port, make_dataset
from deepfake_detector.data import download
from deepfake_detector.params import flatten, load_params

FACES_SD = FACES_MINI.parent / "faces-sd"
needs_faces = pytest.mark.skipif(not (FACES_MINI / "real-vs-fake").is_dir(), reason="faces-mini not available")
SMALL = {"data_source": str(FACES_MINI), "preprocess_limit_per_class": 8, "preprocess_image_size": 32,
         "model_arch": "cnn", "model_pretrained": "none", "model_channels": "8", "model_hidden": 8, "train_epochs": 1}


# The console script pyproject.toml declares, as installed in this environment.
PIPELINE_CLI = Path(sys.executable).parent / "deepfake-pipeline"
PARAMS = str(ROOT / "params.yaml")


def run_pipeline_cli(*args: str, env: dict | None = None, cwd: Path = ROOT,
                     timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(PIPELINE_CLI), *args], cwd=cwd, env=env or dict(os.environ),
                          capture_output=True, text=True, timeout=timeout)


def client_env(home: Path) -> dict:
    """The environment for `submit`: a HOME without the user's kfp context file, no KF_PIPELINES_* settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith("KF_PIPELINES_")} | {"HOME": str(home)}


def compile_package(out: Path, *options: str) -> list[dict]:
    """``deepfake-pipeline compile`` as a user runs it; the package's YAML documents."""
    result = run_pipeline_cli("compile", "--params", PARAMS, "--out", str(out),
                              "--image", "registry.example.com/deepfake-detector:v1", *options)
    assert result.returncode == 0, result.stderr
    return list(yaml.safe_load_all(out.read_text()))


def compile_spec(out_dir: Path, *options: str) -> dict:
    """The compiled pipeline and its Kubernetes platform spec."""
    docs = compile_package(out_dir / "pipeline.yaml", *options)
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
    assert set(tasks) == {"download", "twins", "preprocess", "train", "evaluate", "condition-1"}
    artifact_from = lambda task: {a["taskOutputArtifact"]["producerTask"]  # noqa: E731
                                  for a in tasks[task]["inputs"].get("artifacts", {}).values()}
    assert artifact_from("twins") == {"download"}
    assert artifact_from("preprocess") == {"download", "twins"}
    assert artifact_from("train") == {"preprocess"}
    assert artifact_from("evaluate") == {"preprocess", "train"}
    gate = tasks["condition-1"]["triggerPolicy"]["condition"]
    assert "evaluate-Output" in gate and "mlflow_register_min_auc" in gate and ">=" in gate
    inner = spec["pipeline"]["components"]["comp-condition-1"]["dag"]["tasks"]
    assert set(inner) == {"register"}
    assert tasks["download"]["retryPolicy"]["maxRetryCount"] == 3
    # download is cached only for a pinned default source (tests/test_contract.py)
    assert all(t.get("cachingOptions", {}).get("enableCache") for n, t in tasks.items()
               if n not in ("condition-1", "download"))



def test_register_reads_evaluates_decision_and_takes_no_param_of_another_stage(spec):
    """The decision is made once: register consumes evaluate's output folder (detector.json, the
    model card, metrics) as an artifact, and its only params are its own (MLflow's registry keys)."""
    register = spec["pipeline"]["components"]["comp-condition-1"]["dag"]["tasks"]["register"]
    gate_inputs = spec["pipeline"]["root"]["dag"]["tasks"]["condition-1"]["inputs"]["artifacts"]
    # Inside the AUC gate a task's artifact is the gate's input, which names the producing task.
    produced = {name: (a["taskOutputArtifact"]["producerTask"], a["taskOutputArtifact"]["outputArtifactKey"])
                for name, a in gate_inputs.items()}
    artifacts = {name: produced[a["componentInputArtifact"]] for name, a in register["inputs"]["artifacts"].items()}
    assert artifacts == {"model": ("train", "model"), "evaluation": ("evaluate", "evaluation")}
    params = register["inputs"]["parameters"]["params"]["runtimeValue"]["constant"]
    assert params and all(key.startswith("mlflow.") for key in params), sorted(params)
    evaluate_outputs = spec["pipeline"]["components"]["comp-evaluate"]["outputDefinitions"]["artifacts"]
    assert {"evaluation", "metrics", "classification"} <= set(evaluate_outputs)

def test_spec_requests_a_gpu_for_training_only(spec):
    executors = spec["pipeline"]["deploymentSpec"]["executors"]
    train = executors["exec-train"]["container"]
    assert train["resources"]["accelerator"]["resourceCount"] == "1"
    assert train["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert train["resources"]["resourceCpuRequest"] == "4" and train["resources"]["resourceMemoryRequest"] == "16G"
    assert train["image"] == "registry.example.com/deepfake-detector:v1"
    assert all("accelerator" not in e["container"].get("resources", {})
               for n, e in executors.items() if n != "exec-train")


def test_spec_trains_under_torchrun_with_retries_and_shared_memory(spec):
    task, constants, container, platform = train_step(spec)
    assert constants == {"nproc_per_node": 1, "checkpoint_dir": ""}  # one GPU; no volume, so no resume
    assert "train_command(nproc_per_node" in container["command"][-1]
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


@pytest.mark.slow
@needs_faces
def test_whole_pipeline_runs_locally_and_registers(tmp_path, monkeypatch):
    run_local_pipeline(tmp_path, monkeypatch, mlflow_register_min_auc=0.0)
    client, version = registered(tmp_path)
    assert version is not None
    run = client.get_run(version.run_id)
    assert run.data.params["train.epochs"] == "1" and run.data.params["data.source"] == str(FACES_MINI)
    assert "test_roc_auc" in run.data.metrics and len(client.get_metric_history(run.info.run_id, "valid_auc")) == 1


@pytest.mark.slow
@pytest.mark.skipif(not (FACES_MINI / "real-vs-fake").is_dir() or not FACES_SD.is_dir(),
                    reason="faces-mini and faces-sd not both available")
def test_pipeline_runs_locally_on_two_sources_with_metrics_per_source(tmp_path, monkeypatch):
    source = f"{{stylegan: {FACES_MINI}, sd: {FACES_SD}}}"
    run_local_pipeline(tmp_path, monkeypatch, data_source=source, mlflow_register_min_auc=0.0)
    client, version = registered(tmp_path)
    run = client.get_run(version.run_id)
    assert run.data.params["data.source"] == source  # the mapping's text, through every step
    assert {"test_per_source.stylegan.roc_auc", "test_per_source.sd.roc_auc", "valid_auc.stylegan",
            "valid_auc.sd"} <= set(run.data.metrics)


@pytest.mark.slow
def test_pipeline_runs_locally_with_twins_on_tiny_data(tmp_path, monkeypatch):
    """The twins step for real, on synthetic faces: each real's twin, in its split, reaches preprocess
    as the fake source `twins` and training logs it apart."""
    faces = make_dataset(tmp_path / "faces", per_class=4, size=32)
    run_local_pipeline(tmp_path, monkeypatch, data_source=str(faces), preprocess_limit_per_class=0,
                       preprocess_min_source_size=16, twins_enabled=True, twins_epochs=2, twins_crop=16,
                       twins_device="cpu", mlflow_register_min_auc=0.0)
    (made,) = (tmp_path / "root").rglob("twins.json")
    assert json.loads(made.read_text())["twins"] == {"real-vs-fake": {"train": 4, "valid": 4, "test": 4}}
    assert sorted(p.name for p in (made.parent / "valid" / "fake").iterdir()) == [
        f"real-vs-fake.{p.name}.jpg" for p in sorted((faces / "valid" / "real").iterdir())]
    (meta,) = (tmp_path / "root").rglob("meta.json")
    meta = json.loads(meta.read_text())
    assert meta["sources"] == ["real-vs-fake", "twins"] and meta["splits"]["test"]["fake"] == 8
    client, version = registered(tmp_path)
    run = client.get_run(version.run_id)
    assert run.data.params["twins.epochs"] == "2" and "valid_auc.twins" in run.data.metrics


@pytest.mark.slow
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
    result = run_pipeline_cli("submit", "--params", PARAMS, "--package", str(package),
                              "--host", f"http://127.0.0.1:{port}", "-p", "train.epochs=2")
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
        result = run_pipeline_cli("submit", "--params", PARAMS, "--package", str(package),
                                  "--host", f"http://127.0.0.1:{server.getsockname()[1]}", "--timeout", "2")
        assert time.monotonic() - start < 15
        assert result.returncode == 2 and "timed out" in result.stderr and "Traceback" not in result.stderr
    finally:
        server.close()


def test_submit_rejects_unknown_or_mistyped_parameters(tmp_path):
    package = tmp_path / "pipeline.yaml"
    package.write_text("{}")
    for bad, message in (("train.epoch=3", "not KEY=VALUE with a key"), ("train_epochs=many", "must be int")):
        result = run_pipeline_cli("submit", "--params", PARAMS, "--package", str(package),
                                  "--host", "http://127.0.0.1:9", "-p", bad)
        assert result.returncode == 2 and message in result.stderr, result.stderr


def test_pipeline_cli_without_kfp_names_the_extra():
    """The script is installed with the core, kfp only with the kubeflow extra."""
    code = "import sys; sys.modules['kfp'] = None; from pipeline.cli import main; sys.exit(main(['compile']))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "needs the kubeflow extra" in result.stderr and "pip install -e '.[kubeflow]'" in result.stderr


API = "/apis/v2beta1"
# Python type of each KFP parameter type: what a run's runtime_config must send for it.
KFP_TYPES = {"NUMBER_INTEGER": int, "NUMBER_DOUBLE": float, "BOOLEAN": bool, "STRING": str}


class KfpApi(HTTPServer):
    """A stand-in for the KFP v2beta1 REST API on loopback: what kfp 2.x's ``Client`` calls to start a
    run from a package (healthz; find, else create, the experiment; create the run), answered with the
    fields the client reads, every request recorded."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), KfpApiHandler)  # port 0: a free one, picked by the OS
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.requests: list[dict] = []
        self.experiments: list[dict] = []
        self.runs: list[dict] = []

    def calls(self, method: str, path: str) -> list[dict]:
        return [r for r in self.requests if (r["method"], r["path"]) == (method, API + path)]

    def answer(self, method: str, path: str, query: dict, body: dict | None) -> tuple[int, dict]:
        created = {"created_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                   "storage_state": "AVAILABLE"}
        if (method, path) == ("GET", f"{API}/healthz"):
            return 200, {"multi_user": False}
        if (method, path) == ("GET", f"{API}/experiments"):
            (predicate,) = json.loads(query["filter"])["predicates"]
            found = [e for e in self.experiments
                     if (predicate["operation"], predicate["key"]) == (1, "display_name")  # 1: EQUALS
                     and e["display_name"] == predicate["stringValue"]
                     and e["namespace"] == query.get("namespace", "")]
            return 200, {"experiments": found, "total_size": len(found)}
        if (method, path) == ("POST", f"{API}/experiments"):
            experiment = {"experiment_id": str(uuid.uuid4()), "display_name": body["display_name"],
                          "namespace": body.get("namespace", ""), **created}
            self.experiments.append(experiment)
            return 200, experiment
        if (method, path) == ("POST", f"{API}/runs") and body.get("experiment_id") in [
                e["experiment_id"] for e in self.experiments]:
            run = {**body, "run_id": str(uuid.uuid4()), "state": "PENDING", **created}
            self.runs.append(run)
            return 200, run
        return 404, {"error": "not found", "code": 5, "message": f"{method} {path}: not found", "details": []}


class KfpApiHandler(BaseHTTPRequestHandler):
    timeout = 10  # a client that stalls mid-request cannot hold the server

    def do_GET(self) -> None:
        self.reply("GET")

    def do_POST(self) -> None:
        self.reply("POST")

    def reply(self, method: str) -> None:
        url = urllib.parse.urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        query = dict(urllib.parse.parse_qsl(url.query))
        self.server.requests.append({"method": method, "path": url.path, "query": query, "body": body,
                                     "authorization": self.headers.get("Authorization")})
        status, answer = self.server.answer(method, url.path, query, body)
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:  # recorded in server.requests instead
        pass


@pytest.fixture
def kfp_api():
    """The stand-in, serving from a thread for the test's duration."""
    server = KfpApi()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    thread.join(timeout=10)
    server.server_close()


def assert_typed_as_declared(parameters: dict, pipeline_spec: dict) -> None:
    declared = pipeline_spec["root"]["inputDefinitions"]["parameters"]
    assert {k: type(v) for k, v in parameters.items()} == {
        k: KFP_TYPES[declared[k]["parameterType"]] for k in parameters}


def test_submit_sends_the_compiled_spec_and_typed_parameters(tmp_path, kfp_api):
    """Two submits: the first creates the experiment, the second finds it by name."""
    package = tmp_path / "pipeline.yaml"
    pipeline_spec, platform_spec = compile_package(package)
    argv = ["submit", "--params", PARAMS, "--host", kfp_api.url, "--package", str(package),
            "--run-name", "ci-run", "--token", "t0ken", "-p", "train.epochs=3", "-p", "train_lr=0.01",
            "-p", "train.channels_last=false", "-p", "model.channels=[8, 16]",
            "-p", "data.source=dvc:https://example.org/r@v1"]
    outputs = []
    for _ in range(2):
        result = run_pipeline_cli(*argv, env=client_env(tmp_path))
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout)

    (experiment,) = kfp_api.experiments
    assert experiment["display_name"] == "deepfake-detector" and experiment["namespace"] == ""
    assert len(kfp_api.calls("GET", "/experiments")) == 2 and len(kfp_api.calls("POST", "/experiments")) == 1
    posted = kfp_api.calls("POST", "/runs")
    assert len(posted) == len(kfp_api.runs) == 2
    for request, run, stdout in zip(posted, kfp_api.runs, outputs):
        body = request["body"]
        assert body["experiment_id"] == experiment["experiment_id"] and body["display_name"] == "ci-run"
        assert body["pipeline_spec"] == {"pipeline_spec": pipeline_spec, "platform_spec": platform_spec}
        parameters = body["runtime_config"]["parameters"]
        assert parameters == {"train_epochs": 3, "train_lr": 0.01, "train_channels_last": False,
                              "model_channels": "8,16", "data_source": "dvc:https://example.org/r@v1"}
        assert_typed_as_declared(parameters, pipeline_spec)
        assert request["authorization"] == "Bearer t0ken"
        assert f"submitted run {run['run_id']}: {kfp_api.url}/#/runs/details/{run['run_id']}" in stdout


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of each fenced block, dedented (blocks inside list items are indented)."""
    return [(lang, textwrap.dedent(code))
            for lang, code in re.findall(r"^[ \t]*```(\w*)\n(.*?)^[ \t]*```", text, re.M | re.S)]


def shell_commands(code: str) -> list[list[str]]:
    """The words of each command in a shell snippet: continuation lines joined, comments dropped."""
    lines = code.replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if shlex.split(line, comments=True)]


# Commands of the README's cluster snippets that no test can run here, and why.
README_SKIPPED = {"docker": "needs a Docker daemon: test_dockerfile_* reads the Dockerfile instead",
                  "kubectl": "needs a cluster: the port-forward's address is the stand-in's here",
                  "torchrun": "multi-node training, on paper only (the README says so)"}


def test_readme_cluster_snippets_run_against_kfp(tmp_path, kfp_api):
    """Every shell command of "Run on Kubeflow", as written, in a folder laid out like a checkout:
    `deepfake-pipeline compile` for real, `submit` to the stand-in (its address in place of
    http://localhost:8080). docker, kubectl and torchrun commands are skipped (README_SKIPPED says
    why); any other command fails the test, so a new snippet cannot go untested unnoticed."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    shutil.copy(ROOT / "params.yaml", checkout)
    (checkout / ".venv").symlink_to(sys.prefix)  # the snippets' .venv/bin/deepfake-pipeline
    ran, skipped = {}, set()
    for lang, code in fenced_blocks(readme_section("Run on Kubeflow")):
        for words in shell_commands(code) if lang == "bash" else []:
            if words[0] in README_SKIPPED:
                skipped.add(words[0])
                continue
            assert Path(words[0]).name == "deepfake-pipeline", f"README command not run by any test: {words}"
            command = shlex.join(words).replace("http://localhost:8080", kfp_api.url)
            result = subprocess.run(["bash", "-c", command], cwd=checkout, env=client_env(tmp_path),
                                    capture_output=True, text=True, timeout=120)
            assert result.returncode == 0, f"{command}\n{result.stderr}"
            ran[words[1]] = (words, result.stdout)
    assert set(ran) == {"compile", "submit"} and skipped == set(README_SKIPPED)

    option = lambda words, name: [words[i + 1] for i, w in enumerate(words) if w == name]  # noqa: E731
    compile_words, submit = ran["compile"][0], ran["submit"][0]
    pipeline_spec, platform_spec = yaml.safe_load_all((checkout / option(compile_words, "--out")[0]).read_text())
    assert pipeline_spec["deploymentSpec"]["executors"]["exec-train"]["container"]["image"] == option(
        compile_words, "--image")[0]
    (experiment,) = kfp_api.experiments
    assert experiment["display_name"] == option(submit, "--experiment")[0]
    assert experiment["namespace"] == option(submit, "--namespace")[0]
    (run,) = kfp_api.runs
    assert run["experiment_id"] == experiment["experiment_id"]
    assert run["display_name"] == option(submit, "--run-name")[0]
    assert run["pipeline_spec"] == {"pipeline_spec": pipeline_spec, "platform_spec": platform_spec}
    parameters = run["runtime_config"]["parameters"]
    assert set(parameters) == {p.partition("=")[0].replace(".", "_") for p in option(submit, "-p")}
    assert_typed_as_declared(parameters, pipeline_spec)
    assert f"{kfp_api.url}/#/runs/details/{run['run_id']}" in ran["submit"][1]


@pytest.mark.slow
@needs_faces
def test_readme_local_pipeline_snippet_runs(tmp_path):
    """The README's kfp.local snippet, as written, on faces-mini in place of /path/to/faces."""
    (code,) = [code for lang, code in fenced_blocks(readme_section("Run on Kubeflow")) if lang == "python"]
    shutil.copy(ROOT / "params.yaml", tmp_path)
    snippet = tmp_path / "snippet.py"
    snippet.write_text(code.replace("/path/to/faces", str(FACES_MINI)))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # params.yaml's sqlite file, here
    result = subprocess.run([sys.executable, str(snippet)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=1200)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    client, _ = registered(tmp_path)
    (run,) = client.search_runs([client.get_experiment_by_name("deepfake-detector").experiment_id])
    assert run.data.params["train.epochs"] == "1" and "test_roc_auc" in run.data.metrics


def dockerfile_steps() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of each Dockerfile instruction: comments dropped, continuations joined."""
    lines = [line for line in (ROOT / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")]
    steps = [line.strip().partition(" ") for line in "\n".join(lines).replace("\\\n", " ").splitlines()]
    return [(keyword.upper(), " ".join(args.split())) for keyword, _, args in steps if keyword]


def extras(text: str) -> set[str]:
    """The extras of every ``.[a,b]`` install in ``text``."""
    return {extra for group in re.findall(r"\.\[([\w,-]+)\]", text) for extra in group.split(",")}


def test_dockerfile_installs_dependencies_before_the_code_and_runs_as_a_user():
    steps = dockerfile_steps()
    at = lambda keyword, test: [i for i, (k, args) in enumerate(steps) if k == keyword and test(args)]  # noqa: E731
    (copy_src,) = at("COPY", lambda args: args.split()[0] == "src")
    deps, project = at("RUN", lambda args: "pip install" in args)
    # Dependencies in a layer of their own, before any code is copied: editing code reuses it.
    assert deps < copy_src < project and "--no-deps" in steps[project][1]
    assert not [i for i in at("COPY", lambda args: {"src", "components", "pipeline", "."} & set(args.split()[:-1]))
                if i < deps]
    # The extras the README tells people to install for the cluster, and ONNX Runtime for the steps that score.
    assert extras(steps[deps][1]) == extras(readme_section("Run on Kubeflow")) | {"onnx"} == {"kubeflow", "onnx"}
    users = at("USER", lambda args: True)
    assert users and users[-1] > project and steps[users[-1]][1].partition(":")[0] not in ("root", "0")
    assert at("ENV", lambda args: "HOME=" in args)


def test_dockerfile_can_bake_torchvision_weights_into_the_image():
    """`--build-arg TORCHVISION_WEIGHTS="resnet18 ..."` downloads those weights into the image's
    torch cache at build time, after torchvision is installed and before the user switch."""
    steps = dockerfile_steps()
    keywords = [k for k, _ in steps]
    arg = next(i for i, (k, args) in enumerate(steps) if k == "ARG" and args.startswith("TORCHVISION_WEIGHTS="))
    fetch = next(i for i, (k, args) in enumerate(steps) if k == "RUN" and "$TORCHVISION_WEIGHTS" in args)
    project = max(i for i, (k, args) in enumerate(steps) if k == "RUN" and "pip install" in args)
    assert project < arg < fetch < keywords.index("USER")
    assert "get_model_weights" in steps[fetch][1] and "check_hash=True" in steps[fetch][1]
    assert any(k == "ENV" and "TORCH_HOME=" in args for k, args in steps[:fetch])


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


@pytest.mark.slow
@needs_faces
def test_mlproject_main_runs_with_the_local_env(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    for name in ("MLproject", "python_env.yaml"):
        shutil.copy(ROOT / name, project / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())  # the small custom CNN: seconds, not minutes
    params["model"] |= {"arch": "cnn", "pretrained": "none", "channels": [8, 16], "hidden": 8}
    params["mlflow"]["register_min_auc"] = 0.0
    (project / "params.yaml").write_text(yaml.safe_dump(params))
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
