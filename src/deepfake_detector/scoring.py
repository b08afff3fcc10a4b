"""Scoring for people: a stored model loaded as a :class:`Detector`, files and folders scored into a
CSV (``deepfake predict``), and any labelled folder or CSV evaluated (``deepfake evaluate --data``).
No tracking: these read models, they never log runs."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from deepfake_detector import data, sources
from deepfake_detector.atomic import replacing_dir
from deepfake_detector.detector import Detector
from deepfake_detector.params import Params
from deepfake_detector.predict import iter_images


def load_detector(p: Params, model: str, threshold: float | None = None) -> Detector:
    """The :class:`Detector` of a local model folder/file or an MLflow model URI, on the best device;
    ``threshold`` overrides its own."""
    detector = Detector.load(model, p.mlflow, backend=p.evaluate.backend)
    detector.batch_size = p.evaluate.batch_size
    if threshold is not None:
        detector.decision = replace(detector.decision, threshold=threshold)
    return detector


def predict_paths(p: Params, paths: list[Path], model: str, out: Path, threshold: float | None = None,
                  crop_faces: bool | None = None, progress: bool = False) -> dict:
    """Score files and folders into a CSV (path, source, p_fake, label, error), streaming in batches.

    Unreadable files get their reason in ``error`` and are counted; they do not stop the run.
    Each image's source is named as in :func:`named_images`.
    """
    detector = load_detector(p, model, threshold)
    named = named_images(paths)
    files, names = [path for path, _ in named], [name for _, name in named]
    counts = {"images": len(files), "fake": 0, "real": 0, "unreadable": 0}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with Path(out).open("w", newline="") as f, tqdm(total=len(files), unit="img", disable=not progress) as bar:
        writer = csv.writer(f)
        writer.writerow(["path", "source", "p_fake", "label", "error"])
        for start, p_fake, errors in detector.batches(files, crop_faces=crop_faces):
            for path, name, score, error in zip(files[start:], names[start:], p_fake, errors):
                if error:
                    counts["unreadable"] += 1
                    writer.writerow([path, name, "", "", error])
                else:
                    label = detector.label(score)
                    counts[label] += 1
                    writer.writerow([path, name, f"{score:.6f}", label, ""])
            bar.update(len(p_fake))
    return {**counts, "threshold": detector.threshold}


def named_images(paths: list[Path | str]) -> list[tuple[Path, str]]:
    """The images of files and folders (:func:`iter_images`), each with the name of its source: the
    folder given (a file's own folder), or the names of a list or mapping given as ``data.source``
    takes it (``'{sd: photos/sd, gan: photos/gan}'``)."""
    named = []
    for arg in map(str, paths):
        if arg.strip().startswith(("[", "{")):
            locations = sources.parse_sources(arg)
        else:
            folder = Path(arg) if Path(arg).is_dir() else Path(arg).parent
            locations = {sources.source_name(str(folder.resolve()), strict=False): arg}
        named += [(path, name) for name, location in locations.items() for path in iter_images([Path(location)])]
    return named


def labelled_sources(data_path: str | Path, root: Path | None = None) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """Image paths, labels and source names of ``data_path``.

    A labelled folder (``real/`` and ``fake/``) or CSV (see :func:`data.labelled_files`) is one
    source, named after it. Anything else is read as ``data.source`` is (:func:`sources.parse_sources`:
    a folder with splits, or a list or mapping of local folders), every image of every split counted.
    """
    path = Path(data_path)
    if path.is_file() or _labelled_folder(path):
        paths, labels = data.labelled_files(path, root)
        name = sources.source_name(str(path.with_suffix("") if path.is_file() else path), strict=False)
        return paths, labels, np.full(len(paths), name)
    if root is not None:
        raise data.DataError(f"--root is for a CSV, and {data_path} is not one")
    entries = [(name, entry) for name, location in sources.parse_sources(str(data_path)).items()
               for entry in sources.list_images(Path(location), (1.0, 0.0, 0.0))]  # splits do not matter here
    return ([e.path for _, e in entries], np.array([e.label for _, e in entries], dtype=np.int64),
            np.array([name for name, _ in entries]))


def _labelled_folder(path: Path) -> bool:
    """Whether ``path`` is a folder read as before: ``real/`` and ``fake/`` in it, or no dataset layout
    at all (which :func:`data.labelled_files` reports as such)."""
    if not path.is_dir():
        return False
    try:
        return sources.find_data_root(path) == (path, False)
    except data.DataError:
        return True


def evaluate_folder(p: Params, data_path: str | Path, model: str, out: Path, threshold: float | None = None,
                    root: Path | None = None) -> dict:
    """Score any labelled folder (``real/`` and ``fake/``), CSV or set of sources (see
    :func:`labelled_sources`) with a stored model, with metrics per source of fakes; no tracking.

    ``model`` is a folder or file with ``model.pt``, or an MLflow model URI; the threshold is
    ``threshold``, else the model's own (its ``detector.json``). A CSV's relative paths are under
    ``root``, else found beside it (see :func:`data.labelled_files`). ``out`` is replaced only
    once complete.
    """
    # Here, not at the top: scikit-learn and the plots are a second of start-up that predict does not need.
    from deepfake_detector import evaluate
    from deepfake_detector.metrics import full_report, per_source

    paths, labels, names = labelled_sources(data_path, root)
    detector = load_detector(p, model, threshold)
    with replacing_dir(out, evaluate.OUTPUTS) as staging:  # entered first: a refused --out fails fast
        p_fake, errors = detector.score(paths)
        kept = [i for i, error in enumerate(errors) if not error]
        unreadable = [(paths[i], error) for i, error in enumerate(errors) if error]
        if not kept:
            first, reason = unreadable[0]
            raise data.DataError(f"none of the {len(paths)} images of {data_path} could be read ({first}: "
                                 f"{reason}): nothing to evaluate")
        labels, p_fake, names = labels[kept], p_fake[kept], names[kept]
        metrics = {**full_report(labels, p_fake, detector.threshold),
                   "per_source": per_source(labels, p_fake, names, detector.threshold), "unreadable": len(unreadable)}
        evaluate.write_outputs(staging, metrics, labels, p_fake, [str(paths[i]) for i in kept], p.evaluate)
        if unreadable:
            with (staging / "unreadable.csv").open("w", newline="") as f:
                csv.writer(f).writerows([("path", "reason"), *unreadable])
    return metrics
