"""The pipeline's components, built for a given project image.

Each function body is what runs in the container: it rebuilds :class:`Params` from the flat
``params`` dict, which holds exactly its stage's keys (dotted, as ``deepfake_detector.contract``
lists them; the others keep their defaults, unread), calls the matching
``deepfake_detector.stages`` function on the KFP artifact paths (train runs ``deepfake train``
under torchrun instead, one process per GPU) and records what it produced as artifact metadata.
KFP ships the body as source, so imports live inside it (and annotations must stay real types:
no ``from __future__ import annotations`` here).
"""

from types import SimpleNamespace

from kfp import dsl
from kfp.dsl import ClassificationMetrics, Dataset, Input, Metrics, Model, Output


def download(params: dict, raw: Output[Dataset]) -> str:
    """Fetch ``data.source`` (Kaggle, URL, path, or ``dvc:REPO@REV``); returns the data version."""
    from deepfake_detector import stages
    from deepfake_detector.contract import from_stage_params

    info = stages.download(from_stage_params("download", params), raw.path)
    raw.metadata.update({"source": info["source"], "files": info["files"], **info.get("dvc", {})})
    return (info.get("dvc") or {}).get("md5") or info["source"]


def preprocess(params: dict, raw: Input[Dataset], processed: Output[Dataset]) -> None:
    """Validate, resize and degrade the raw images into memory-mappable arrays."""
    from deepfake_detector import stages
    from deepfake_detector.contract import from_stage_params

    meta = stages.preprocess(from_stage_params("preprocess", params), raw.path, processed.path)
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
    from deepfake_detector.distributed import torchrun_command
    from deepfake_detector.params import to_dict

    with tempfile.TemporaryDirectory() as tmp:
        # `deepfake train` reads a params file: the run's train params, the rest (unread) defaults.
        params_file = Path(tmp) / "params.yaml"
        params_file.write_text(yaml.safe_dump(to_dict(from_stage_params("train", params))))
        command = torchrun_command(nproc_per_node, [
            "train", "--params", str(params_file), "--data", processed.path, "--out", model.path,
            "--checkpoint-dir", checkpoint_dir or str(Path(tmp) / "checkpoints")])
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


def evaluate(params: dict, processed: Input[Dataset], model: Input[Model], metrics: Output[Metrics],
             classification: Output[ClassificationMetrics]) -> float:
    """Score the test split and log it to the training run; returns the test ROC AUC for the gate."""
    import json
    import tempfile
    from pathlib import Path

    from deepfake_detector import stages
    from deepfake_detector.contract import from_stage_params
    from deepfake_detector.params import flatten

    with tempfile.TemporaryDirectory() as out:
        result = stages.evaluate(from_stage_params("evaluate", params), processed.path, model.path, Path(out),
                                 register=False)
        roc = json.loads((Path(out) / "plots" / "roc.json").read_text())["roc"]
    for key, value in flatten(result).items():
        metrics.log_metric(key, value)
    if roc:
        classification.log_roc_curve([r["fpr"] for r in roc], [r["tpr"] for r in roc],
                                     [r["threshold"] for r in roc])
    classification.log_confusion_matrix(["real", "fake"], [[result["tn"], result["fp"]],
                                                           [result["fn"], result["tp"]]])
    return float(result["roc_auc"])


def register(params: dict, model: Input[Model], metrics: Input[Metrics]) -> str:
    """Register the model in MLflow and point the alias at it; returns the version."""
    from deepfake_detector import stages
    from deepfake_detector.contract import from_stage_params

    return stages.register_model(from_stage_params("register", params), model.path, metrics.metadata) or ""


def build(image: str) -> SimpleNamespace:
    """The components above on ``image``, which must have this project installed (see Dockerfile)."""
    make = dsl.component(base_image=image, install_kfp_package=False)
    return SimpleNamespace(**{f.__name__: make(f) for f in (download, preprocess, train, evaluate, register)})
