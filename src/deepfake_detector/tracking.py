"""MLflow tracking and registry: the only module that imports mlflow.

One MLflow run per trained model. The train stage opens it (params, data lineage, per-epoch
metrics, the logged model) and records its id in ``run.json`` next to the checkpoint; the
evaluate stage reopens that run to add test metrics and plots, then registers the model and
points the alias (``challenger``) at the new version. DVC runs stages as separate processes,
so the id travels through a file rather than an active-run context. A run whose evaluate
params were already logged with other values (re-evaluating the same model with a new
threshold) logs to a child run instead, because MLflow params are immutable.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature

from deepfake_detector.backends import ONNX_FILE, onnxruntime_installed
from deepfake_detector.errors import UserError
from deepfake_detector.params import MlflowParams, project_root

RUN_FILE = "run.json"
PACKAGE_DIR = Path(__file__).resolve().parent
# What the serving path (serving.py and the modules it imports) needs, as pip names; a test
# checks it against what importing serving.py actually loads.
SERVING_REQUIREMENTS = ("torch", "numpy", "pillow", "pandas", "opencv-python-headless", "pyyaml", "tqdm",
                        "onnxruntime")  # onnxruntime where installed: the faster backend


class TrackingError(UserError):
    """The tracking server or registry cannot be used."""


def tracking_uri(params: MlflowParams) -> str:
    """``MLFLOW_TRACKING_URI`` when set, else the params' URI (an sqlite file in the repo by default,
    a relative path taken from the project root, so queued ``dvc exp run``s log to the repo's store)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params.tracking_uri
    path = uri.removeprefix("sqlite:///")
    if uri.startswith("sqlite:///") and not Path(path).is_absolute():
        return f"sqlite:///{project_root() / path}"
    return uri


class Tracker:
    """Logs to one MLflow run; every method is a no-op when tracking is disabled."""

    def __init__(self, params: MlflowParams, run_id: str | None = None) -> None:
        self.params, self.run_id = params, run_id
        if params.enabled:
            connect(params)

    @property
    def active(self) -> bool:
        return self.params.enabled and self.run_id is not None

    @classmethod
    def start(cls, params: MlflowParams, run_name: str | None, log_params: dict[str, Any],
              tags: dict[str, str], parent_run_id: str | None = None) -> Tracker:
        """Create a run in the configured experiment (a child of ``parent_run_id`` if given).

        Under ``mlflow run`` (which sets ``MLFLOW_RUN_ID``) the project run it made is used instead.
        """
        tracker = cls(params)
        if params.enabled:
            with _errors("start an MLflow run"):
                client = MlflowClient()
                if parent_run_id:
                    tags = {**tags, "mlflow.parentRunId": parent_run_id}
                elif os.environ.get("MLFLOW_RUN_ID"):
                    tracker.run_id = os.environ["MLFLOW_RUN_ID"]
                    for key, value in tags.items():
                        client.set_tag(tracker.run_id, key, value)
                if tracker.run_id is None:
                    # Not mlflow.set_experiment: it also exports MLFLOW_EXPERIMENT_ID to this process's
                    # environment, which every later subprocess (`mlflow run`, say) would inherit.
                    experiment = client.get_experiment_by_name(params.experiment)
                    # A local store keeps artifacts beside it, in the project (not a temporary clone's cwd).
                    local = tracking_uri(params).startswith("sqlite:///")
                    location = (project_root() / "mlruns").as_uri() if local else None
                    experiment_id = (experiment.experiment_id if experiment
                                     else client.create_experiment(params.experiment, artifact_location=location))
                    tracker.run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
                tracker.log_params(log_params)
        return tracker

    @classmethod
    def resume(cls, params: MlflowParams, run_file: Path) -> Tracker:
        """Reopen the run recorded by the train stage in ``run_file``."""
        run_file = Path(run_file)
        info = json.loads(run_file.read_text()) if run_file.exists() else {}
        return cls(params, info.get("run_id"))

    def save(self, run_file: Path) -> None:
        """Record the run for the evaluate stage."""
        uri = tracking_uri(self.params) if self.params.enabled else None
        Path(run_file).write_text(json.dumps({"run_id": self.run_id, "tracking_uri": uri}, indent=2) + "\n")

    @classmethod
    def reopen(cls, params: MlflowParams, run_id: str) -> Tracker:
        """Continue the run ``run_id`` (a resumed training run logs on to the run it started)."""
        return cls(params, run_id if params.enabled else None)

    @contextmanager
    def running(self, pending_end: Path | None = None) -> Iterator[None]:
        """Make the run active for the block; it ends KILLED if the block is interrupted (Ctrl-C,
        SIGTERM), FAILED if it raises, FINISHED otherwise.

        A server that does not answer when the run ends must not hide what happened: the status
        is then written to ``pending_end`` and set by :func:`end_pending` once the server is back.
        """
        if not self.active:
            yield
            return
        with _errors("open the MLflow run"):
            mlflow.start_run(run_id=self.run_id)
        try:
            yield
        except BaseException as exc:
            self._end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED", pending_end)
            raise
        self._end("FINISHED", pending_end)

    def _end(self, status: str, pending_end: Path | None) -> None:
        try:
            mlflow.end_run(status)
        except (MlflowException, OSError) as exc:
            if pending_end is None:
                raise
            Path(pending_end).parent.mkdir(parents=True, exist_ok=True)
            Path(pending_end).write_text(json.dumps({"run_id": self.run_id, "status": status}) + "\n")
            print(f"warning: MLflow did not answer ({_first_line(exc)}); run {self.run_id} is marked "
                  f"{status} by the next train stage that reaches the server", file=sys.stderr)

    def metric_log(self) -> MetricLog | None:
        """A background sender for this run's metrics (None when tracking is off)."""
        return MetricLog(self.run_id) if self.active else None

    def logged_steps(self, key: str) -> set[int]:
        """The steps at which metric ``key`` reached this run (empty when tracking is off)."""
        if not self.active:
            return set()
        with _errors(f"read metric {key}"):
            return {m.step for m in MlflowClient().get_metric_history(self.run_id, key)}

    def log_params(self, values: dict[str, Any]) -> None:
        if self.active:
            with _errors("log params"):
                MlflowClient().log_batch(self.run_id, params=[Param(k, str(v)) for k, v in values.items()])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        if self.active:
            now = int(time.time() * 1000)
            with _errors("log metrics"):
                MlflowClient().log_batch(self.run_id, metrics=[
                    Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_artifacts(self, path: Path, artifact_path: str | None = None) -> None:
        if self.active:
            with _errors("log artifacts"):
                if Path(path).is_dir():
                    MlflowClient().log_artifacts(self.run_id, str(path), artifact_path)
                else:
                    MlflowClient().log_artifact(self.run_id, str(path), artifact_path)

    def log_model(self, checkpoint: Path, decision: Path, example_image: bytes) -> str | None:
        """Log the model (:func:`pyfunc_model`) to this run; call inside :meth:`running`."""
        if not self.active:
            return None
        with _errors("log the model"):
            return mlflow.pyfunc.log_model(name="model", **pyfunc_model(checkpoint, decision, example_image)).model_uri

    def logged_params(self) -> dict[str, str]:
        if not self.active:
            return {}
        with _errors("read the run"):
            return MlflowClient().get_run(self.run_id).data.params

    def register(self, model_uri: str | None, tags: dict[str, str], description: str | None = None) -> str | None:
        """Register the logged model ``model_uri`` and point the alias at the new version."""
        if not self.active or not model_uri:
            return None
        name, alias = self.params.model_name, self.params.alias
        with _errors(f"register model {name!r}"):
            version = mlflow.register_model(model_uri, name, tags=tags)
            client = MlflowClient()
            if description:
                client.update_model_version(name, version.version, description=description)
            client.set_registered_model_alias(name, alias, version.version)
        return str(version.version)

    def text_artifact(self, path: str) -> str | None:
        """A text file logged to this run, or None if there is none."""
        if not self.active:
            return None
        try:
            return mlflow.artifacts.load_text(f"runs:/{self.run_id}/{path}")
        except (MlflowException, OSError):
            return None


class MetricLog:
    """Metrics sent by a background thread, so training never waits on the tracking server.

    A failed send warns once and keeps the metrics; they are sent when the server answers again
    (tried every ``retry_s``), or by :meth:`flush` at the end of the stage.
    """

    def __init__(self, run_id: str, retry_s: float = 5.0) -> None:
        self.run_id, self.retry_s = run_id, retry_s
        self.pending: list[Metric] = []
        self.failing = False
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.idle = threading.Event()
        self.idle.set()
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="mlflow-metrics", daemon=True)
        self.thread.start()

    def add(self, metrics: dict[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        with self.lock:
            self.pending.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
            self.idle.clear()
        self.wake.set()

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every metric to reach the server; True if they did."""
        self.wake.set()
        return self.idle.wait(timeout)

    def close(self, timeout: float) -> int:
        """Flush, stop the thread; returns how many metrics could not be sent."""
        self.flush(timeout)
        self.closed = True
        self.wake.set()
        self.thread.join(timeout=1)
        with self.lock:
            return len(self.pending)

    def _run(self) -> None:
        while not self.closed:
            self.wake.wait(self.retry_s if self.failing else None)
            self.wake.clear()
            with self.lock:
                batch = self.pending[:1000]  # MLflow's limit per log_batch
                if not batch:
                    self.idle.set()
                    continue
            try:
                MlflowClient().log_batch(self.run_id, metrics=batch)
            except Exception as exc:  # any failure of the server or the network: keep the metrics, go on
                if not self.failing:
                    print(f"warning: MLflow did not take the metrics ({_first_line(exc)}); training goes "
                          f"on and they are sent when the server answers", file=sys.stderr)
                self.failing = True
                continue
            if self.failing:
                print("MLflow answers again: buffered metrics sent", file=sys.stderr)
            self.failing = False
            with self.lock:
                del self.pending[:len(batch)]
                if self.pending:
                    self.wake.set()
                else:
                    self.idle.set()


def end_pending(params: MlflowParams, pending_end: Path, resuming: str | None) -> None:
    """Set the status a run could not get when it ended (the server was down), unless it is the run
    being resumed now, which goes on."""
    pending_end = Path(pending_end)
    if not pending_end.exists():
        return
    info = json.loads(pending_end.read_text())
    if info["run_id"] != resuming and params.enabled:
        with _errors(f"end run {info['run_id']}"):
            connect(params).set_terminated(info["run_id"], info["status"])
        print(f"MLflow run {info['run_id']} marked {info['status']} (it ended while the server was down)")
    pending_end.unlink()


def connect(params: MlflowParams) -> MlflowClient:
    """A client for the registry; a server that does not answer fails in seconds, not minutes."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    mlflow.set_tracking_uri(tracking_uri(params))
    return MlflowClient()


def alias_version(params: MlflowParams, alias: str) -> tuple[str, dict[str, float]] | None:
    """The version of ``params.model_name`` under ``alias`` and its run's metrics; None if unset."""
    client = connect(params)
    with _errors(f"read {params.model_name}@{alias}"):
        try:
            version = client.get_model_version_by_alias(params.model_name, alias)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise
        metrics = client.get_run(version.run_id).data.metrics if version.run_id else {}
    return str(version.version), metrics


def move_alias(params: MlflowParams, alias: str, version: str, tags: dict[str, str]) -> None:
    """Point ``alias`` at ``version`` (unless ``alias`` is empty) and tag that version."""
    client = connect(params)
    with _errors(f"update {params.model_name} version {version}"):
        for key, value in tags.items():
            client.set_model_version_tag(params.model_name, version, key, value)
        if alias:
            client.set_registered_model_alias(params.model_name, alias, version)


def registered_version(model_uri: str, params: MlflowParams) -> str | None:
    """Version number of a ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``; None for other URIs."""
    if not model_uri.startswith("models:/"):
        return None
    name, _, ref = model_uri.removeprefix("models:/").partition("@")
    client = connect(params)
    with _errors(f"read {model_uri}"):
        if ref:
            version = client.get_model_version_by_alias(name, ref)
        else:
            name, _, number = name.partition("/")
            version = client.get_model_version(name, number)
    return str(version.version)


def run_tags(cwd: Path = Path(".")) -> dict[str, str]:
    """Git commit and DVC data hashes, so a run names the exact code and data it used."""
    tags: dict[str, str] = {}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                                timeout=10)
        if commit.returncode == 0:
            tags["mlflow.source.git.commit"] = commit.stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                   capture_output=True, text=True, timeout=10)
            tags["git.dirty"] = str(bool(dirty.stdout.strip())).lower()
    except (OSError, subprocess.SubprocessError):
        pass  # not a git checkout (a container, a tarball): no commit to record
    lock = Path(cwd) / "dvc.lock"
    if lock.exists():
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        for stage in stages.values():
            for out in stage.get("outs", []):
                if out.get("path", "").startswith("data/") and "md5" in out:
                    tags[f"dvc.md5.{out['path']}"] = out["md5"]
    return tags


def pyfunc_model(checkpoint: Path, decision: Path, example_image: bytes) -> dict[str, Any]:
    """The model as a pyfunc from code (``serving.py``), as ``mlflow.pyfunc.log_model`` and
    ``save_model`` take it: base64 image files in; ``p_fake``, ``predicted``, ``unfamiliarity``,
    ``familiar``, ``face``, ``face_box`` and ``error`` out.

    The checkpoint (weights only) and the decision settings are artifacts beside the code, and
    this package rides along as ``code_paths``: nothing is pickled. The serving environment
    lists what the serving path imports (:data:`SERVING_REQUIREMENTS`), pinned to this one.
    """
    from importlib.metadata import version

    example = pd.DataFrame({"image": [base64.b64encode(example_image).decode()]})
    signature = infer_signature(example, pd.DataFrame({"p_fake": [0.5], "predicted": ["real"], "unfamiliarity": [0.5],
                                                       "familiar": [True], "face": ["cropped"],
                                                       "face_box": ["0 0 8 8"], "error": [""]}))
    onnx = checkpoint.parent / ONNX_FILE
    return {"python_model": str(PACKAGE_DIR / "serving.py"),
            "artifacts": {"checkpoint": str(checkpoint), "decision": str(decision),
                          **({"onnx": str(onnx)} if onnx.is_file() else {})},
            "code_paths": [str(PACKAGE_DIR)], "signature": signature, "input_example": example,
            "pip_requirements": [f"{name}=={version(name).split('+')[0]}" for name in SERVING_REQUIREMENTS
                                 if name != "onnxruntime" or onnxruntime_installed()]}


def save_model(out: Path, checkpoint: Path, decision: Path, example_image: bytes) -> None:
    """Write the model (:func:`pyfunc_model`) as an MLflow model folder, ``out``, which
    ``mlflow models serve -m OUT`` serves without a tracking server or registry."""
    with _errors(f"save the model to {out}"):
        mlflow.pyfunc.save_model(path=str(out), **pyfunc_model(checkpoint, decision, example_image))


def download_model(model_uri: str, params: MlflowParams | None = None) -> tuple[Path, str]:
    """Download a logged or registered pyfunc's checkpoint and decision settings (files only: no
    code runs, nothing is unpickled); returns the folder holding them and a description."""
    from mlflow.artifacts import download_artifacts

    uri = tracking_uri(params or MlflowParams())
    store = Path(uri.removeprefix("sqlite:///"))
    if uri.startswith("sqlite:///") and not store.is_file():  # opening it would create an empty store
        raise TrackingError(f"{model_uri}: no MLflow store at {store} to look it up in (set MLFLOW_TRACKING_URI, "
                            "or give a model folder with model.pt)")
    connect(params or MlflowParams())
    version = registered_version(model_uri, params or MlflowParams())
    with _errors(f"download {model_uri}"):
        local = Path(download_artifacts(artifact_uri=model_uri))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    artifacts = mlmodel["flavors"]["python_function"].get("artifacts", {})
    if "checkpoint" not in artifacts:
        raise TrackingError(f"{model_uri} is not a model logged by this project (no checkpoint artifact)")
    folder = local / Path(artifacts["checkpoint"]["path"]).parent
    return folder, f"{model_uri} (version {version})" if version else model_uri


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__


@contextmanager
def _errors(action: str) -> Iterator[None]:
    """Turn MLflow and connection failures into a one-line :class:`TrackingError`."""
    try:
        yield
    except (MlflowException, OSError) as exc:
        raise TrackingError(f"cannot {action} at {mlflow.get_tracking_uri()}: {_first_line(exc)}") from exc
