"""Scoring for people: a stored model loaded as a :class:`Detector`, files and folders scored into a
CSV (``deepfake predict``), and any labelled folder or CSV evaluated (``deepfake evaluate --data``).
No tracking: these read models, they never log runs."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from deepfake_detector import data, evaluate
from deepfake_detector.atomic import replacing_dir
from deepfake_detector.detector import Detector
from deepfake_detector.device import resolve_device
from deepfake_detector.metrics import full_report
from deepfake_detector.params import Params
from deepfake_detector.predict import iter_images


def load_detector(p: Params, model: str, threshold: float | None = None) -> Detector:
    """The :class:`Detector` of a local model folder/file or an MLflow model URI, on the best device;
    ``threshold`` overrides its own."""
    detector = Detector.load(model, p.mlflow, resolve_device("auto"))
    detector.batch_size = p.evaluate.batch_size
    if threshold is not None:
        detector.decision = replace(detector.decision, threshold=threshold)
    return detector


def predict_paths(p: Params, paths: list[Path], model: str, out: Path, threshold: float | None = None,
                  crop_faces: bool | None = None, progress: bool = False) -> dict:
    """Score files and folders into a CSV (path, p_fake, label, error), streaming in batches.

    Unreadable files get their reason in ``error`` and are counted; they do not stop the run.
    """
    detector = load_detector(p, model, threshold)
    files = list(iter_images(paths))
    counts = {"images": len(files), "fake": 0, "real": 0, "unreadable": 0}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with Path(out).open("w", newline="") as f, tqdm(total=len(files), unit="img", disable=not progress) as bar:
        writer = csv.writer(f)
        writer.writerow(["path", "p_fake", "label", "error"])
        for start in range(0, len(files), p.evaluate.batch_size):
            chunk = files[start:start + p.evaluate.batch_size]
            p_fake, errors = detector.score(chunk, crop_faces=crop_faces)
            for path, score, error in zip(chunk, p_fake, errors):
                if error:
                    counts["unreadable"] += 1
                    writer.writerow([path, "", "", error])
                else:
                    label = detector.label(score)
                    counts[label] += 1
                    writer.writerow([path, f"{score:.6f}", label, ""])
            bar.update(len(chunk))
    return {**counts, "threshold": detector.threshold}


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
    with replacing_dir(out, evaluate.OUTPUTS) as staging:  # entered first: a refused --out fails fast
        p_fake, errors = detector.score(paths)
        kept = [i for i, error in enumerate(errors) if not error]
        unreadable = [(paths[i], error) for i, error in enumerate(errors) if error]
        if not kept:
            first, reason = unreadable[0]
            raise data.DataError(f"none of the {len(paths)} images of {data_path} could be read ({first}: "
                                 f"{reason}): nothing to evaluate")
        labels, p_fake = labels[kept], p_fake[kept]
        metrics = {**full_report(labels, p_fake, detector.threshold), "unreadable": len(unreadable)}
        evaluate.write_outputs(staging, metrics, labels, p_fake, [str(paths[i]) for i in kept], p.evaluate)
        if unreadable:
            with (staging / "unreadable.csv").open("w", newline="") as f:
                csv.writer(f).writerows([("path", "reason"), *unreadable])
    return metrics
