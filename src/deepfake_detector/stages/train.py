"""The train stage: ``data/processed`` into ``models/`` (``model.pt``, history, summary) inside
an MLflow run, resumable from checkpoints and run once per process under ``torchrun``."""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path

from deepfake_detector import distributed
from deepfake_detector import train as training
from deepfake_detector.backends import DECISION_FILE, ONNX_FILE
from deepfake_detector.checkpoint import CheckpointStore, data_fingerprint, run_key
from deepfake_detector.device import resolve_device
from deepfake_detector.errors import UserError
from deepfake_detector.heads import load_checkpoint
from deepfake_detector.params import Params, flatten
from deepfake_detector.preprocess import load_split
from deepfake_detector.torch_backend import export_onnx
from deepfake_detector.tracking import RUN_FILE, Tracker, TrackingError, end_pending, run_tags


def run(p: Params, processed: Path, out: Path, progress: bool = False, checkpoint_dir: Path | None = None) -> dict:
    """Train on ``processed`` into ``out`` inside an MLflow run; returns the best epoch's summary.

    Checkpoints go to ``checkpoint_dir`` (default ``out/.ckpt``, outside the stage's DVC outputs)
    and a rerun resumes from the newest one made for the same params and data, logging on to the
    same MLflow run; they are removed once the stage has succeeded. Under ``torchrun`` every
    process calls this; rank 0 alone tracks and writes outputs.
    """
    processed, out = Path(processed), Path(out)
    meta_file = processed / "meta.json"
    if not meta_file.exists():
        raise UserError(f"{meta_file} not found: run the preprocess stage first")
    world = distributed.from_env()
    device = resolve_device(p.train.device, world)
    distributed.init(world, device)
    try:
        return _train(p, processed, out, Path(checkpoint_dir or out / ".ckpt"), world, device, progress)
    finally:
        distributed.shutdown()


def _train(p: Params, processed: Path, out: Path, checkpoint_dir: Path, world: distributed.World,
           device, progress: bool) -> dict:
    config = training.run_config(p.seed, p.model, p.train, data_fingerprint(processed))
    store = CheckpointStore(checkpoint_dir, run_key(config))
    resume = distributed.broadcast(store.latest() if world.main else None, world)
    meta = json.loads((processed / "meta.json").read_text())
    # How the data was prepared travels with the weights: a model not yet evaluated still refuses
    # what preprocess would have quarantined, and every scorer fits images the same way.
    fit = partial(training.fit, processed, out, p.model, p.train, device, p.seed, progress=progress, store=store,
                  resume=resume, world=world, **training.prepared_as(meta))
    if not world.main:
        return {**fit(), "run_id": None}
    # The evaluate stage's decision kept beside the model belongs to the model it evaluated, not this one.
    (out / DECISION_FILE).unlink(missing_ok=True)
    if resume is None:
        store.clear()  # checkpoints of other params or data: never resumed, so not kept
    run_id = resume.get("run_id") if resume else None
    pending_end = checkpoint_dir / "pending-end.json"
    end_pending(p.mlflow, pending_end, run_id)
    tracker = Tracker.reopen(p.mlflow, run_id) if run_id else _start_train_run(p, meta, device)
    with tracker.running(pending_end):
        if resume is None:
            tracker.log_metrics({f"data.{split}_images": s["images"] for split, s in meta["splits"].items()}
                                | {"data.quarantined": meta["quarantined"]})
        metrics = tracker.metric_log()
        on_epoch = (lambda epoch, values: metrics.add(values, step=epoch)) if metrics else None
        if metrics and resume:
            # Epochs of the checkpoint whose metrics were still queued when the process died (kill -9).
            sent = tracker.logged_steps("valid_auc")
            for row in resume["history"]:
                if row["epoch"] not in sent:
                    on_epoch(row["epoch"], {k: v for k, v in row.items() if k != "epoch"})
        summary = fit(on_epoch=on_epoch, extra_state={"run_id": tracker.run_id})
        if metrics:
            metrics.add({k: v for k, v in summary.items() if isinstance(v, (int, float))})
            unsent = metrics.close(timeout=60)
            if unsent:
                raise TrackingError(f"{unsent} metrics could not be sent to MLflow; the trained model and "
                                    f"history are in {out}, and a rerun resumes from {checkpoint_dir}")
        # The ONNX export beside model.pt, checked against PyTorch on valid images where ONNX Runtime is.
        valid_images = load_split(processed, "valid")[0][:64]
        model, ckpt = load_checkpoint(out / "model.pt")
        onnx = export_onnx(model, out / ONNX_FILE, valid_images, ckpt)
        if onnx["max_abs_diff"] is not None:
            tracker.log_metrics({"onnx_max_abs_diff": onnx["max_abs_diff"]})
        for name in ("history.csv", "train.json"):
            tracker.log_artifacts(out / name, "train")
        tracker.log_artifacts(processed / "meta.json", "data")
    tracker.save(out / RUN_FILE)
    store.clear()
    return {**summary, "run_id": tracker.run_id}


def _start_train_run(p: Params, meta: dict, device) -> Tracker:
    """A new MLflow run for a training run, with its params, data lineage and environment as tags."""
    # Data params come from what actually built the data (meta.json), not today's params.yaml.
    logged = {**flatten({"seed": p.seed, "model": p.model, "train": p.train}),
              **flatten({"preprocess": meta["params"]}),
              **flatten({"twins": (meta.get("twins") or {}).get("params", {})}),  # when the data has twins
              "data.source": (meta.get("download") or {}).get("source", "unknown")}
    exp_name = os.environ.get("DVC_EXP_NAME")
    tags = {**run_tags(), "device": str(device), **({"dvc.exp_name": exp_name} if exp_name else {})}
    # Data fetched from a DVC repository (e.g. on Kubeflow): record which version it was.
    dvc_source = (meta.get("download") or {}).get("dvc") or {}
    tags |= {f"data.dvc_{k}": str(v) for k, v in dvc_source.items() if v}
    return Tracker.start(p.mlflow, exp_name, logged, tags)
