"""The pipeline's components, built for a given project image.

Each function body is what runs in the container: it rebuilds :class:`Params` from the flat
``params`` dict, which holds exactly its stage's keys (dotted, as ``deepfake_detector.contract``
lists them; the others keep their defaults, unread), calls the ``run`` of the matching
``deepfake_detector.stages`` module on the KFP artifact paths (train runs ``deepfake train``
under torchrun instead, one process per GPU) and records what it produced as artifact metadata.
Evaluate hands its output folder (metrics, ``detector.json``, the model card, plots) to register
as an artifact: the decision is made once.
KFP ships the body as source, so imports live inside it (and annotations must stay real types:
no ``from __future__ import annotations`` here).
"""

from types import SimpleNamespace

from kfp import dsl
from kfp.dsl import Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output


def download(params: dict, raw: Output[Dataset]) -> str:
    """Fetch ``data.source`` (Kaggle, URL, path, or ``dvc:REPO@REV``); returns the data version."""
    from deepfake_detector.contract import from_stage_params
    from deepfake_detector.stages import download as stage

    info = stage.run(from_stage_params("download", params), raw.path)
    raw.metadata.update({"source": info["source"], "files": info["files"], **info.get("dvc", {})})
    return (info.get("dvc") or {}).get("md5") or info["source"]


def twins(params: dict, raw: Input[Dataset], twins: Output[Dataset]) -> None:
    """Autoencoder twins of the raw real faces (``twins.enabled``; else a marker alone)."""
    from deepfake_detector.contract import from_stage_params
    from deepfake_detector.stages import twins as stage

    record = stage.run(from_stage_params("twins", params), raw.path, twins.path)
    twins.metadata.update({"enabled": record["enabled"], "seconds": record["seconds"],
                           **{source: sum(n.values()) for source, n in record.get("twins", {}).items()}})


def preprocess(params: dict, raw: Input[Dataset], twins: Input[Dataset], processed: Output[Dataset]) -> None:
    """Validate, resize and degrade the raw images, and the twins when made, into memory-mappable arrays."""
    from deepfake_detector.contract import from_stage_params
    from deepfake_detector.stages import preprocess as stage

    meta = stage.run(from_stage_params("preprocess", params), raw.path, processed.path, twins=twins.path)
    processed.metadata.update({split: s["images"] for split, s in meta["splits"].items()})
    processed.metadata["quarantined"] = meta["quarantined"]


def train(params: dict, processed: Input[Dataset], nproc_per_node: int, checkpoint_dir: str,
          model: Output[Model], metrics: Output[Metrics]) -> str:
    """Train the CNN under torchrun, ``nproc_per_node`` DDP processes; returns the MLflow run id.

    ``checkpoint_dir`` on a persistent volume lets a retried pod resume; "" keeps them in a
    throwaway folder.
    """
    import json
    import signal
    import subprocess
    import tempfile
    from pathlib import Path

    import yaml

    from deepfake_detector.contract import from_stage_params
    from deepfake_detector.distributed import train_command
    from deepfake_detector.params import to_dict

    with tempfile.TemporaryDirectory() as tmp:
        # `deepfake train` reads a params file: the run's train params, the rest (unread) defaults.
        params_file = Path(tmp) / "params.yaml"
        params_file.write_text(yaml.safe_dump(to_dict(from_stage_params("train", params))))
        command = train_command(nproc_per_node, params_file, processed.path, model.path,
                                checkpoint_dir or Path(tmp) / "checkpoints")
        process = subprocess.Popen(command)
        # A preempted pod's SIGTERM, when it reaches this process: pass it on, so torchrun's workers
        # checkpoint before they stop.
        signal.signal(signal.SIGTERM, lambda signum, _: process.send_signal(signum))
        code = process.wait()
    if code:
        raise RuntimeError(f"training failed: torchrun exited with code {code}")
    summary = json.loads((Path(model.path) / "train.json").read_text())
    run = json.loads((Path(model.path) / "run.json").read_text())
    for key, value in summary.items():
        if isinstance(value, (int, float)):
            metrics.log_metric(key, value)
    model.metadata.update({"framework": "pytorch", "run_id": run["run_id"] or "", "device": summary["device"]})
    return run["run_id"] or ""


def evaluate(params: dict, processed: Input[Dataset], model: Input[Model], evaluation: Output[Artifact],
             metrics: Output[Metrics], classification: Output[ClassificationMetrics]) -> float:
    """Score the test split and log it to the training run; ``evaluation`` gets the metrics, plots,
    the decision settings (``detector.json``) and the model card. Returns the test ROC AUC for the gate."""
    import json
    import math
    from pathlib import Path

    from deepfake_detector.contract import from_stage_params
    from deepfake_detector.params import flatten
    from deepfake_detector.stages import evaluate as stage

    result = stage.run(from_stage_params("evaluate", params), processed.path, model.path, Path(evaluation.path),
                       register_model=False)
    roc = json.loads((Path(evaluation.path) / "plots" / "roc.json").read_text())["roc"]
    decision = json.loads((Path(evaluation.path) / "detector.json").read_text())
    evaluation.metadata.update({"threshold": decision["threshold"], "threshold_rule": decision["rule"]})
    for key, value in flatten(result).items():
        if isinstance(value, (int, float)) and math.isfinite(value):  # KFP cannot carry an undefined (NaN) metric
            metrics.log_metric(key, value)
    if roc:
        classification.log_roc_curve([r["fpr"] for r in roc], [r["tpr"] for r in roc],
                                     [r["threshold"] for r in roc])
    classification.log_confusion_matrix(["real", "fake"], [[result["tn"], result["fp"]],
                                                           [result["fn"], result["tp"]]])
    return float(result["roc_auc"])


def register(params: dict, model: Input[Model], evaluation: Input[Artifact]) -> str:
    """Register the model with evaluate's decision settings and model card; returns the version."""
    from deepfake_detector.contract import from_stage_params
    from deepfake_detector.stages import register as stage

    return stage.run(from_stage_params("register", params), model.path, evaluation.path) or ""


def build(image: str) -> SimpleNamespace:
    """The components above on ``image``, which must have this project installed (see Dockerfile)."""
    make = dsl.component(base_image=image, install_kfp_package=False)
    return SimpleNamespace(**{f.__name__: make(f) for f in (download, twins, preprocess, train, evaluate, register)})
