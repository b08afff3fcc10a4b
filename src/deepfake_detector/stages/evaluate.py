"""The evaluate stage: the test split scored with a threshold chosen on valid, logged with the model
card to the training run, and (under DVC and MLproject) the model registered."""

from __future__ import annotations

import json
from pathlib import Path

from deepfake_detector import evaluate
from deepfake_detector.atomic import replacing_dir, write_text
from deepfake_detector.card import model_card
from deepfake_detector.detector import DECISION_FILE
from deepfake_detector.device import resolve_device
from deepfake_detector.params import Params, flatten
from deepfake_detector.stages import register
from deepfake_detector.tracking import RUN_FILE, Tracker, run_tags


def run(p: Params, processed: Path, model_dir: Path, out: Path, register_model: bool = True) -> dict:
    """Score the test split into ``out`` (metrics, plots, ``detector.json``, the model card), log them
    to the training run and, if ``register_model``, register the model from ``out`` and keep a copy of
    ``detector.json`` beside it (a Kubeflow step's model is a read-only input: there ``register`` carries it).

    Returns the metrics, plus ``registered_version`` when a version was registered. ``out`` is
    replaced only once complete.
    """
    processed, model_dir, out = Path(processed), Path(model_dir), Path(out)
    train_run = Tracker.resume(p.mlflow, model_dir / RUN_FILE)
    eval_params = flatten({"evaluate": p.evaluate})
    logged = train_run.logged_params()
    if any(k in logged and logged[k] != str(v) for k, v in eval_params.items()):
        # Same model, new evaluate params: MLflow params are immutable, so use a child run.
        target = Tracker.start(p.mlflow, "re-evaluate", eval_params, run_tags(), train_run.run_id)
    else:
        target = train_run
        target.log_params({k: v for k, v in eval_params.items() if k not in logged})
    with target.running():
        with replacing_dir(out, evaluate.OUTPUTS) as staging:
            metrics = evaluate.run(processed, model_dir / "model.pt", staging, p.evaluate, resolve_device("auto"),
                                   p.seed)
            meta = json.loads((processed / "meta.json").read_text())
            download_info = meta.get("download") or {}
            data_info = {"source": download_info.get("source"), **run_tags(), **{
                f"dvc_{k}": v for k, v in (download_info.get("dvc") or {}).items()},
                "images (train/valid/test)": "/".join(str(s["images"]) for s in meta["splits"].values())}
            card = model_card(p.mlflow.model_name, metrics, {**logged, **eval_params}, data_info, train_run.run_id)
            (staging / register.CARD_FILE).write_text(card)
        target.log_metrics({f"test_{k}": v for k, v in flatten(metrics).items()})
        target.log_artifacts(out, "evaluation")
    if register_model:  # the pipeline's own model folder: a copy of it alone scores at this threshold
        write_text(model_dir / DECISION_FILE, (out / DECISION_FILE).read_text())
    version = register.run(p, model_dir, out) if register_model else None
    return {**metrics, **({"registered_version": version} if version else {})}
