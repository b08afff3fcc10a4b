"""`deepfake evaluate --data DIR --model ...` scores any labelled folder or CSV with a stored model."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from conftest import ROOT, synthetic_face


@pytest.fixture
def model_dir(synthetic_model):
    return synthetic_model


def labelled_folder(root):
    """Unseen faces in real/ and fake/ (PNG, unlike the JPEG training data), plus one broken file."""
    for label, cls in enumerate(("real", "fake")):
        (root / cls).mkdir(parents=True)
        for i in range(6):
            synthetic_face(label, 5000 + i, 32).save(root / cls / f"{i}.png")
    (root / "fake" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


def evaluate(data, model_dir, out, *extra):
    return subprocess.run([sys.executable, "-m", "deepfake_detector.cli", "evaluate", "--params", str(ROOT / "params.yaml"),
                           "--data", str(data), "--model", str(model_dir), "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=300)


def test_folder_is_scored_and_bad_files_reported(tmp_path, model_dir):
    data = labelled_folder(tmp_path / "other-faces")
    result = evaluate(data, model_dir, tmp_path / "out", "--threshold", "0.5")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert (metrics["n"], metrics["n_real"], metrics["n_fake"], metrics["unreadable"]) == (12, 6, 6, 1)
    assert metrics["threshold"] == 0.5 and metrics["roc_auc"] >= 0.9
    with (tmp_path / "out" / "unreadable.csv").open() as f:
        assert [row["path"].rsplit("/", 1)[1] for row in csv.DictReader(f)] == ["broken.jpg"]
    assert (tmp_path / "out" / "plots" / "images" / "roc.png").stat().st_size > 0


def test_csv_with_kaggle_style_label_str(tmp_path, model_dir):
    data = labelled_folder(tmp_path / "faces")
    rows = [{"path": f"{cls}/{i}.png", "label": 1 - label, "label_str": cls}  # Kaggle: label 1 = real
            for label, cls in enumerate(("real", "fake")) for i in range(6)]
    with (data / "labels.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "label_str"])
        writer.writeheader()
        writer.writerows(rows)
    result = evaluate(data / "labels.csv", model_dir, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert (metrics["n_real"], metrics["n_fake"], metrics["unreadable"]) == (6, 6, 0)
    assert metrics["roc_auc"] >= 0.9  # label_str was used: the numeric column would invert this


def test_folder_without_classes_is_a_clear_error(tmp_path, model_dir):
    (tmp_path / "flat").mkdir()
    result = evaluate(tmp_path / "flat", model_dir, tmp_path / "out")
    assert result.returncode == 2 and "needs real/ and fake/" in result.stderr and "Traceback" not in result.stderr
