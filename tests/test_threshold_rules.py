"""benchmarks/threshold_rules.py: the rule chosen on valid by split-half, on scores with known answers."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, benchmark_module

threshold_rules = benchmark_module("threshold_rules")


def test_split_half_scores_each_rule_on_the_half_it_did_not_see():
    labels = np.array([0] * 100 + [1] * 180)
    rng = np.random.default_rng(1)
    # Separable, but every score is above 0.5: a fixed 0.5 calls every real face fake, while the rules
    # that read the scores find the gap between 0.6-0.7 (real) and 0.8-0.9 (fake).
    p_fake = np.where(labels == 1, rng.uniform(0.8, 0.9, len(labels)), rng.uniform(0.6, 0.7, len(labels)))
    assert threshold_rules.split_half(labels, p_fake, "fixed", repeats=20) == pytest.approx(180 / 280)
    for rule in ("eer", "max_accuracy"):
        # The threshold lands on an edge of the half it was fit on: a few of the other half's fakes fall below it.
        assert threshold_rules.split_half(labels, p_fake, rule, repeats=20) > 0.95
    # Overlapping scores: a threshold fit on one half loses on the other, so split-half is below the fit.
    noisy = np.where(labels == 1, rng.normal(0.6, 0.15, len(labels)), rng.normal(0.4, 0.15, len(labels)))
    fit = threshold_rules.accuracy(labels, noisy, threshold_rules.choose_threshold(labels, noisy, "max_accuracy"))
    assert 0.6 < threshold_rules.split_half(labels, noisy, "max_accuracy", repeats=20) < fit


def test_the_benchmark_scores_a_model_and_names_the_chosen_rule(tmp_path, synthetic_model, synthetic_processed):
    out = tmp_path / "rules.json"
    result = subprocess.run([sys.executable, "benchmarks/threshold_rules.py", "--model", str(synthetic_model),
                             "--data", str(synthetic_processed), "--repeats", "10", "--json", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(out.read_text())
    assert [r["rule"] for r in figures["rules"]] == ["eer", "max_accuracy", "fixed"]
    best = max(figures["rules"], key=lambda r: r["split_half_valid_accuracy"])
    assert figures["chosen"] == best["rule"] and f"| {best['rule']} (chosen) |" in result.stdout
    assert all(0 <= r["test_accuracy"] <= 1 for r in figures["rules"])


@pytest.mark.parametrize("rule", ["eer", "target_fpr", "max_accuracy"])
def test_the_twins_do_not_set_the_operating_point(rule):
    """The fakes of the model's spectrum_only sources (the twins, as many as the reals, which the CNN
    never learned) are left out of the threshold's choice: with them, eer falls among the reals."""
    from deepfake_detector.evaluate import valid_threshold
    from deepfake_detector.metrics import choose_threshold
    from deepfake_detector.params import EvaluateParams

    rng = np.random.default_rng(0)
    reals, fakes, twins = rng.uniform(0.1, 0.4, 100), rng.uniform(0.6, 0.95, 100), rng.uniform(0.05, 0.3, 200)
    p = np.concatenate([reals, fakes, twins])
    labels = np.repeat([0, 1, 1], [100, 100, 200])
    sources = np.repeat(["stylegan", "stylegan", "twins"], [100, 100, 200])
    params = EvaluateParams(threshold_rule=rule)
    threshold = valid_threshold(labels, p, sources, ("twins",), params)
    assert threshold == choose_threshold(labels[:200], p[:200], rule, params.target_fpr)
    assert np.mean(reals >= threshold) <= 0.05 and np.mean(fakes >= threshold) >= 0.95
    if rule == "eer":  # counted, the twins drag the point down among the reals
        assert np.mean(reals >= valid_threshold(labels, p, sources, (), params)) > 0.3
    assert valid_threshold(labels, p, sources, ("sd",), params) == choose_threshold(labels, p, rule, params.target_fpr)


def test_source_fpr_holds_the_target_on_each_real_source_apart():
    """Pooled, a large source of reals that the model is sure of hides a smaller one it is not: the
    source_fpr rule holds evaluate.target_fpr on each, the strictest point of all."""
    from deepfake_detector.evaluate import valid_threshold
    from deepfake_detector.metrics import choose_threshold
    from deepfake_detector.params import EvaluateParams

    rng = np.random.default_rng(0)
    ffhq, utk = rng.uniform(0.2, 0.7, 100), rng.uniform(0.0, 0.3, 200)  # FFHQ's reals look more like the fakes
    fakes, twins = rng.uniform(0.5, 1.0, 200), rng.uniform(0.0, 0.9, 300)
    p = np.concatenate([ffhq, utk, fakes, twins])
    labels = np.repeat([0, 0, 1, 1], [100, 200, 200, 300])
    sources = np.repeat(["stylegan", "utk", "stylegan", "twins"], [100, 200, 200, 300])
    params = EvaluateParams(threshold_rule="source_fpr", target_fpr=0.05)
    pooled = choose_threshold(labels[:500], p[:500], "target_fpr", 0.05)
    assert np.mean(ffhq >= pooled) > 0.1  # the pooled 5 % is FFHQ's 0.1 and more
    threshold = valid_threshold(labels, p, sources, ("twins",), params)  # the twins' fakes choose nothing
    assert threshold == choose_threshold(labels[:500], p[:500], "source_fpr", 0.05, sources=sources[:500])
    assert np.mean(ffhq >= threshold) <= 0.05 and np.mean(utk >= threshold) <= 0.05
    # The highest recall that holds: FFHQ's own target_fpr point, as UTKFace's is lower.
    mine = sources[:500] == "stylegan"
    assert threshold == choose_threshold(labels[:500][mine], p[:500][mine], "target_fpr", 0.05) > pooled
    with pytest.raises(ValueError, match="needs each image's source"):
        choose_threshold(labels, p, "source_fpr")
