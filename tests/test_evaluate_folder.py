"""`deepfake evaluate --data DIR --model ...` scores any labelled folder or CSV with a stored model; what
evaluation (that and the pipeline's stage) reports of the familiarity head's flags."""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, make_dataset, model_copy, synthetic_face
from deepfake_detector.detector import Detector
from deepfake_detector.metrics import familiarity_report, per_source


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
    return subprocess.run([sys.executable, "-m", "deepfake_detector.cli", "evaluate",
                           "--params", str(ROOT / "params.yaml"), "--data", str(data), "--model", str(model_dir),
                           "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
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
    assert list(metrics["per_source"]) == ["other-faces"] and metrics["per_source"]["other-faces"]["n_fake"] == 6


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
    assert result.returncode == 2 and "needs a real/ or fake/ subfolder" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_sources_are_scored_whole_and_reported_per_source(tmp_path, model_dir):
    """A mapping of sources as data.source takes it: one with splits (all three scored), one unsplit and
    fakes only; per_source in metrics.json is metrics.per_source of the same scores."""
    stylegan = make_dataset(tmp_path / "stylegan", per_class=3, size=32, nested=False)  # 9 real, 9 fake
    sd = tmp_path / "sd-fakes"
    (sd / "fake").mkdir(parents=True)
    for i in range(4):
        synthetic_face(1, 8000 + i, 32).save(sd / "fake" / f"{i}.png")
    (sd / "fake" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    result = evaluate(f"{{stylegan: {stylegan}, sd: {sd}}}", model_dir, out, "--threshold", "0.5")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["n_real"], metrics["n_fake"], metrics["unreadable"]) == (9, 13, 1)
    assert list(metrics["per_source"]) == ["sd", "stylegan"]
    assert [s["n_fake"] for s in metrics["per_source"].values()] == [4, 9]
    assert "sd: 4 fakes, AUC" in result.stdout and "stylegan: 9 fakes, AUC" in result.stdout
    with (out / "unreadable.csv").open() as f:
        assert [Path(r["path"]).name for r in csv.DictReader(f)] == ["broken.png"]

    with (out / "plots" / "predictions.csv").open() as f:
        files = [Path(r["path"]) for r in csv.DictReader(f)]
    scored = Detector.load(str(model_dir)).score(files)
    assert not any(scored.errors) and len(files) == 22
    labels = np.array([int(f.parent.name == "fake") for f in files])
    names = ["sd" if f.is_relative_to(sd) else "stylegan" for f in files]
    for name, expected in per_source(labels, scored.p_fake, names, 0.5, scored.unfamiliarity).items():
        assert metrics["per_source"][name] == pytest.approx(expected, abs=1e-6), name
    rows = json.loads((out / "plots" / "per_source.json").read_text())["per_source"]
    assert [(r["source"], r["n_fake"]) for r in rows] == [("sd", 4), ("stylegan", 9)]
    assert (out / "plots" / "images" / "per_source.png").stat().st_size > 0

    # One folder with splits is one source, named after it, every split scored.
    result = evaluate(stylegan, model_dir, tmp_path / "one", "--threshold", "0.5")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert metrics["n"] == 18 and list(metrics["per_source"]) == ["stylegan"]
    assert metrics["per_source"]["stylegan"]["roc_auc"] == metrics["roc_auc"]  # all fakes are its fakes


def kaggle_csv(path, rows):
    """A CSV with the columns of Kaggle's 140k CSVs (numeric ``label`` 1 = real); ``rows`` are (path, class)."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["", "original_path", "id", "label", "label_str", "path"])
        writer.writerows((i, Path(p).name, Path(p).stem, int(cls == "real"), cls, p) for i, (p, cls) in enumerate(rows))


@pytest.mark.slow
def test_faces_mini_kaggle_csv_is_scored_in_place(tmp_path, model_dir, faces_mini):
    result = evaluate(faces_mini / "valid.csv", model_dir, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert (metrics["n_real"], metrics["n_fake"], metrics["unreadable"]) == (100, 100, 0)
    with (tmp_path / "out" / "plots" / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    # The CSV's paths (valid/real/x.jpg) were found under real-vs-fake/ beside it, each with its label_str.
    assert all(Path(r["path"]).is_relative_to(faces_mini / "real-vs-fake" / "valid") for r in rows)
    assert all(Path(r["path"]).parent.name == r["actual"] for r in rows)


@pytest.mark.slow
def test_kaggle_download_layout_and_root(tmp_path, model_dir):
    download = tmp_path / "140k"  # Kaggle's download: the CSVs beside real_vs_fake/real-vs-fake/
    split_root = download / "real_vs_fake" / "real-vs-fake"
    rows = []
    for label, cls in enumerate(("real", "fake")):
        (split_root / "test" / cls).mkdir(parents=True)
        for i in range(6):
            synthetic_face(label, 7000 + i, 32).save(split_root / "test" / cls / f"{i}.png")
            rows.append((f"test/{cls}/{i}.png", cls))
    kaggle_csv(download / "test.csv", rows)
    found = evaluate(download / "test.csv", model_dir, tmp_path / "out")
    assert found.returncode == 0, found.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert (metrics["n_real"], metrics["n_fake"], metrics["unreadable"]) == (6, 6, 0) and metrics["roc_auc"] >= 0.9

    moved = tmp_path / "elsewhere" / "test.csv"
    moved.parent.mkdir()
    shutil.copy(download / "test.csv", moved)
    lost = evaluate(moved, model_dir, tmp_path / "out-moved")
    assert lost.returncode == 2 and "Traceback" not in lost.stderr and len(lost.stderr.strip().splitlines()) == 1
    assert "test/real/0.png" in lost.stderr and "real_vs_fake/real-vs-fake/" in lost.stderr and "--root" in lost.stderr
    rooted = evaluate(moved, model_dir, tmp_path / "out-moved", "--root", str(split_root))
    assert rooted.returncode == 0, rooted.stderr
    assert json.loads((tmp_path / "out-moved" / "metrics.json").read_text())["n"] == 12


@pytest.mark.slow
def test_no_readable_image_is_one_line_and_keeps_the_previous_outputs(tmp_path, model_dir):
    out = tmp_path / "out"
    assert evaluate(labelled_folder(tmp_path / "good"), model_dir, out).returncode == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    bad = tmp_path / "bad"
    for cls in ("real", "fake"):
        (bad / cls).mkdir(parents=True)
        (bad / cls / "face.jpg").write_bytes(b"not an image")
    result = evaluate(bad, model_dir, out)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "none of the 2 images" in result.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # the previous run's, intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "good", "out"]  # no temporary folder left

    refused = evaluate(bad, model_dir, tmp_path)  # not replaced: it holds what evaluate never wrote
    assert refused.returncode == 2 and "holds files this stage does not write (bad, good, out)" in refused.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "good", "out"]


def test_one_class_set_gets_threshold_metrics_and_undefined_ranking_metrics(tmp_path, model_dir):
    data = tmp_path / "fakes-only"
    (data / "real").mkdir(parents=True)
    (data / "fake").mkdir()
    for i in range(5):
        synthetic_face(1, 6000 + i, 32).save(data / "fake" / f"{i}.png")
    result = evaluate(data, model_dir, tmp_path / "out", "--threshold", "0.5")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["roc_auc"] is metrics["average_precision"] is metrics["eer"] is None
    assert (metrics["n"], metrics["n_fake"], metrics["fn"] + metrics["tp"]) == (5, 5, 5)
    assert metrics["accuracy"] == metrics["recall"] == metrics["tp"] / 5  # all fakes: accuracy is recall
    assert metrics["false_positive_rate"] is None  # no reals to call fake
    assert "roc_auc undefined" in result.stdout
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "only fake images" in warnings[0] and "plots are skipped" in warnings[0]
    pngs = tmp_path / "out" / "plots" / "images"
    assert sorted(p.name for p in pngs.iterdir()) == ["confusion.png", "per_source.png", "reliability.png"]


class CountingDetector(Detector):
    """A Detector that counts the images it has decoded and not yet scored: what the scoring path holds."""

    held = peak = 0

    def prepare(self, data, crop_faces=None):
        prepared = super().prepare(data, crop_faces)
        self.held += 1
        self.peak = max(self.peak, self.held)
        return prepared

    def assess(self, images, transform=None):
        self.held -= len(images)
        return super().assess(images, transform)


def test_scoring_holds_one_batch_of_decoded_images_at_a_time(tmp_path, model_dir):
    files = sorted(labelled_folder(tmp_path / "faces").rglob("*.*"))  # 12 faces and a broken file
    streamed = CountingDetector.from_checkpoint(model_dir)
    streamed.batch_size = 4
    p_fake, errors, kept = streamed.score_files(files)
    assert len(kept) == 12 > 2 * streamed.batch_size and streamed.held == 0
    assert streamed.peak <= 2 * streamed.batch_size  # a batch scored and the next one prepared: never the whole set
    whole = Detector.from_checkpoint(model_dir)
    whole.batch_size = len(files)
    expected, expected_errors, expected_kept = whole.score_files(files)
    assert kept == expected_kept and errors == expected_errors and np.allclose(p_fake, expected, atol=1e-6)


def test_hostile_files_are_reported_or_scored_like_predict(tmp_path, model_dir):
    """EPS, an image under the model's min_source_size and a 16-bit PNG in a labelled folder: the first
    two listed in unreadable.csv with predict's reasons, the third scored like its 8-bit twin."""
    from PIL import Image

    from deepfake_detector.detector import Decision

    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    Decision(min_source_size=16).write(model / "detector.json")
    data = labelled_folder(tmp_path / "set")
    synthetic_face(1, 1, 64).save(data / "fake" / "drawing.png", format="EPS")  # the suffix lies
    synthetic_face(1, 2, 8).save(data / "fake" / "tiny.png")
    grey16 = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(grey16).save(data / "real" / "deep.png")
    Image.fromarray(np.rint(grey16 * (255 / 65535)).astype(np.uint8)).save(tmp_path / "deep8.png")
    result = evaluate(data, model, tmp_path / "eval")
    assert result.returncode == 0, result.stderr
    with (tmp_path / "eval" / "unreadable.csv").open() as f:
        reasons = {Path(r["path"]).name: r["reason"] for r in csv.DictReader(f)}
    assert reasons["drawing.png"].startswith("unsupported format: EPS") and reasons["tiny.png"].startswith("too small")
    with (tmp_path / "eval" / "plots" / "predictions.csv").open() as f:
        scored = {Path(r["path"]).name: float(r["p_fake"]) for r in csv.DictReader(f)}
    expected, _, _ = Detector.load(str(model)).score_files([tmp_path / "deep8.png"])
    assert scored["deep.png"] == pytest.approx(float(expected[0]), abs=1e-4)


def test_processed_split_without_a_source_column_is_one_source(tmp_path):
    """A folder preprocessed before sources were named: every test image is of meta.json's one source."""
    from deepfake_detector.evaluate import read_index

    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "index.csv").write_text("path,label,blur_sigma,noise_sigma\na.jpg,0,0,0\nb.jpg,1,0,0\n")
    (tmp_path / "meta.json").write_text("{}")
    assert read_index(tmp_path, "test") == (["a.jpg", "b.jpg"], ["default", "default"])
    (tmp_path / "meta.json").write_text('{"sources": ["faces-mini"]}')
    assert read_index(tmp_path, "test")[1] == ["faces-mini", "faces-mini"]
    (tmp_path / "test" / "index.csv").write_text("path,label,source,blur_sigma,noise_sigma\na.jpg,0,ffhq,0,0\n")
    assert read_index(tmp_path, "test") == (["a.jpg"], ["ffhq"])


# --- the familiarity head's flags ----------------------------------------------------------------------

def test_coverage_figures_are_those_of_the_scores(tmp_path, model_dir):
    """metrics.json's ``familiarity`` and per-source flags are metrics' figures of the Detector's own
    scores, and predictions.csv carries each image's verdict."""
    data = labelled_folder(tmp_path / "other-faces")
    result = evaluate(data, model_dir, tmp_path / "out", "--threshold", "0.5")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    files = sorted(p for p in data.rglob("*.png"))
    scored = Detector.load(str(model_dir)).score(files)
    labels = np.array([int(f.parent.name == "fake") for f in files])
    expected = familiarity_report(labels, scored.p_fake, scored.unfamiliarity, 0.5)
    undefined_as_nan = {k: math.nan if v is None else v for k, v in metrics["familiarity"].items()}
    assert undefined_as_nan == pytest.approx(expected, abs=1e-6, nan_ok=True)  # errors_flagged: none without errors
    assert metrics["familiarity"]["flagged"] + metrics["familiarity"]["coverage"] == pytest.approx(1)
    row = metrics["per_source"]["other-faces"]
    fakes = labels == 1
    assert row["flagged"] == pytest.approx(np.mean(scored.unfamiliarity[fakes] >= 1))
    assert row["caught_or_flagged"] == pytest.approx(np.mean((scored.p_fake[fakes] >= 0.5)
                                                             | (scored.unfamiliarity[fakes] >= 1)))
    assert row["real_flagged"] == pytest.approx(np.mean(scored.unfamiliarity[~fakes] >= 1))
    with (tmp_path / "out" / "plots" / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sum(r["familiar"] == "false" for r in rows) == metrics["familiarity"]["n_flagged"]
    assert all(r["familiar"] == ("true" if float(r["unfamiliarity"]) < 1 else "false") for r in rows)


@pytest.mark.parametrize("distance", [1e-30, None], ids=["flags-everything", "no-head"])
def test_a_head_that_flags_everything_and_a_model_without_one(tmp_path, model_dir, distance):
    """Every image flagged: nothing is answered, so the accepted figures are undefined (null) and
    every wrong answer is flagged. No head: no familiarity figures at all, and no verdicts."""
    data = labelled_folder(tmp_path / "other-faces")
    model = model_copy(model_dir, tmp_path / "model", distance)
    result = evaluate(data, model, tmp_path / "out", "--threshold", "0.5")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    row = metrics["per_source"]["other-faces"]
    with (tmp_path / "out" / "plots" / "predictions.csv").open() as f:
        verdicts = {(r["unfamiliarity"] != "", r["familiar"]) for r in csv.DictReader(f)}
    if distance is None:
        assert "familiarity" not in metrics and "familiarity.flagged" not in result.stdout
        assert not {"flagged", "caught_or_flagged", "real_flagged"} & set(row)
        assert verdicts == {(False, "")}
        return
    wrong = metrics["fp"] + metrics["fn"]
    assert metrics["familiarity"] == {"n_flagged": 12, "flagged": 1.0, "coverage": 0.0, "accepted_roc_auc": None,
                                      "accepted_accuracy": None, "confident_errors": 0.0,
                                      "errors_flagged": 1.0 if wrong else None}
    assert (row["flagged"], row["caught_or_flagged"], row["real_flagged"]) == (1.0, 1.0, 1.0)
    assert verdicts == {(True, "false")}
    assert "familiarity.coverage 0.0000" in result.stdout


def test_evaluate_stage_reports_and_logs_the_familiarity_figures(tmp_path, synthetic_processed, model_dir,
                                                                 monkeypatch):
    """The pipeline's evaluate stage: metrics.json, the model card and the training run's MLflow metrics
    carry the coverage figures, the per-source flags and each robustness row's share flagged."""
    import mlflow

    from deepfake_detector.params import Params, with_overrides
    from deepfake_detector.stages import evaluate as stage
    from deepfake_detector.tracking import RUN_FILE, Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)  # the store's artifacts (./mlruns) land here
    p = with_overrides(Params(), [f"mlflow.tracking_uri={uri}", "evaluate.robustness.jpeg_quality=[90]",
                                  "evaluate.robustness.blur_sigma=[]", "evaluate.robustness.noise_sigma=[]",
                                  "evaluate.robustness.downscale=[]", "evaluate.mistakes=2"])
    models = tmp_path / "models"
    shutil.copytree(model_dir, models)
    Tracker.start(p.mlflow, "train", {}, {}).save(models / RUN_FILE)  # as the train stage records its run
    metrics = stage.run(p, synthetic_processed, models, tmp_path / "eval", register_model=False)
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(written["familiarity"]) == {"n_flagged", "flagged", "coverage", "accepted_roc_auc",
                                           "accepted_accuracy", "confident_errors", "errors_flagged"}
    assert written["familiarity"]["coverage"] == pytest.approx(1 - written["familiarity"]["flagged"])
    source = next(iter(written["per_source"]))
    assert {"flagged", "caught_or_flagged", "real_flagged"} <= set(written["per_source"][source])
    assert 0 <= written["robustness"]["jpeg_q90"]["flagged"] <= 1
    card = (tmp_path / "eval" / "model_card.md").read_text()
    assert "## Unfamiliar faces (test split)" in card
    assert f"| flagged unfamiliar (share of images) | {written['familiarity']['flagged']:.4f} |" in card
    assert "| recall | flagged unfamiliar | caught or flagged unfamiliar |" in card

    run = mlflow.MlflowClient(tracking_uri=uri).get_run(json.loads((models / RUN_FILE).read_text())["run_id"])
    logged = run.data.metrics
    for key in ("flagged", "coverage", "confident_errors", "n_flagged"):
        assert logged[f"test_familiarity.{key}"] == pytest.approx(metrics["familiarity"][key])
    assert logged[f"test_per_source.{source}.caught_or_flagged"] == \
        pytest.approx(metrics["per_source"][source]["caught_or_flagged"])
    assert f"test_per_source.{source}.flagged" in logged and "test_robustness.jpeg_q90.flagged" in logged
