"""Scoring for people: a stored model loaded as a :class:`Detector`, files and folders scored into a
CSV (``deepfake predict``), and any labelled folder or CSV evaluated (``deepfake evaluate --data``).
No tracking: these read models, they never log runs."""

from __future__ import annotations

import csv
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from deepfake_detector import data, sources
from deepfake_detector.atomic import replacing_dir, replacing_file
from deepfake_detector.detector import DECISION_FILE, Detector, familiar, verdict_text
from deepfake_detector.params import Params
from deepfake_detector.predict import PREDICTION_COLUMNS, box_text, iter_images, skipped_files


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
    """Score files and folders into a CSV (:data:`~deepfake_detector.predict.PREDICTION_COLUMNS`),
    streaming in batches; returns the counts and the threshold. ``unfamiliar`` counts the images the
    familiarity head flagged; it is None for a model without one (no verdict).

    Unreadable files get their reason in ``error`` and are counted, and so are files a folder scan
    leaves out for their type (``.heic``, ``.txt``): neither stops the run. Each image's source is
    named as in :func:`named_images`. A :class:`~deepfake_detector.data.DataError` when there is no
    image to score, or (once the CSV is written) when not one of them could be scored.
    """
    named, skipped = named_images(paths)
    if not named:
        found = f": {len(skipped)} files of other types ({skipped_text(skipped)})" if skipped else ""
        raise data.DataError(f"no images found in {', '.join(map(str, paths))}{found}")
    if Path(out).is_dir():
        raise data.DataError(f"--out {out} is a folder: give the CSV file to write, such as {Path(out) / 'preds.csv'}")
    detector = load_detector(p, model, threshold)
    files, names = [path for path, _ in named], [name for _, name in named]
    counts = {"images": len(files), "fake": 0, "real": 0, "unreadable": 0, "skipped": len(skipped)}
    verdicts: Counter[bool | None] = Counter()
    first_error = ""
    with replacing_file(Path(out), "w") as f, tqdm(total=len(files), unit="img", disable=not progress) as bar:
        writer = csv.writer(f)
        writer.writerow(PREDICTION_COLUMNS)
        for start, scored in detector.batches(files, crop_faces=crop_faces):
            for path, name, score, unfamiliarity, error, (face, box) in zip(
                    files[start:], names[start:], scored.p_fake, scored.unfamiliarity, scored.errors, scored.faces):
                label = "" if error else detector.label(score)
                counts[label or "unreadable"] += 1
                verdicts[familiar(unfamiliarity)] += 1
                first_error = first_error or error and f"{path}: {error}"
                writer.writerow([path, name, "", "" if error else f"{score:.6f}", label, *verdict_text(unfamiliarity),
                                 face, box_text(box), error])
            bar.update(len(scored.p_fake))
        writer.writerows([path, name, "", "", "", "", "", "", "", f"skipped: {path.suffix.lower() or 'no suffix'} "
                          "is not an image type read here"] for path, name in skipped)
    if counts["unreadable"] == len(files):
        raise data.DataError(f"none of the {len(files)} images could be scored (reasons in {out}; {first_error})")
    has_head = verdicts[True] + verdicts[False] > 0
    return {**counts, "unfamiliar": verdicts[False] if has_head else None, "threshold": detector.threshold}


def skipped_text(skipped: list[tuple[Path, str]]) -> str:
    """What a scan left out, by type: ``.heic x12, .txt x1``."""
    by_type = Counter(path.suffix.lower() or "no suffix" for path, _ in skipped)
    return ", ".join(f"{suffix} x{n}" for suffix, n in by_type.most_common())


def named_images(paths: list[Path | str]) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    """The images of files and folders (:func:`iter_images`), each with the name of its source, and
    the files the folder scans left out for their type (:func:`skipped_files`), named alike.

    A source is the folder given, or the names of a list or mapping given as ``data.source`` takes
    it (``'{sd: photos/sd, gan: photos/gan}'``); a file named on its own has none (its folder's
    name, ``real``, would read like a label).
    """
    named, skipped = [], []
    for arg in map(str, paths):
        if arg.strip().startswith(("[", "{")):
            locations = sources.parse_sources(arg)
        elif not Path(arg).is_dir():
            named.append((Path(arg), ""))
            continue
        else:
            locations = {sources.source_name(str(Path(arg).resolve()), strict=False): arg}
        for name, location in locations.items():
            named += [(path, name) for path in iter_images([Path(location)])]
            if Path(location).is_dir():
                skipped += [(path, name) for path in skipped_files(Path(location))]
    return named, skipped


def labelled_sources(data_path: str | Path, root: Path | None = None) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """Image paths, labels and source names of ``data_path``.

    A labelled folder (``real/`` and ``fake/``) or CSV (see :func:`data.labelled_files`) is one
    source, named after it. Anything else is read as ``data.source`` is (:func:`sources.parse_sources`:
    a folder with splits, or a list or mapping of local folders), every image of every split counted.
    """
    path = Path(data_path)
    if path.is_file() or _labelled_folder(path):
        paths, labels = data.labelled_files(path, root)
        return paths, labels, np.full(len(paths), set_name(path))
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


# What evaluating another set writes: never the pipeline's decision settings or model card, so the
# pipeline's eval/ (which holds them) is refused as --out rather than replaced.
FOLDER_OUTPUTS = ("metrics.json", "plots", "unreadable.csv")


def default_out(data_path: str | Path) -> Path:
    """Where ``evaluate --data`` writes without ``--out``: ``eval-data/<the set's name>``, apart from
    the pipeline's ``eval/``."""
    text = str(data_path).strip()
    return Path("eval-data") / ("sources" if text.startswith(("[", "{")) else set_name(Path(text)))


def set_name(path: Path) -> str:
    """The name of a labelled folder or CSV, as a source: its folder's name, or the CSV's without ``.csv``."""
    return sources.source_name(str(path.with_suffix("") if path.is_file() else path), strict=False)


def evaluate_folder(p: Params, data_path: str | Path, model: str, out: Path, threshold: float | None = None,
                    root: Path | None = None) -> dict:
    """Score any labelled folder (``real/`` and/or ``fake/``), CSV or set of sources (see
    :func:`labelled_sources`) with a stored model, with metrics per source and, for a model with a
    familiarity head, what its flags cover (:func:`~deepfake_detector.evaluate.report`); no tracking.

    ``model`` is a folder or file with ``model.pt``, or an MLflow model URI; the threshold is
    ``threshold``, else the model's own (its ``detector.json``). A CSV's relative paths are under
    ``root``, else found beside it (see :func:`data.labelled_files`). ``out`` is replaced only
    once complete, and never when it holds a pipeline evaluation (``detector.json``).
    """
    # Here, not at the top: scikit-learn and the plots are a second of start-up that predict does not need.
    from deepfake_detector import evaluate

    if (Path(out) / DECISION_FILE).exists():
        raise data.DataError(f"{out} holds a pipeline evaluation ({DECISION_FILE}, which scorers read): "
                             "scoring another set never replaces it; choose another --out")
    paths, labels, names = labelled_sources(data_path, root)
    detector = load_detector(p, model, threshold)
    with replacing_dir(out, FOLDER_OUTPUTS) as staging:  # entered first: a refused --out fails fast
        scored = detector.score(paths)
        kept = [i for i, error in enumerate(scored.errors) if not error]
        unreadable = [(paths[i], error) for i, error in enumerate(scored.errors) if error]
        if not kept:
            first, reason = unreadable[0]
            raise data.DataError(f"none of the {len(paths)} images of {data_path} could be read ({first}: "
                                 f"{reason}): nothing to evaluate")
        labels, names = labels[kept], names[kept]
        p_fake, unfamiliarity = scored.p_fake[kept], scored.unfamiliarity[kept]
        metrics = {**evaluate.report(labels, p_fake, unfamiliarity, names, detector.threshold),
                   "unreadable": len(unreadable)}
        evaluate.write_outputs(staging, metrics, labels, p_fake, [str(paths[i]) for i in kept], p.evaluate,
                               sources=names.tolist(), faces=[scored.faces[i] for i in kept],
                               unfamiliarity=unfamiliarity)
        if unreadable:
            with (staging / "unreadable.csv").open("w", newline="") as f:
                csv.writer(f).writerows([("path", "reason"), *unreadable])
    if data.numeric_labels(data_path) and metrics["roc_auc"] < 0.5:
        print(f"warning: ROC AUC {metrics['roc_auc']:.3f} is below chance. {data_path}'s 'label' column is read as "
              "1 = fake; Kaggle's 140k CSVs use 1 = real (their label_str is read the right way round)",
              file=sys.stderr)
    return metrics
