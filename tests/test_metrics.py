"""Metrics agree with scikit-learn and with first principles."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from deepfake_detector.evaluate import report, robustness_row
from deepfake_detector.metrics import (
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


def test_threshold_metrics_without_a_denominator_are_undefined_not_zero():
    fakes = compute_metrics(np.array([1, 1]), np.array([0.2, 0.8]), 0.5)
    assert (fakes["precision"], fakes["recall"], fakes["f1"]) == (1.0, 0.5, pytest.approx(2 / 3))
    assert np.isnan(fakes["false_positive_rate"])  # no reals to call fake
    reals = compute_metrics(np.array([0, 0, 0]), np.array([0.2, 0.6, 0.9]), 0.5)
    assert np.isnan(reals["recall"]) and np.isnan(reals["f1"])  # no fakes to catch
    assert reals["precision"] == 0.0 and reals["false_positive_rate"] == pytest.approx(2 / 3)  # two called fake
    quiet = compute_metrics(np.array([0, 1]), np.array([0.2, 0.3]), 0.5)
    assert np.isnan(quiet["precision"]) and np.isnan(quiet["f1"])  # nothing called fake
    assert (quiet["recall"], quiet["false_positive_rate"]) == (0.0, 0.0)
    missed = compute_metrics(np.array([0, 1]), np.array([0.7, 0.3]), 0.5)
    assert (missed["precision"], missed["recall"], missed["f1"]) == (0.0, 0.0, 0.0)  # defined, and all wrong


def test_eer_brier_and_counts():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 400)
    scores = np.clip(labels * 0.25 + rng.normal(0.4, 0.2, 400), 0, 1)
    m = compute_metrics(labels, scores, threshold=0.5)
    assert m["brier"] == pytest.approx(skm.brier_score_loss(labels, scores))
    assert (m["n_real"], m["n_fake"]) == ((labels == 0).sum(), (labels == 1).sum())
    # EER by brute force: the threshold where the two error rates are closest.
    best = min(np.unique(scores),
               key=lambda t: abs(np.mean(scores[labels == 0] >= t) - np.mean(scores[labels == 1] < t)))
    fpr, fnr = np.mean(scores[labels == 0] >= best), np.mean(scores[labels == 1] < best)
    assert m["eer"] == pytest.approx((fpr + fnr) / 2, abs=0.01)
    assert compute_metrics(np.array([0, 1]), np.array([0.2, 0.8]))["eer"] == 0.0


def test_threshold_rules_on_validation_scores():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 300)
    scores = np.clip(labels * 0.3 + rng.normal(0.35, 0.2, 300), 0, 1)
    accuracy = lambda t: np.mean((scores >= t) == labels)  # noqa: E731
    t = choose_threshold(labels, scores, "max_accuracy")
    assert accuracy(t) == pytest.approx(max(accuracy(c) for c in np.unique(scores)))
    t = choose_threshold(labels, scores, "target_fpr", target_fpr=0.1)
    fpr = lambda t: np.mean(scores[labels == 0] >= t)  # noqa: E731
    recall = lambda t: np.mean(scores[labels == 1] >= t)  # noqa: E731
    assert fpr(t) <= 0.1
    assert recall(t) == pytest.approx(max(recall(c) for c in np.unique(scores) if fpr(c) <= 0.1))
    assert choose_threshold(labels, scores, "fixed", fixed=0.7) == 0.7
    # eer: the two error rates meet there (as near as the scores allow), and their mean is the EER.
    t = choose_threshold(labels, scores, "eer")
    fnr = lambda t: 1 - recall(t)  # noqa: E731
    closest = min(abs(fpr(c) - fnr(c)) for c in np.unique(scores))
    assert abs(fpr(t) - fnr(t)) <= closest + 2 / min(np.bincount(labels))
    assert (fpr(t) + fnr(t)) / 2 == pytest.approx(compute_metrics(labels, scores)["eer"])
    assert choose_threshold(np.zeros(5, int), scores[:5], "max_accuracy", fixed=0.3) == 0.3  # one class


def test_full_report_keeps_the_0_5_figures_and_calibration_rows():
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.3, 0.45, 0.4, 0.7, 0.95])
    report = full_report(labels, scores, threshold=0.35)
    assert report["threshold"] == 0.35 and report["tp"] == 3 and report["fp"] == 1
    assert report["false_positive_rate"] == pytest.approx(1 / 3)  # 0.45 of the three reals
    assert report["at_0.5"]["tp"] == 2 and report["at_0.5"]["fp"] == 0 and report["at_0.5"]["false_positive_rate"] == 0
    rows = calibration(labels, scores, bins=2)
    assert rows == [{"bin": 0.25, "mean_p_fake": pytest.approx(0.3125), "fraction_fake": 0.25, "count": 4},
                    {"bin": 0.75, "mean_p_fake": pytest.approx(0.825), "fraction_fake": 1.0, "count": 2}]


def test_per_fake_source_ranks_each_source_s_fakes_against_all_reals():
    # Reals 0.2 and 0.4 (their sources get no entry here); stylegan's fakes above both, sd's below both,
    # gan2's one fake between them.
    labels = np.array([0, 0, 1, 1, 1, 1, 1])
    scores = np.array([0.2, 0.4, 0.6, 0.9, 0.1, 0.15, 0.3])
    sources = ["ffhq", "stylegan", "stylegan", "stylegan", "sd", "sd", "gan2"]
    m = per_fake_source(labels, scores, sources, threshold=0.5)
    assert list(m) == ["gan2", "sd", "stylegan"]  # by name
    assert m["stylegan"] == {"roc_auc": 1.0, "average_precision": 1.0, "recall": 1.0, "n_fake": 2}
    assert (m["sd"]["roc_auc"], m["sd"]["recall"], m["sd"]["n_fake"]) == (0.0, 0.0, 2)
    # sd ranked last: precision 1/3 at recall 1/2, 2/4 at recall 1 -> AP = (1/3 + 1/2) / 2.
    assert m["sd"]["average_precision"] == pytest.approx(5 / 12)
    assert (m["gan2"]["roc_auc"], m["gan2"]["average_precision"], m["gan2"]["recall"]) == (0.5, 0.5, 0.0)
    assert per_fake_source(labels, scores, sources, threshold=0.12)["sd"]["recall"] == 0.5  # 0.15 caught, 0.1 not
    # stylegan also has a real image (0.4, under 2 of the 5 fakes): per_source gives it both sets of
    # figures, ffhq the real ones only.
    both = per_source(labels, scores, sources, threshold=0.5)
    assert list(both) == ["ffhq", "gan2", "sd", "stylegan"]
    assert both["stylegan"] == {**m["stylegan"], "false_positive_rate": 0.0, "real_roc_auc": 0.4, "n_real": 1}
    assert set(both["ffhq"]) == {"false_positive_rate", "real_roc_auc", "n_real"}


def test_per_source_without_reals_has_undefined_ranking_metrics():
    m = per_source(np.array([1, 1, 1]), np.array([0.2, 0.7, 0.9]), np.array(["a", "b", "b"]), threshold=0.5)
    assert np.isnan(m["a"]["roc_auc"]) and np.isnan(m["b"]["average_precision"])
    assert (m["a"]["recall"], m["b"]["recall"], m["b"]["n_fake"]) == (0.0, 1.0, 2)
    assert per_fake_source(np.array([0, 0]), np.array([0.1, 0.2]), ["x", "y"], 0.5) == {}  # no fakes, no entries
    reals = per_source(np.array([0, 0]), np.array([0.1, 0.7]), ["x", "y"], 0.5)  # no fakes: no AUC, still an FPR
    assert (reals["x"]["false_positive_rate"], reals["y"]["false_positive_rate"]) == (0.0, 1.0)
    assert np.isnan(reals["y"]["real_roc_auc"]) and reals["y"]["n_real"] == 1


# Three sources of reals (ffhq, utk, and mix, which also has a fake) and one of fakes (stylegan).
LABELS = np.array([0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 1])
SCORES = np.array([0.1, 0.2, 0.3, 0.7, 0.6, 0.8, 0.4, 0.9, 0.65, 0.35, 0.05, 0.75])
SOURCES = ["ffhq"] * 4 + ["utk"] * 3 + ["stylegan"] * 3 + ["mix"] * 2


def test_per_real_source_by_hand():
    """Each source's reals: the share called fake at the threshold, and every fake (0.9, 0.65, 0.35,
    0.75) ranked against them."""
    m = per_real_source(LABELS, SCORES, SOURCES, threshold=0.5)
    assert list(m) == ["ffhq", "mix", "utk"]  # stylegan has no reals
    # ffhq: 0.7 of 0.1/0.2/0.3/0.7 is called fake; fakes above its reals in 4 + 3 + 3 + 4 of 16 pairs.
    assert m["ffhq"] == {"false_positive_rate": 0.25, "real_roc_auc": 14 / 16, "n_real": 4}
    # utk: 0.6 and 0.8 of 0.6/0.8/0.4 called fake; fakes above its reals in 3 + 2 + 0 + 2 of 12 pairs.
    assert m["utk"] == {"false_positive_rate": pytest.approx(2 / 3), "real_roc_auc": pytest.approx(7 / 12), "n_real": 3}
    assert m["mix"] == {"false_positive_rate": 0.0, "real_roc_auc": 1.0, "n_real": 1}  # 0.05, under every fake
    at_075 = per_real_source(LABELS, SCORES, SOURCES, threshold=0.75)
    assert at_075["utk"]["false_positive_rate"] == pytest.approx(1 / 3)  # 0.8 only
    assert compute_metrics(LABELS, SCORES, 0.5)["false_positive_rate"] == 3 / 8  # 0.7, 0.6, 0.8 of the 8 reals

    both = per_source(LABELS, SCORES, SOURCES, threshold=0.5)
    assert list(both) == ["ffhq", "mix", "stylegan", "utk"]
    # stylegan's fakes against all 8 reals: 8 + 6 + 4 of 24 pairs; ranked 1st, 4th and 7th -> AP (1 + 2/4 + 3/7) / 3.
    assert both["stylegan"] == {"roc_auc": 0.75, "average_precision": pytest.approx(9 / 14),
                                "recall": pytest.approx(2 / 3), "n_fake": 3}
    # mix's fake (0.75) is under one real (utk's 0.8): AUC 7/8, AP 1/2; its real (0.05) as above.
    assert both["mix"] == {"roc_auc": 7 / 8, "average_precision": 0.5, "recall": 1.0, "n_fake": 1, **m["mix"]}


def test_a_robustness_row_has_the_fake_sources_auc_and_the_real_sources_false_positive_rate():
    row = robustness_row(LABELS, SCORES, SOURCES, threshold=0.5)
    assert row == {"auc": compute_metrics(LABELS, SCORES)["roc_auc"], "accuracy": 8 / 12,
                   "sources": {"mix": 7 / 8, "stylegan": 0.75},
                   "source_fpr": {"ffhq": 0.25, "mix": 0.0, "utk": pytest.approx(2 / 3)}}


# The familiarity head's verdicts on the set above: 1 or more is flagged (1.0 itself too). Flagged: ffhq's
# 2nd real (right), utk's 1st and 2nd (called fake: wrong), stylegan's 3rd fake (missed: wrong), mix's fake.
UNFAMILIARITY = np.array([0.2, 1.5, 0.3, 0.9, 1.0, 2.0, 0.5, 0.1, 0.4, 3.0, 0.6, 1.2])


def test_familiarity_report_by_hand():
    """At 0.5 four answers are wrong: ffhq's 0.7, utk's 0.6 and 0.8 (reals called fake) and stylegan's
    0.35 (a fake missed); five images are flagged, three of them wrong."""
    m = familiarity_report(LABELS, SCORES, UNFAMILIARITY, threshold=0.5)
    assert m == {"n_flagged": 5, "flagged": 5 / 12, "coverage": 7 / 12,
                 # Not flagged: reals 0.1, 0.3, 0.7, 0.4, 0.05 and fakes 0.9, 0.65; 0.65 is under 0.7 only.
                 "accepted_roc_auc": pytest.approx(9 / 10), "accepted_accuracy": pytest.approx(6 / 7),
                 "confident_errors": 1 / 12,  # ffhq's 0.7: wrong, and nothing warns of it
                 "errors_flagged": 3 / 4}
    everything = familiarity_report(LABELS, SCORES, np.full(12, 5.0), threshold=0.5)
    assert (everything["flagged"], everything["coverage"], everything["confident_errors"]) == (1.0, 0.0, 0.0)
    assert np.isnan(everything["accepted_roc_auc"]) and np.isnan(everything["accepted_accuracy"])  # none answered
    assert np.isnan(familiarity_report([0, 1], [0.1, 0.9], [0.0, 0.0], 0.5)["errors_flagged"])  # nothing wrong


def test_per_source_flags_by_hand():
    m = per_source(LABELS, SCORES, SOURCES, 0.5, UNFAMILIARITY)
    # stylegan: 0.9 and 0.65 caught, 0.35 missed but flagged.
    assert (m["stylegan"]["flagged"], m["stylegan"]["caught_or_flagged"]) == (pytest.approx(1 / 3), 1.0)
    assert (m["mix"]["flagged"], m["mix"]["caught_or_flagged"], m["mix"]["real_flagged"]) == (1.0, 1.0, 0.0)
    assert (m["ffhq"]["real_flagged"], m["utk"]["real_flagged"]) == (0.25, pytest.approx(2 / 3))
    assert "flagged" not in m["ffhq"] and "caught_or_flagged" not in m["utk"]  # sources of reals only
    # Caught or flagged counts each fake once: at 0.95 nothing is caught, and only the flags remain.
    assert per_fake_source(LABELS, SCORES, SOURCES, 0.95, UNFAMILIARITY)["stylegan"]["caught_or_flagged"] == \
        pytest.approx(1 / 3)
    row = robustness_row(LABELS, SCORES, SOURCES, 0.5, UNFAMILIARITY)
    assert row["flagged"] == 5 / 12


def test_a_model_without_a_familiarity_head_adds_no_flag_figures():
    """Its unfamiliarity is NaN for every image: no verdict, so no familiarity figures anywhere."""
    none = np.full(len(LABELS), np.nan)
    assert flagged(none) is None and flagged(None) is None
    assert flagged(UNFAMILIARITY).tolist() == [u >= 1 for u in UNFAMILIARITY]
    assert per_source(LABELS, SCORES, SOURCES, 0.5, none) == per_source(LABELS, SCORES, SOURCES, 0.5)
    assert "flagged" not in robustness_row(LABELS, SCORES, SOURCES, 0.5, none)
    without, with_head = report(LABELS, SCORES, none, SOURCES, 0.5), report(LABELS, SCORES, UNFAMILIARITY, SOURCES, 0.5)
    assert "familiarity" not in without and set(without["per_source"]["ffhq"]) == {"false_positive_rate",
                                                                                  "real_roc_auc", "n_real"}
    assert with_head["familiarity"] == familiarity_report(LABELS, SCORES, UNFAMILIARITY, 0.5)
    assert {k: with_head[k] for k in without if k != "per_source"} == {k: v for k, v in without.items()
                                                                       if k != "per_source"}
