"""The benchmarks run (tiny settings): figures come from running them, so they must not rot."""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys

import pytest

from conftest import FACES_MINI, ROOT, make_dataset
from deepfake_detector.train import cpu_has_bf16

pytestmark = pytest.mark.slow  # each runs a benchmark script end to end


def run(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_train_throughput_prints_real_and_synthetic_rates():
    out = run("benchmarks/train_throughput.py", "--images", "64", "--batch-size", "16", "--repeats", "1",
              "--warmup", "1", "--archs", "cnn", "--size", "32", "--devices", "cpu").stdout
    rows = [line.split() for line in out.splitlines() if line.split()[:2] == ["cpu", "cnn"]]
    # One row per precision: fp32, and bf16 where the CPU has bf16 instructions.
    assert [row[3] for row in rows] == (["bfloat16", "float32"] if cpu_has_bf16() else ["float32"])
    for row in rows:
        real, aug, synthetic, ratio = map(float, row[6:10])
        # The rates are printed to 0.1 img/s: the printed ratio matches theirs to within that rounding.
        assert min(real, aug, synthetic) > 0 and math.isclose(ratio, real / synthetic, rel_tol=0.01)


def test_learning_curve_writes_a_row_per_size(tmp_path, synthetic_processed):
    run("benchmarks/learning_curve.py", "--data", str(synthetic_processed), "--out", str(tmp_path),
        "--params", str(ROOT / "params.yaml"), "-S", "model.arch=cnn", "-S", "model.pretrained=none",
        "-S", "model.channels=[8]", "-S", "model.hidden=8",
        "-S", "train.epochs=1", "-S", "train.batch_size=16", "-S", "train.device=cpu")
    with (tmp_path / "learning_curve.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["train_images"]) for r in rows] == [6, 12, 24, 48]  # 1/8 ... all of 48 images
    assert {r["pretrained"] for r in rows} == {"none"} and (tmp_path / "learning_curve.png").stat().st_size > 0


def test_seeds_runs_the_pipeline_per_seed(tmp_path):
    # 32 px faces and a CNN trained with flips alone (FLIPS_ONLY in conftest), so that it learns the
    # checkerboard: harsh perturbations (JPEG q30, blur 2, downscale) erase it and mild ones mostly do not,
    # so the robustness rows differ and each column's choice of rows shows in its figure.
    raw = make_dataset(tmp_path / "raw", per_class=24, size=32)
    overrides = ["model.arch=cnn", "model.pretrained=none", "model.channels=[8,16]", "model.hidden=16",
                 "preprocess.image_size=32", "preprocess.min_source_size=16", "preprocess.blur.prob=0",
                 "preprocess.noise.prob=0", "train.augment.crop_scale=[1,1]", "train.augment.blur.prob=0",
                 "train.augment.noise.prob=0", "train.augment.jpeg.prob=0", "train.augment.mixup=0",
                 "train.epochs=8", "train.batch_size=16", "train.lr=0.003", "train.device=cpu"]
    out = run("benchmarks/seeds.py", "--raw", str(raw), "--out", str(tmp_path / "out"), "--seeds", "0", "1",
              "--params", str(ROOT / "params.yaml"), *(arg for o in overrides for arg in ("-S", o))).stdout
    with (tmp_path / "out" / "seeds.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["seed"] for r in rows] == ["0", "1"] and out.splitlines()[-1].startswith("mean valid_auc")
    for seed, row in enumerate(rows):
        # Each seed ran the whole pipeline into its own folder, evaluation with robustness rows included.
        metrics = json.loads((tmp_path / "out" / f"seed-{seed}" / "eval" / "metrics.json").read_text())
        auc = {name: r["auc"] for name, r in metrics["robustness"].items()}
        assert set(auc) == {"jpeg_q90", "jpeg_q75", "jpeg_q50", "jpeg_q30", "blur_s0.5", "blur_s1", "blur_s2",
                            "noise_s5", "downscale_x0.5"}  # params.yaml's robustness levels
        # The row's figures are that evaluation's: clean test AUC, and clean minus the worst AUC of the
        # mild rows (JPEG quality >= 50; blur sigma <= 1) and of all rows (the promote gate's figure).
        clean = metrics["roc_auc"]
        assert float(row["test_auc"]) == pytest.approx(clean)
        assert float(row["jpeg_q50_up_drop"]) == pytest.approx(clean - min(auc[f"jpeg_q{q}"] for q in (90, 75, 50)))
        assert float(row["blur_s1_down_drop"]) == pytest.approx(clean - min(auc["blur_s0.5"], auc["blur_s1"]))
        assert float(row["worst_robustness_drop"]) == pytest.approx(clean - min(auc.values()))
        # The model learned the checkerboard (else every row is the clean AUC and the checks above tell nothing).
        assert clean > 0.9 and float(row["worst_robustness_drop"]) > 0.2 > float(row["jpeg_q50_up_drop"])


def test_levers_scores_each_recipe_on_valid_and_on_each_source_left_out(tmp_path):
    # Two sources: "gan" with both classes and "other" with fakes only (its reals removed), as faces-sd.
    gan = make_dataset(tmp_path / "gan", per_class=12, size=32, nested=False)
    other = make_dataset(tmp_path / "other", per_class=12, size=32, nested=False)
    for split in ("train", "valid", "test"):
        shutil.rmtree(other / split / "real")
    overrides = ["model.arch=cnn", "model.pretrained=none", "model.channels=[8]", "model.hidden=8",
                 "preprocess.image_size=24", "preprocess.min_source_size=16", "train.epochs=1",
                 "train.batch_size=16", "train.device=cpu"]
    out = run("benchmarks/levers.py", "--sources", f"{{gan: {gan}, other: {other}}}", "--out", str(tmp_path / "out"),
              "--recipes", "baseline", "crop", "--seeds", "0", "--params", str(ROOT / "params.yaml"),
              *(arg for o in overrides for arg in ("-S", o))).stdout
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").open()]
    assert sorted((r["recipe"], r["left_out"] or "") for r in rows) == [
        ("baseline", ""), ("baseline", "gan"), ("baseline", "other"), ("crop", ""), ("crop", "gan"), ("crop", "other")]
    assert all(set(r["valid"]) == set(r["test"]) == {"gan", "other"} for r in rows)
    # crop changes preprocess (a data copy of its own); baseline and crop each one row in the table.
    assert len(list((tmp_path / "out").glob("data-*"))) == 2
    table = (tmp_path / "out" / "levers.md").read_text()
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:]] == ["baseline", "crop"] and table in out
    # A rerun finds every fit done and trains nothing.
    again = run("benchmarks/levers.py", "--sources", f"{{gan: {gan}, other: {other}}}", "--out",
                str(tmp_path / "out"), "--recipes", "baseline", "crop", "--seeds", "0",
                "--params", str(ROOT / "params.yaml"), *(arg for o in overrides for arg in ("-S", o))).stdout
    assert again.startswith("0 fits to run (6 done before)")
    # Only one source left out, no fit on every source: one fit, reported apart, on the same data copies.
    common = ["benchmarks/levers.py", "--sources", f"{{gan: {gan}, other: {other}}}", "--out", str(tmp_path / "out"),
              "--recipes", "baseline", "--seeds", "0", "--params", str(ROOT / "params.yaml"),
              *(arg for o in overrides for arg in ("-S", o))]
    only = run(*common, "--hold-out", "other", "--no-full", "--report", str(tmp_path / "only")).stdout
    assert only.startswith("1 fits to run (0 done before)")
    rows = [json.loads(line) for line in (tmp_path / "only" / "results.jsonl").open()]
    assert [(r["recipe"], r["left_out"]) for r in rows] == [("baseline", "other")]
    header = (tmp_path / "only" / "levers.md").read_text().splitlines()[0]
    assert "held-out other" in header and "held-out gan" not in header
    bad = subprocess.run([sys.executable, *common, "--hold-out", "sd"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "--hold-out ['sd']: not a fake source" in bad.stderr


@pytest.mark.skipif(not (FACES_MINI / "real-vs-fake").is_dir(), reason="faces-mini not available")
def test_predict_latency_times_each_step_and_option_and_checks_the_answers(tmp_path, synthetic_model):
    from deepfake_detector.backends import ONNX_FILE
    from deepfake_detector.heads import load_checkpoint
    from deepfake_detector.torch_backend import export_onnx

    shutil.copytree(synthetic_model, tmp_path / "model")
    export_onnx(load_checkpoint(tmp_path / "model" / "model.pt")[0], tmp_path / "model" / ONNX_FILE)
    out = run("benchmarks/predict_latency.py", str(tmp_path / "model"), "--images", "6", "--batch-size", "4",
              "--runs", "1", "--json", str(tmp_path / "figures.json")).stdout
    figures = json.loads((tmp_path / "figures.json").read_text())
    assert set(figures["batch"]) == {"before (sequential, eager)", "now (torch)", "now (onnxruntime)"}
    assert set(figures["predict_one_s"]) == {"torch", "onnxruntime"} and min(figures["predict_one_s"].values()) > 0
    assert {"decode", "face search, before", "fit to input size"} <= set(figures["steps"]["steps"])
    fp32 = {k: v for k, v in figures["agreement"].items() if "bf16" not in k}
    assert "model: onnxruntime" in figures["steps"]["model"] and len(fp32) >= 4
    assert all(row["max_abs_diff"] <= 1e-4 and row["labels_changed"] == 0 for row in fp32.values()), out


@pytest.mark.skipif(not (FACES_MINI / "real-vs-fake").is_dir(), reason="faces-mini not available")
def test_serving_load_answers_every_concurrent_request(tmp_path, synthetic_model):
    from deepfake_detector.detector import Decision

    shutil.copytree(synthetic_model, tmp_path / "model")
    Decision(min_source_size=16).write(tmp_path / "model" / "detector.json")
    out = run("benchmarks/serving_load.py", str(tmp_path / "model"), "--clients", "3", "--requests", "2").stdout
    assert "3 clients x 2 requests" in out and "0 errors" in out and "the face scored" in out


def test_real_sources_scores_each_real_source_at_the_models_own_threshold(tmp_path, synthetic_model,
                                                                          synthetic_processed):
    from conftest import benchmark_module

    utk_group = benchmark_module("real_sources").utk_group
    assert utk_group("26_1_2_20170116174525125.jpg.chip.jpg") == {"age": "13-29", "gender": "female",
                                                                  "ethnicity": "Asian"}
    assert utk_group("face.jpg") is None  # not a UTKFace name: no group
    run("benchmarks/real_sources.py", "--model", f"tiny={synthetic_model}:{synthetic_processed}",
        "--data", str(synthetic_processed), "--out", str(tmp_path))
    (row,) = json.loads((tmp_path / "real_sources.json").read_text())
    reals = [m for m in row["per_source"].values() if "n_real" in m]
    assert reals and all(0 <= m["false_positive_rate"] <= 1 for m in reals)
    assert set(row["processed"]) == {s for s, m in row["per_source"].items() if "n_real" in m}
    assert all(0 <= v <= 1 for rates in row["processed"].values() for v in rates.values())
    assert (tmp_path / "real_sources.md").read_text().startswith("| model | threshold | test AUC |")


def test_real_sources_target_fpr_sets_the_operating_point(tmp_path, synthetic_model, synthetic_processed):
    """--target-fpr reaches the threshold rule: no valid real called fake (0) sits above every fake caught (1)."""
    thresholds = {}
    for target in ("0", "1"):
        run("benchmarks/real_sources.py", "--model", f"tiny={synthetic_model}:{synthetic_processed}",
            "--data", str(synthetic_processed), "--out", str(tmp_path / target), "--rule", "target_fpr",
            "--target-fpr", target)
        (row,) = json.loads((tmp_path / target / "real_sources.json").read_text())
        thresholds[target] = row["threshold"]
    # The synthetic model's valid scores overlap (a real above the lowest fake), so the two targets differ.
    assert thresholds["0"] > thresholds["1"]
