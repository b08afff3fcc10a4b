"""Metrics agree with scikit-learn and with first principles."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from deepfake_detector.evaluate import compute_metrics


def test_metrics_match_sklearn_on_random_scores():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 500)
    scores = np.clip(labels * 0.3 + rng.normal(0.35, 0.25, 500), 0, 1)
    m = compute_metrics(labels, scores, threshold=0.5)
    pred = (scores >= 0.5).astype(int)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(labels, pred))
    assert m["precision"] == pytest.approx(skm.precision_score(labels, pred))
    assert m["recall"] == pytest.approx(skm.recall_score(labels, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(labels, pred))
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(labels, scores))
    assert m["average_precision"] == pytest.approx(skm.average_precision_score(labels, scores))
    assert m["log_loss"] == pytest.approx(skm.log_loss(labels, scores), rel=1e-5)
    assert [m["tn"], m["fp"], m["fn"], m["tp"]] == skm.confusion_matrix(labels, pred).ravel().tolist()


def test_known_small_case_by_hand():
    labels = np.array([0, 0, 1, 1])
    scores = np.array([0.1, 0.6, 0.4, 0.9])
    m = compute_metrics(labels, scores, threshold=0.5)
    # pred = 0 1 0 1: one true negative, one false positive, one false negative, one true positive.
    assert (m["tn"], m["fp"], m["fn"], m["tp"]) == (1, 1, 1, 1)
    assert m["accuracy"] == m["precision"] == m["recall"] == m["f1"] == 0.5
    # AUC = share of (fake, real) pairs ranked right: 0.4>0.1, 0.9>0.1, 0.9>0.6 but not 0.4>0.6 -> 3/4.
    assert m["roc_auc"] == 0.75
    assert compute_metrics(labels, scores, threshold=0.05)["recall"] == 1.0


def test_one_class_gives_nan_ranking_metrics_not_an_error():
    m = compute_metrics(np.array([1, 1]), np.array([0.2, 0.8]))
    assert np.isnan(m["roc_auc"]) and np.isnan(m["average_precision"])
    assert m["accuracy"] == 0.5
