"""Evaluate a trained model on the test split: metrics (see :mod:`~deepfake_detector.metrics`),
the robustness matrix, plot data and PNGs, and the decision settings it hands to every scorer.

The decision threshold is chosen on the validation split (``evaluate.threshold_rule``) and then applied
to the test split, so the test metrics are not tuned on the test data.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from sklearn import metrics as skm

from deepfake_detector import plots, preprocess
from deepfake_detector.data import CLASSES
from deepfake_detector.detector import DECISION_FILE, Decision, Detector, verdict_text
from deepfake_detector.metrics import (
    NEVER,
    calibration,
    choose_threshold,
    compute_metrics,
    familiarity_report,
    flagged,
    full_report,
    per_fake_source,
    per_real_source,
    per_source,
)
from deepfake_detector.params import EvaluateParams
from deepfake_detector.predict import PREDICTION_COLUMNS, box_text
from deepfake_detector.preprocess import load_split
from deepfake_detector.robustness import perturbations

# What an evaluation writes into its folder, the stages' model card and unreadable-file list
# included: the folder is replaced as a whole, and one holding anything else is refused.
OUTPUTS = ("metrics.json", "plots", DECISION_FILE, "model_card.md", "unreadable.csv")


def run(processed_dir: Path, model_path: Path, out_dir: Path, params: EvaluateParams, device: torch.device,
        seed: int = 0) -> dict:
    """Evaluate on the test split with a threshold chosen on valid; writes metrics.json, plots/ and
    the decision settings every scorer of this model applies, ``detector.json``.

    Returns the metrics (:func:`report`) and ``robustness`` (a row per perturbation, :func:`robustness_row`),
    both without the fakes of the model's ``model.spectrum_only`` sources, whose own figures are
    ``spectrum_only`` (:func:`~deepfake_detector.metrics.per_fake_source`).
    """
    out_dir, model_path = Path(out_dir), Path(model_path)
    meta = json.loads((Path(processed_dir) / "meta.json").read_text())
    detector = Detector.from_checkpoint(model_path, Decision(), device, backend=params.backend)
    detector.batch_size = params.batch_size
    valid_x, valid_y = load_split(processed_dir, "valid")
    threshold = valid_threshold(valid_y, detector.predict(valid_x), read_index(processed_dir, "valid")[1],
                                detector.model.config.spectrum_only, params)
    Decision.chosen(threshold, params, meta["params"]["min_source_size"]).write(out_dir / DECISION_FILE)
    images, labels = load_split(processed_dir, "test")
    p_fake, unfamiliarity = detector.assess(images)
    paths, sources = read_index(processed_dir, "test")
    # The twins are measured apart, as they are left out of the threshold: the headline, the per-source
    # rows (the promote gates) and the plots are for the generators the detector is for.
    proxies = detector.model.config.spectrum_only
    keep = np.flatnonzero(~proxy_fakes(labels, sources, proxies))
    result = report(labels[keep], p_fake[keep], _take(unfamiliarity, keep), _take(sources, keep), threshold)
    if len(keep) < len(labels):
        result["spectrum_only"] = {name: row for name, row in per_fake_source(
            labels, p_fake, sources, threshold, unfamiliarity).items() if name in proxies}
    kept = [images[i] for i in keep]  # views: a memmap stays on disk
    result["robustness"] = {}
    for name, transform in perturbations(params.robustness, seed):
        perturbed, unfamiliar = detector.assess(kept, transform)
        result["robustness"][name] = robustness_row(labels[keep], perturbed, _take(sources, keep), threshold,
                                                    unfamiliar)
    write_outputs(out_dir, result, labels[keep], p_fake[keep], _take(paths, keep), params, images=kept,
                  history=model_path.parent / "history.csv", sources=_take(sources, keep),
                  unfamiliarity=_take(unfamiliarity, keep))
    return result


def _take(values, keep: np.ndarray):
    """``values`` (a list, an array or None) at the indices ``keep``, as it came."""
    if values is None:
        return None
    return values[keep] if isinstance(values, np.ndarray) else [values[i] for i in keep]


def proxy_fakes(labels: np.ndarray, sources: Sequence[str], proxies: Sequence[str]) -> np.ndarray:
    """Which images are fakes of a ``proxies`` source (``model.spectrum_only``: the twins)."""
    return np.isin(np.asarray(sources), list(proxies)) & (np.asarray(labels) == 1)


def valid_threshold(labels: np.ndarray, p_fake: np.ndarray, sources: Sequence[str], proxies: Sequence[str],
                    params: EvaluateParams) -> float:
    """The threshold ``params``' rule picks on the valid split's scores, leaving out the fakes of the
    ``proxies`` (the model's ``model.spectrum_only`` sources, the twins). They are a family made to fit
    the spectrum branch, as many as the reals, not a generator the operating point is for: counted,
    the ``eer`` point of a model with faces-utk among its reals fell to P(fake) 0.11, where 80 % of
    FFHQ's test reals are called fake (docs/experiments.md)."""
    labels = np.asarray(labels)
    keep = ~proxy_fakes(labels, sources, proxies)
    if len(np.unique(labels[keep])) < 2:
        print(f"warning: the valid split has one class: threshold {params.threshold} (evaluate.threshold) "
              "instead of the rule's", file=sys.stderr)
    return choose_threshold(labels[keep], np.asarray(p_fake)[keep], params.threshold_rule, params.target_fpr,
                            params.threshold, np.asarray(sources)[keep])


def report(labels: np.ndarray, p_fake: np.ndarray, unfamiliarity: np.ndarray, sources: np.ndarray | list[str],
           threshold: float) -> dict:
    """The metrics of a scored set (:func:`~deepfake_detector.metrics.full_report`), ``per_source``
    (each source's fakes against all reals, each source's reals against all fakes, see
    :func:`~deepfake_detector.metrics.per_source`) and, for a model with a familiarity head (verdicts
    in ``unfamiliarity``), ``familiarity``: :func:`~deepfake_detector.metrics.familiarity_report`."""
    result = {**full_report(labels, p_fake, threshold),
              "per_source": per_source(labels, p_fake, sources, threshold, unfamiliarity)}
    if flagged(unfamiliarity) is not None:
        result["familiarity"] = familiarity_report(labels, p_fake, unfamiliarity, threshold)
    return result


def robustness_row(labels: np.ndarray, p_fake: np.ndarray, sources: list[str], threshold: float,
                   unfamiliarity: np.ndarray | None = None) -> dict:
    """One perturbation's row: test ``auc`` and ``accuracy``, each fake source's AUC against all reals
    (``sources``) and each real source's false positive rate at ``threshold`` (``source_fpr``: the
    share of its perturbed photographs called fake, what a perturbation costs the people scored);
    for a model with a familiarity head, the share of perturbed images ``flagged``."""
    m = compute_metrics(labels, p_fake, threshold)
    row = {"auc": m["roc_auc"], "accuracy": m["accuracy"],
           "sources": {s: v["roc_auc"] for s, v in per_fake_source(labels, p_fake, sources, threshold).items()},
           "source_fpr": {s: v["false_positive_rate"]
                          for s, v in per_real_source(labels, p_fake, sources, threshold).items()}}
    flag = flagged(unfamiliarity)
    if flag is not None:
        row["flagged"] = float(flag.mean())
    return row


def read_index(processed_dir: Path, split: str) -> tuple[list[str], list[str]]:
    """The paths and source names of a preprocessed split's images, in ``index.csv``'s order
    (:func:`preprocess.read_index`: a folder from before sources were named is one source)."""
    rows = preprocess.read_index(processed_dir, split)[1]
    return [row["path"] for row in rows], [row["source"] for row in rows]


def _nan_to_null(value: object) -> object:
    """``value`` (a dict or list of metrics) with NaN as None: a metric undefined for this set (an AUC
    with one class) is ``null`` in JSON, which has no NaN."""
    if isinstance(value, dict):
        return {k: _nan_to_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_null(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def write_outputs(out_dir: Path, result: dict, labels: np.ndarray, p_fake: np.ndarray, paths: list[str],
                  params: EvaluateParams, images: np.ndarray | None = None, history: Path | None = None,
                  sources: list[str] | None = None, faces: list[tuple[str, tuple | None]] | None = None,
                  unfamiliarity: np.ndarray | None = None) -> None:
    """``metrics.json`` plus plot data (JSON/CSV for DVC) and PNGs under ``out_dir/plots``; the per-image
    ``plots/predictions.csv`` has ``deepfake predict``'s columns, with each image's source, its
    familiarity verdict (``unfamiliarity``; none without) and, for files scored whole or cropped, what
    the face search found (``faces``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data, pngs = out_dir / "plots", out_dir / "plots" / "images"
    pngs.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(_nan_to_null(result), indent=2, allow_nan=False) + "\n")
    threshold = result["threshold"]
    pred = (p_fake >= threshold).astype(int)
    sources, faces = sources or [""] * len(paths), faces or [("", None)] * len(paths)
    unfamiliarity = np.full(len(paths), np.nan) if unfamiliarity is None else unfamiliarity
    with (data / "predictions.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(PREDICTION_COLUMNS)
        w.writerows((p, source, CLASSES[a], f"{s:.6f}", CLASSES[b], *verdict_text(u), face, box_text(box), "")
                    for p, source, a, s, b, u, (face, box) in zip(paths, sources, labels, p_fake, pred, unfamiliarity,
                                                                 faces))
    both = len(np.unique(labels)) == 2
    roc = pr = []
    if both:
        fpr, tpr, thr = skm.roc_curve(labels, p_fake)
        roc = [{"fpr": float(a), "tpr": float(b), "threshold": float(min(t, NEVER))} for a, b, t in zip(fpr, tpr, thr)]
        precision, recall, _ = skm.precision_recall_curve(labels, p_fake)
        pr = [{"recall": float(r), "precision": float(p)} for p, r in zip(precision, recall)]
    reliability = calibration(labels, p_fake, params.calibration_bins)
    # Flat rows for DVC's plots: each source's robustness figures stay in metrics.json.
    robustness = [{"perturbation": k, "auc": v["auc"], "accuracy": v["accuracy"]}
                  for k, v in result.get("robustness", {}).items()]
    sources = [{"source": k, **v} for k, v in result.get("per_source", {}).items()]
    files = [("roc", roc), ("pr", pr), ("calibration", reliability), ("robustness", robustness)]
    for name, rows in files + ([("per_source", sources)] if "per_source" in result else []):
        (data / f"{name}.json").write_text(json.dumps(_nan_to_null({name: rows}), allow_nan=False) + "\n")
    if both:
        plots.roc(pngs / "roc.png", roc, result["roc_auc"])
        plots.precision_recall(pngs / "precision_recall.png", pr, result["average_precision"])
    else:
        print(f"warning: only {CLASSES[labels[0]]} images: ROC AUC, average precision and EER are undefined "
              "(null in metrics.json) and the ROC and precision-recall plots are skipped; they need both classes",
              file=sys.stderr)
    if sources:  # one class too: the false positive rate of each source of reals stands alone
        plots.per_source(pngs / "per_source.png", sources, result["threshold"])
    plots.confusion(pngs / "confusion.png", skm.confusion_matrix(labels, pred, labels=[0, 1]), threshold)
    plots.reliability(pngs / "reliability.png", reliability, result["brier"])
    if robustness:
        plots.robustness(pngs / "robustness.png", robustness, result["roc_auc"])
    if history is not None and history.exists():
        with history.open() as f:
            plots.training_curves(pngs / "training_curves.png", list(csv.DictReader(f)))
    if images is not None:
        # Most confident mistakes: real faces with the highest P(fake), fakes with the lowest.
        wrong = np.flatnonzero(pred != labels)
        confidence = np.where(labels[wrong] == 1, 1 - p_fake[wrong], p_fake[wrong])
        chosen = wrong[np.argsort(-confidence)[:params.mistakes]]
        plots.mistakes(pngs / "confident_mistakes.png", [np.asarray(images[i]) for i in chosen],
                       [f"{CLASSES[labels[i]]}, P(fake) {p_fake[i]:.2f}" for i in chosen])
