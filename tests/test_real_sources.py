"""Two sources of real faces (issue #33): training weighs them alike with `train.balance: sources`, and
evaluation reports each one's false positive rate in metrics.json, the robustness rows, the model card,
the per-source plot and the printed report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import ONE_ROBUSTNESS_ROW, TINY_RUN, make_dataset, one_class_source
from deepfake_detector import cli, evaluate, train
from deepfake_detector.card import model_card
from deepfake_detector.heads import load_checkpoint
from deepfake_detector.params import Params, flatten, with_overrides
from deepfake_detector.stages import download, preprocess


@pytest.fixture(scope="module")
def two_real_sources(tmp_path_factory) -> tuple[Params, Path]:
    """ffhq (8 real and 8 fake per split) and utk (4 real per split), downloaded and preprocessed."""
    root = tmp_path_factory.mktemp("real-sources")
    ffhq = make_dataset(root / "ffhq", per_class=8, size=32, nested=False)
    utk = one_class_source(root / "utk", 0, 4, 7000)
    p = with_overrides(Params(), [f"data.source={{ffhq: {ffhq}, utk: {utk}}}", *TINY_RUN, *ONE_ROBUSTNESS_ROW])
    download.run(p, root / "raw")
    preprocess.run(p, root / "raw", root / "processed", workers=1)
    return p, root / "processed"


@pytest.mark.slow
def test_balance_by_sources_trains_and_each_real_source_is_reported(two_real_sources, tmp_path, capsys):
    p, processed = two_real_sources
    cpu = torch.device("cpu")
    for balance in ("sources", "auto"):
        params = with_overrides(p, [f"train.balance={balance}"]).train
        train.fit(processed, tmp_path / balance, p.model, params, cpu, p.seed, progress=False)
    weights = [load_checkpoint(tmp_path / b / "model.pt")[0].state_dict() for b in ("sources", "auto")]
    # Train: 12 reals (ffhq 8, utk 4) and 8 fakes: each group's weight differs from its class's, and so the model.
    assert not all(torch.equal(a, b) for a, b in zip(*(w.values() for w in weights)))

    out = tmp_path / "eval"
    metrics = evaluate.run(processed, tmp_path / "sources" / "model.pt", out, p.evaluate, cpu, p.seed)
    written = json.loads((out / "metrics.json").read_text())
    assert list(written["per_source"]) == ["ffhq", "utk"]
    # The default model has a familiarity head: each source's rows say what share of its images it flags.
    assert set(written["per_source"]["utk"]) == {"false_positive_rate", "real_roc_auc", "n_real", "real_flagged"}
    assert set(written["per_source"]["ffhq"]) == {"roc_auc", "average_precision", "recall", "n_fake", "flagged",
                                                  "caught_or_flagged", "false_positive_rate", "real_roc_auc", "n_real",
                                                  "real_flagged"}
    utk, ffhq = written["per_source"]["utk"], written["per_source"]["ffhq"]
    assert all(0 <= share <= 1 for share in (utk["real_flagged"], ffhq["real_flagged"], ffhq["flagged"]))
    assert ffhq["recall"] <= ffhq["caught_or_flagged"]  # called fake, or flagged: never fewer than called fake
    assert (utk["n_real"], ffhq["n_real"], ffhq["n_fake"]) == (4, 8, 8)
    # The overall false positive rate is the two sources' reals together.
    assert written["false_positive_rate"] * 12 == pytest.approx(utk["false_positive_rate"] * 4
                                                               + ffhq["false_positive_rate"] * 8)
    row = written["robustness"]["jpeg_q50"]
    assert set(row["source_fpr"]) == {"ffhq", "utk"} and list(row["sources"]) == ["ffhq"]
    logged = flatten({f"test_{k}": v for k, v in metrics.items()})  # as the evaluate stage logs them to MLflow
    assert {"test_per_source.utk.false_positive_rate", "test_robustness.jpeg_q50.source_fpr.utk"} <= set(logged)
    rows = json.loads((out / "plots" / "per_source.json").read_text())["per_source"]
    assert [r["source"] for r in rows] == ["ffhq", "utk"]
    assert (out / "plots" / "images" / "per_source.png").stat().st_size > 0

    card = model_card("m", metrics, {}, {}, None)
    assert "## Per source of real faces (test split)" in card
    assert f"| utk | 4 | {utk['false_positive_rate']:.4f} |" in card
    assert "| perturbation | ROC AUC | accuracy | false positive rate, ffhq | false positive rate, utk |" in card
    cli.report_evaluate(p, metrics, out)
    printed = capsys.readouterr().out
    assert f"utk: 4 reals, false positive rate {utk['false_positive_rate']:.4f}" in printed
    assert "ffhq: 8 fakes, AUC" in printed and "; 8 reals, false positive rate" in printed
