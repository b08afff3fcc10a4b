"""The four pipeline stages (plus registration) wired to MLflow tracking.

Each takes the params and explicit paths and returns what it produced. The ``deepfake`` CLI (and
so ``dvc.yaml`` and ``MLproject``) and the Kubeflow components call these same functions.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

from PIL import Image

from deepfake_detector import data, distributed, evaluate as evaluation, preprocess as prep, train as training
from deepfake_detector.card import model_card
from deepfake_detector.checkpoint import CheckpointStore, data_fingerprint, run_key
from deepfake_detector.detector import DECISION_FILE, Decision, Detector
from deepfake_detector.errors import UserError
from deepfake_detector.params import Params, flatten
from deepfake_detector.tracking import RUN_FILE, Tracker, TrackingError, end_pending, run_tags


def download(p: Params, out: Path) -> dict:
    """Fetch ``data.source`` into ``out``; returns the source info and file counts."""
    return data.download(p.data.source, Path(out), p.data.sha256, p.download.timeout_s, p.download.retries,
                         limits=p.download)


def preprocess(p: Params, raw: Path, out: Path, workers: int | None = None, progress: bool = False) -> dict:
    """Validate, resize and degrade ``raw`` into ``out``; returns the report written to ``meta.json``."""
    return prep.run(Path(raw), Path(out), p.preprocess, p.seed, workers, progress)


def train(p: Params, processed: Path, out: Path, progress: bool = False, checkpoint_dir: Path | None = None) -> dict:
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
    device = training.resolve_device(p.train.device, world)
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
    fit = partial(training.fit, processed, out, p.model, p.train, device, p.seed, progress=progress, store=store,
                  resume=resume, world=world)
    if not world.main:
        return {**fit(), "run_id": None}
    if resume is None:
        store.clear()  # checkpoints of other params or data: never resumed, so not kept
    run_id = resume.get("run_id") if resume else None
    pending_end = checkpoint_dir / "pending-end.json"
    end_pending(p.mlflow, pending_end, run_id)
    meta = json.loads((processed / "meta.json").read_text())
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
              "data.source": (meta.get("download") or {}).get("source", "unknown")}
    exp_name = os.environ.get("DVC_EXP_NAME")
    tags = {**run_tags(), "device": str(device), **({"dvc.exp_name": exp_name} if exp_name else {})}
    # Data fetched from a DVC repository (e.g. on Kubeflow): record which version it was.
    dvc_source = (meta.get("download") or {}).get("dvc") or {}
    tags |= {f"data.dvc_{k}": str(v) for k, v in dvc_source.items() if v}
    return Tracker.start(p.mlflow, exp_name, logged, tags)


def evaluate(p: Params, processed: Path, model_dir: Path, out: Path, register: bool = True) -> dict:
    """Score the test split, log it and the model card to the training run, optionally register.

    Returns the metrics, plus ``registered_version`` when a version was registered. ``out`` is
    replaced only once complete.
    """
    model_dir, out = Path(model_dir), Path(out)
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
        with data.replacing_dir(out, evaluation.OUTPUTS) as staging:
            metrics = evaluation.run(Path(processed), model_dir / "model.pt", staging, p.evaluate,
                                     training.resolve_device("auto"), p.seed)
            meta = json.loads((Path(processed) / "meta.json").read_text())
            download_info = meta.get("download") or {}
            data_info = {"source": download_info.get("source"), **run_tags(), **{
                f"dvc_{k}": v for k, v in (download_info.get("dvc") or {}).items()},
                "images (train/valid/test)": "/".join(str(s["images"]) for s in meta["splits"].values())}
            card = model_card(p.mlflow.model_name, metrics, {**logged, **flatten({"evaluate": p.evaluate})},
                              data_info, train_run.run_id)
            (staging / "model_card.md").write_text(card)
        target.log_metrics({f"test_{k}": v for k, v in flatten(metrics).items()})
        target.log_artifacts(out, "evaluation")
    version = register_model(p, model_dir, flatten(metrics), card, out / DECISION_FILE) if register else None
    return {**metrics, **({"registered_version": version} if version else {})}


def register_model(p: Params, model_dir: Path, metrics: dict, card: str | None = None,
                   decision: Path | None = None) -> str | None:
    """Log the model trained into ``model_dir`` with its decision settings, register it and point
    ``mlflow.alias`` at the new version.

    ``decision`` is the evaluate stage's ``detector.json``; without it (a Kubeflow register step)
    it is rebuilt from the metrics' threshold and the params. Nothing is registered when the test
    ROC AUC is below ``mlflow.register_min_auc``. The version gets the model card as its
    description (read from the run when not given) and the decision settings as tags.
    """
    if not metrics["roc_auc"] >= p.mlflow.register_min_auc:  # also refuses a NaN AUC
        print(f"not registered: test ROC AUC {metrics['roc_auc']:.4f} < mlflow.register_min_auc "
              f"{p.mlflow.register_min_auc}")
        return None
    tracker = Tracker.resume(p.mlflow, Path(model_dir) / RUN_FILE)
    if not tracker.active:
        return None
    checkpoint = Path(model_dir) / "model.pt"
    with tempfile.TemporaryDirectory() as tmp:
        if decision is None:
            decision = Path(tmp) / DECISION_FILE
            Decision(metrics["threshold"], p.evaluate.threshold_rule, p.evaluate.crop_faces,
                     p.preprocess.min_source_size).write(decision)
        settings = Decision.read(decision)
        # The input example shown with the model (and run through it by MLflow): a plain grey face-sized image.
        side = max(Detector.from_checkpoint(checkpoint, settings).image_size, settings.min_source_size)
        example = io.BytesIO()
        Image.new("RGB", (side, side), (128, 128, 128)).save(example, format="PNG")
        with tracker.running():
            model_uri = tracker.log_model(checkpoint, decision, example.getvalue())
    tags = {"test_roc_auc": f"{metrics['roc_auc']:.4f}", "test_accuracy": f"{metrics['accuracy']:.4f}",
            "threshold": f"{settings.threshold:.6f}", "threshold_rule": settings.rule,
            "crop_faces": str(settings.crop_faces).lower(), "min_source_size": str(settings.min_source_size)}
    return tracker.register(model_uri, tags, card or tracker.text_artifact("evaluation/model_card.md"))


def evaluate_folder(p: Params, data_path: Path, model: str, out: Path, threshold: float | None = None,
                    root: Path | None = None) -> dict:
    """Score any labelled folder (``real/`` and ``fake/``) or CSV with a stored model; no tracking.

    ``model`` is a folder or file with ``model.pt``, or an MLflow model URI; the threshold is
    ``threshold``, else the model's own (its ``detector.json``). A CSV's relative paths are under
    ``root``, else found beside it (see :func:`data.labelled_files`). ``out`` is replaced only
    once complete.
    """
    paths, labels = data.labelled_files(Path(data_path), root)
    detector = load_detector(p, model, threshold)
    with data.replacing_dir(out, evaluation.OUTPUTS) as staging:  # entered first: a refused --out fails fast
        p_fake, errors, kept = detector.score_files(paths)
        if not kept:
            first, reason = next(iter(errors.items()))
            raise data.DataError(f"none of the {len(paths)} images of {data_path} could be read ({first}: "
                                 f"{reason}): nothing to evaluate")
        labels = labels[kept]
        metrics = {**evaluation.full_report(labels, p_fake, detector.threshold), "unreadable": len(errors)}
        evaluation.write_outputs(staging, metrics, labels, p_fake, [str(paths[i]) for i in kept], p.evaluate)
        if errors:
            with (staging / "unreadable.csv").open("w", newline="") as f:
                csv.writer(f).writerows([("path", "reason"), *errors.items()])
    return metrics


def promote(p: Params, dry_run: bool = False, force: bool = False) -> dict:
    """Move ``promote.alias`` (champion) to the ``mlflow.alias`` (challenger) version if it passes the gates.

    The decision and its reasons are recorded as tags on the challenger version (not in a dry run).
    """
    from deepfake_detector.promote import decide
    from deepfake_detector.tracking import alias_version, move_alias

    challenger = alias_version(p.mlflow, p.mlflow.alias)
    if challenger is None:
        raise UserError(f"no {p.mlflow.model_name}@{p.mlflow.alias} to promote: run the pipeline first")
    champion = alias_version(p.mlflow, p.promote.alias)
    if champion and champion[0] == challenger[0]:
        return {"version": challenger[0], "decision": "unchanged", "reasons": ["already the champion"]}
    passed, reasons = decide(challenger[1], champion[1] if champion else None, p.promote)
    decision = "promoted" if passed else ("forced" if force else "rejected")
    result = {"version": challenger[0], "champion_before": champion[0] if champion else None,
              "decision": decision, "reasons": reasons, "dry_run": dry_run}
    if not dry_run:
        tags = {"promotion.decision": decision, "promotion.reasons": "; ".join(reasons),
                "promotion.compared_with": champion[0] if champion else "none",
                "promotion.at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        move_alias(p.mlflow, p.promote.alias if decision != "rejected" else "", challenger[0], tags)
    return result


def load_detector(p: Params, model: str, threshold: float | None = None) -> Detector:
    """The :class:`Detector` of a local model folder/file or an MLflow model URI, on the best device;
    ``threshold`` overrides its own."""
    detector = Detector.load(model, p.mlflow, training.resolve_device("auto"))
    detector.batch_size = p.evaluate.batch_size
    if threshold is not None:
        detector.decision = replace(detector.decision, threshold=threshold)
    return detector


def predict_paths(p: Params, paths: list[Path], model: str, out: Path, threshold: float | None = None,
                  crop_faces: bool | None = None, progress: bool = False) -> dict:
    """Score files and folders into a CSV (path, p_fake, label, error), streaming in batches.

    Unreadable files get their reason in ``error`` and are counted; they do not stop the run.
    """
    from tqdm import tqdm

    from deepfake_detector.predict import iter_images

    detector = load_detector(p, model, threshold)
    files = list(iter_images(paths))
    counts = {"images": len(files), "fake": 0, "real": 0, "unreadable": 0}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with Path(out).open("w", newline="") as f, tqdm(total=len(files), unit="img", disable=not progress) as bar:
        writer = csv.writer(f)
        writer.writerow(["path", "p_fake", "label", "error"])
        for start in range(0, len(files), p.evaluate.batch_size):
            chunk = files[start:start + p.evaluate.batch_size]
            p_fake, errors, kept = detector.score_files(chunk, crop_faces)
            scores = dict(zip(kept, p_fake))
            for i, path in enumerate(chunk):
                if i in scores:
                    label = detector.label(scores[i])
                    counts[label] += 1
                    writer.writerow([path, f"{scores[i]:.6f}", label, ""])
                else:
                    counts["unreadable"] += 1
                    writer.writerow([path, "", "", errors[path]])
            bar.update(len(chunk))
    return {**counts, "threshold": detector.threshold}
