"""The register step: the trained model, with the decision settings and model card that the
evaluate stage wrote, logged as an MLflow model, registered, and ``mlflow.alias`` moved to it.

Under DVC and MLproject the evaluate stage calls it; on Kubeflow it is a step of its own that
takes evaluate's output folder as an artifact. Either way it reads the decision, never rebuilds it.
"""

from __future__ import annotations

import io
import json
import math
import tempfile
from pathlib import Path

from PIL import Image

from deepfake_detector.detector import DECISION_FILE, Decision, Detector, decision_file
from deepfake_detector.errors import UserError
from deepfake_detector.params import Params
from deepfake_detector.tracking import RUN_FILE, Tracker, save_model

METRICS_FILE, CARD_FILE = "metrics.json", "model_card.md"


def run(p: Params, model_dir: Path, evaluation: Path) -> str | None:
    """Register ``model_dir``'s model with ``evaluation``'s ``detector.json`` beside it and its
    ``model_card.md`` as the version's description; returns the version.

    Nothing is registered when the test ROC AUC (``metrics.json``) is below
    ``mlflow.register_min_auc`` or undefined, or when tracking is off.
    """
    model_dir, evaluation = Path(model_dir), Path(evaluation)
    metrics = json.loads((evaluation / METRICS_FILE).read_text())
    auc = metrics["roc_auc"] if metrics["roc_auc"] is not None else math.nan  # null: one class, no AUC
    if not auc >= p.mlflow.register_min_auc:  # also refuses a NaN AUC
        print(f"not registered: test ROC AUC {auc:.4f} < mlflow.register_min_auc {p.mlflow.register_min_auc}")
        return None
    tracker = Tracker.resume(p.mlflow, model_dir / RUN_FILE)
    if not tracker.active:
        return None
    checkpoint, decision = model_dir / "model.pt", evaluation / DECISION_FILE
    settings = Decision.read(decision)
    with tracker.running():
        model_uri = tracker.log_model(checkpoint, decision, example_image(checkpoint, settings))
    tags = {"test_roc_auc": f"{auc:.4f}", "test_accuracy": f"{metrics['accuracy']:.4f}",
            "threshold": f"{settings.threshold:.6f}", "threshold_rule": settings.rule,
            "crop_faces": str(settings.crop_faces).lower(), "min_source_size": str(settings.min_source_size)}
    return tracker.register(model_uri, tags, (evaluation / CARD_FILE).read_text())


def example_image(checkpoint: Path, settings: Decision) -> bytes:
    """The input example shown with the model (and run through it by MLflow): a plain grey PNG the
    size of a face the model scores."""
    side = max(Detector.from_checkpoint(checkpoint, settings).image_size, settings.min_source_size)
    example = io.BytesIO()
    Image.new("RGB", (side, side), (128, 128, 128)).save(example, format="PNG")
    return example.getvalue()


def package(model_dir: Path, out: Path) -> None:
    """A model folder (``model.pt`` and the ``detector.json`` the evaluate stage keeps beside it) saved
    as the MLflow model the registry would hold, in ``out``: ``mlflow models serve -m OUT`` serves
    it with no tracking server or registry. A model never evaluated is packaged at threshold 0.5."""
    model_dir, out = Path(model_dir), Path(out)
    if out.exists():
        raise UserError(f"{out} exists: package writes a new folder")
    checkpoint = model_dir / "model.pt"
    detector = Detector.from_checkpoint(model_dir)  # refuses a folder without model.pt; says when 0.5 is used
    with tempfile.TemporaryDirectory() as tmp:
        decision = decision_file(checkpoint) or Path(tmp) / DECISION_FILE
        if not decision.exists():
            detector.decision.write(decision)
        save_model(out, checkpoint, decision, example_image(checkpoint, detector.decision))
