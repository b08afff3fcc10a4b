"""The four pipeline stages (plus registration) wired to MLflow tracking.

Each takes the params and explicit paths and returns what it produced. The ``deepfake`` CLI (and
so ``dvc.yaml`` and ``MLproject``) and the Kubeflow components call these same functions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from deepfake_detector import data, evaluate as evaluation, preprocess as prep, train as training
from deepfake_detector.errors import UserError
from deepfake_detector.params import Params, flatten
from deepfake_detector.tracking import RUN_FILE, Tracker, run_tags


def download(p: Params, out: Path) -> dict:
    """Fetch ``data.source`` into ``out``; returns the source info and file counts."""
    return data.download(p.data.source, Path(out), p.data.sha256, p.download.timeout_s, p.download.retries)


def preprocess(p: Params, raw: Path, out: Path, workers: int | None = None, progress: bool = False) -> dict:
    """Validate, resize and degrade ``raw`` into ``out``; returns the report written to ``meta.json``."""
    return prep.run(Path(raw), Path(out), p.preprocess, p.seed, workers, progress)


def train(p: Params, processed: Path, out: Path, progress: bool = False) -> dict:
    """Train on ``processed`` into ``out`` inside a new MLflow run; returns the best epoch's summary."""
    import torch

    from deepfake_detector.model import load_checkpoint, to_input

    processed, out = Path(processed), Path(out)
    meta_file = processed / "meta.json"
    if not meta_file.exists():
        raise UserError(f"{meta_file} not found: run the preprocess stage first")
    meta = json.loads(meta_file.read_text())
    device = training.resolve_device(p.train.device)
    # Data params come from what actually built the data (meta.json), not today's params.yaml.
    logged = {**flatten({"seed": p.seed, "model": p.model, "train": p.train}),
              **flatten({"preprocess": meta["params"]}),
              "data.source": (meta.get("download") or {}).get("source", "unknown")}
    exp_name = os.environ.get("DVC_EXP_NAME")
    tags = {**run_tags(), "device": str(device), **({"dvc.exp_name": exp_name} if exp_name else {})}
    # Data fetched from a DVC repository (e.g. on Kubeflow): record which version it was.
    dvc_source = (meta.get("download") or {}).get("dvc") or {}
    tags |= {f"data.dvc_{k}": str(v) for k, v in dvc_source.items() if v}
    tracker = Tracker.start(p.mlflow, exp_name, logged, tags)
    with tracker.running():
        tracker.log_metrics({f"data.{split}_images": s["images"] for split, s in meta["splits"].items()}
                            | {"data.quarantined": meta["quarantined"]})
        summary = training.fit(processed, out, p.model, p.train, device, p.seed,
                               on_epoch=lambda epoch, m: tracker.log_metrics(m, step=epoch), progress=progress)
        tracker.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        for name in ("history.csv", "train.json"):
            tracker.log_artifacts(out / name, "train")
        tracker.log_artifacts(meta_file, "data")
        model, _ = load_checkpoint(out / "model.pt")
        valid_x, _ = prep.load_split(processed, "valid")
        model_uri = tracker.log_model(model, to_input(torch.from_numpy(valid_x[:2].copy())).numpy())
    tracker.save(out / RUN_FILE, model_uri)
    return {**summary, "run_id": tracker.run_id}


def evaluate(p: Params, processed: Path, model_dir: Path, out: Path, register: bool = True) -> dict:
    """Score the test split, log it to the training run, and (optionally) register the model.

    Returns the metrics, plus ``registered_version`` when a version was registered.
    """
    model_dir = Path(model_dir)
    train_run, _ = Tracker.resume(p.mlflow, model_dir / RUN_FILE)
    eval_params = flatten({"evaluate": p.evaluate})
    logged = train_run.logged_params()
    if any(k in logged and logged[k] != str(v) for k, v in eval_params.items()):
        # Same model, new evaluate params: MLflow params are immutable, so use a child run.
        target = Tracker.start(p.mlflow, "re-evaluate", eval_params, run_tags(), train_run.run_id)
    else:
        target = train_run
        target.log_params({k: v for k, v in eval_params.items() if k not in logged})
    with target.running():
        metrics = evaluation.run(Path(processed), model_dir / "model.pt", Path(out), p.evaluate,
                                 training.resolve_device("auto"))
        target.log_metrics({f"test_{k}": v for k, v in metrics.items()})
        target.log_artifacts(Path(out), "evaluation")
    version = register_model(p, model_dir, metrics) if register else None
    return {**metrics, **({"registered_version": version} if version else {})}


def register_model(p: Params, model_dir: Path, metrics: dict) -> str | None:
    """Register the model trained into ``model_dir`` and point ``mlflow.alias`` at it.

    Nothing is registered when the test ROC AUC is below ``mlflow.register_min_auc``.
    """
    if not metrics["roc_auc"] >= p.mlflow.register_min_auc:  # also refuses a NaN AUC
        print(f"not registered: test ROC AUC {metrics['roc_auc']:.4f} < mlflow.register_min_auc "
              f"{p.mlflow.register_min_auc}")
        return None
    tracker, model_uri = Tracker.resume(p.mlflow, Path(model_dir) / RUN_FILE)
    return tracker.register(model_uri, {"test_roc_auc": f"{metrics['roc_auc']:.4f}",
                                        "test_accuracy": f"{metrics['accuracy']:.4f}"})
