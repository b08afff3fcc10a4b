"""Metrics of P(fake) scores against labels: ranking (ROC AUC, AP, EER), threshold rules,
threshold metrics, calibration and, for a model with a familiarity head, what its flags cover.
Pure numpy and scikit-learn, so training (validation each epoch) and evaluation share them without
training depending on evaluation's plots or models.

The positive class is ``fake`` (label 1): precision and recall are about catching fakes.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn import metrics as skm

NEVER = float(np.nextafter(1.0, 2.0))  # a threshold no probability reaches: nothing is called fake


def choose_threshold(labels: np.ndarray, p_fake: np.ndarray, rule: str, target_fpr: float = 0.05,
                     fixed: float = 0.5, sources: np.ndarray | list[str] | None = None) -> float:
    """The P(fake) threshold that ``rule`` picks on these (validation) scores.

    ``eer``: where the false positive rate (real faces called fake) meets the miss rate (fakes
    called real); ``max_accuracy``: the highest accuracy; ``target_fpr``: the highest recall whose
    false positive rate stays at or below ``target_fpr``; ``source_fpr``: the same, for the reals of
    each source (``sources``, each image's) apart; ``fixed``: ``fixed``.
    """
    if rule == "fixed":
        return fixed
    labels = np.asarray(labels).astype(int)
    if len(np.unique(labels)) < 2:
        return fixed  # no ROC without both classes
    if rule == "source_fpr":
        # Pooled, the reals of the largest or easiest source hide another's: FFHQ's 0.12 called fake
        # beside faces-utk's 0.01 (docs/experiments.md). Each source's target_fpr point, then the
        # strictest: the false positive rate falls as the threshold rises, so it holds for all.
        if sources is None:
            raise ValueError("the source_fpr threshold rule needs each image's source")
        sources, p_fake = np.asarray(sources), np.asarray(p_fake)
        return max(choose_threshold(labels[mine], p_fake[mine], "target_fpr", target_fpr)
                   for mine in ((labels == 1) | (sources == s) for s in np.unique(sources[labels == 0])))
    if rule == "eer":
        return float(min(_equal_error_point(labels, p_fake)[1], NEVER))
    fpr, tpr, thresholds = skm.roc_curve(labels, p_fake, drop_intermediate=False)
    thresholds = np.minimum(thresholds, NEVER)  # sklearn's first threshold is inf
    if rule == "max_accuracy":
        positives = labels.sum()
        accuracy = (tpr * positives + (1 - fpr) * (len(labels) - positives)) / len(labels)
        return float(thresholds[int(np.argmax(accuracy))])
    if rule == "target_fpr":
        allowed = np.flatnonzero(fpr <= target_fpr)
        return float(thresholds[allowed[int(np.argmax(tpr[allowed]))]])
    raise ValueError(f"unknown threshold rule {rule!r}")


def equal_error_rate(labels: np.ndarray, p_fake: np.ndarray) -> float:
    """The rate where false positives (real called fake) equal false negatives (fakes missed)."""
    return _equal_error_point(labels, p_fake)[0]


def _equal_error_point(labels: np.ndarray, p_fake: np.ndarray) -> tuple[float, float]:
    """(equal error rate, the threshold at which it occurs): the ROC point nearest FPR = FNR."""
    fpr, tpr, thresholds = skm.roc_curve(labels, p_fake)
    fnr = 1 - tpr
    i = int(np.argmin(np.abs(fnr - fpr)))
    return float((fpr[i] + fnr[i]) / 2), float(thresholds[i])


def calibration(labels: np.ndarray, p_fake: np.ndarray, bins: int) -> list[dict]:
    """Reliability-diagram rows: per equal-width bin of P(fake), mean prediction vs share of fakes."""
    index = np.minimum((np.asarray(p_fake) * bins).astype(int), bins - 1)
    rows = []
    for b in range(bins):
        mask = index == b
        if mask.any():
            rows.append({"bin": (b + 0.5) / bins, "mean_p_fake": float(np.mean(p_fake[mask])),
                         "fraction_fake": float(np.mean(labels[mask])), "count": int(mask.sum())})
    return rows


def compute_metrics(labels: np.ndarray, p_fake: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Threshold metrics at ``threshold``, ranking metrics (AUC, AP, EER), calibration and counts.

    A figure without a denominator in this set is NaN, not 0: recall and the false positive rate
    (real faces called fake) without fakes or reals, precision when no image is called fake, F1 when
    either precision or recall is; so is every ranking metric of a one-class set.
    """
    labels = np.asarray(labels).astype(int)
    p_fake = np.asarray(p_fake, dtype=np.float64)
    pred = (p_fake >= threshold).astype(int)
    tn, fp, fn, tp = (int(n) for n in skm.confusion_matrix(labels, pred, labels=[0, 1]).ravel())
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f1 = math.nan if math.isnan(precision + recall) else 2 * tp / (2 * tp + fp + fn)  # tp + fn > 0 here
    both = len(np.unique(labels)) == 2  # ranking metrics need both classes present
    return {
        "n": int(len(labels)), "n_real": tn + fp, "n_fake": fn + tp,
        "threshold": float(threshold),
        "accuracy": float(skm.accuracy_score(labels, pred)),
        "precision": precision, "recall": recall, "f1": f1,
        "false_positive_rate": _ratio(fp, tn + fp),
        "roc_auc": float(skm.roc_auc_score(labels, p_fake)) if both else math.nan,
        "average_precision": float(skm.average_precision_score(labels, p_fake)) if both else math.nan,
        "eer": equal_error_rate(labels, p_fake) if both else math.nan,
        "brier": float(skm.brier_score_loss(labels, p_fake, pos_label=1)),
        "log_loss": float(skm.log_loss(labels, p_fake, labels=[0, 1])),
        "tn": tn, "fp": fp, "fn": fn, "tp": tp,
    }


def _ratio(part: int, whole: int) -> float:
    """``part / whole``; NaN when ``whole`` is 0 (the figure is undefined for this set)."""
    return part / whole if whole else math.nan


def full_report(labels: np.ndarray, p_fake: np.ndarray, threshold: float) -> dict:
    """Metrics at the chosen threshold, plus the threshold metrics at 0.5 for comparison."""
    at_half = compute_metrics(labels, p_fake, 0.5)
    return {**compute_metrics(labels, p_fake, threshold),
            "at_0.5": {k: at_half[k] for k in ("accuracy", "precision", "recall", "f1", "false_positive_rate",
                                               "tn", "fp", "fn", "tp")}}


def flagged(unfamiliarity: np.ndarray | None) -> np.ndarray | None:
    """Whether each image is flagged (unfamiliarity 1 or more: unlike the faces the model was trained
    on); None where the scores carry no verdict: a model without a familiarity head gives NaN for all."""
    if unfamiliarity is None or np.isnan(np.asarray(unfamiliarity, dtype=np.float64)).all():
        return None
    return np.asarray(unfamiliarity) >= 1


def familiarity_report(labels: np.ndarray, p_fake: np.ndarray, unfamiliarity: np.ndarray,
                       threshold: float) -> dict[str, float]:
    """What the familiarity head's flags cover at ``threshold``: ``flagged`` (the share of images
    flagged, ``n_flagged`` of them) and ``coverage`` (the share answered), ``accepted_roc_auc`` and
    ``accepted_accuracy`` on the images not flagged, ``confident_errors`` (the share of all images
    wrong and not flagged: the mistakes nothing warns of) and ``errors_flagged`` (the share of the
    wrong ones flagged). A figure without a denominator is NaN. ``unfamiliarity`` carries verdicts
    (:func:`flagged` is not None)."""
    labels, p_fake = np.asarray(labels).astype(int), np.asarray(p_fake, dtype=np.float64)
    flag = flagged(unfamiliarity)
    wrong = (p_fake >= threshold).astype(int) != labels
    kept = ~flag
    both = len(np.unique(labels[kept])) == 2
    return {"n_flagged": int(flag.sum()), "flagged": _ratio(int(flag.sum()), len(flag)),
            "coverage": _ratio(int(kept.sum()), len(flag)),
            "accepted_roc_auc": float(skm.roc_auc_score(labels[kept], p_fake[kept])) if both else math.nan,
            "accepted_accuracy": _ratio(int((kept & ~wrong).sum()), int(kept.sum())),
            "confident_errors": _ratio(int((kept & wrong).sum()), len(flag)),
            "errors_flagged": _ratio(int((flag & wrong).sum()), int(wrong.sum()))}


def per_source(labels: np.ndarray, p_fake: np.ndarray, sources: np.ndarray | list[str],
               threshold: float, unfamiliarity: np.ndarray | None = None) -> dict[str, dict]:
    """Per source, by name: :func:`per_fake_source`'s figures if it has fakes, :func:`per_real_source`'s
    if it has reals, both if both (their keys differ: ``n_fake`` marks the one, ``n_real`` the other)."""
    fakes = per_fake_source(labels, p_fake, sources, threshold, unfamiliarity)
    reals = per_real_source(labels, p_fake, sources, threshold, unfamiliarity)
    return {name: {**fakes.get(name, {}), **reals.get(name, {})} for name in sorted(fakes.keys() | reals.keys())}


def per_fake_source(labels: np.ndarray, p_fake: np.ndarray, sources: np.ndarray | list[str],
                    threshold: float, unfamiliarity: np.ndarray | None = None) -> dict[str, dict]:
    """Per source of fakes, by name: its fakes against every real image of the set (``roc_auc`` and
    ``average_precision``, NaN without reals), its ``recall`` at ``threshold`` and ``n_fake``; with
    the verdicts of a familiarity head (``unfamiliarity``, see :func:`flagged`), the share of its
    fakes ``flagged`` and the share ``caught_or_flagged`` (called fake, or flagged: not passed as real
    without a warning).

    Reals are one pool whatever their source, so each figure says how well that generator's fakes
    stand out from the photographs.
    """
    rows = {name: {k: m[k] for k in ("roc_auc", "average_precision", "recall", "n_fake")}
            for name, m in _each_source(labels, p_fake, sources, threshold, 1).items()}
    flag = flagged(unfamiliarity)
    if flag is not None:
        caught = np.asarray(p_fake) >= threshold
        for name, mine in _members(labels, sources, 1).items():
            rows[name] |= {"flagged": float(flag[mine].mean()),
                           "caught_or_flagged": float((caught | flag)[mine].mean())}
    return rows


def per_real_source(labels: np.ndarray, p_fake: np.ndarray, sources: np.ndarray | list[str],
                    threshold: float, unfamiliarity: np.ndarray | None = None) -> dict[str, dict]:
    """Per source of real images, by name: the share of its reals called fake at ``threshold``
    (``false_positive_rate``), ``n_real``, and ``real_roc_auc``: every fake of the set against its
    reals (NaN without fakes), how well the fakes stand out from this source's photographs; with the
    verdicts of a familiarity head (``unfamiliarity``), the share of its reals flagged (``real_flagged``).

    No average precision: with every fake as a positive, it would say more about the pool of fakes
    and its size than about this source.
    """
    rows = {name: {"false_positive_rate": m["false_positive_rate"], "real_roc_auc": m["roc_auc"], "n_real": m["n_real"]}
            for name, m in _each_source(labels, p_fake, sources, threshold, 0).items()}
    flag = flagged(unfamiliarity)
    if flag is not None:
        for name, mine in _members(labels, sources, 0).items():
            rows[name]["real_flagged"] = float(flag[mine].mean())
    return rows


def _members(labels: np.ndarray, sources: np.ndarray | list[str], label: int) -> dict[str, np.ndarray]:
    """Per source with ``label`` images, by name: which images are its images of that class."""
    labels, sources = np.asarray(labels).astype(int), np.asarray(sources)
    return {name: (labels == label) & (sources == name) for name in sorted(set(sources[labels == label].tolist()))}


def _each_source(labels: np.ndarray, p_fake: np.ndarray, sources: np.ndarray | list[str], threshold: float,
                 label: int) -> dict[str, dict]:
    """:func:`compute_metrics` per source of ``label`` images: its images of that class against every
    image of the other class, whatever their source."""
    labels, p_fake = np.asarray(labels).astype(int), np.asarray(p_fake)
    result = {}
    for name, mine in _members(labels, sources, label).items():
        keep = (labels != label) | mine
        result[name] = compute_metrics(labels[keep], p_fake[keep], threshold)
    return result
