"""The benchmarks run (tiny settings): figures come from running them, so they must not rot."""

from __future__ import annotations

import csv
import subprocess
import sys

from conftest import ROOT, make_dataset
from deepfake_detector.train import cpu_has_bf16


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
        assert min(real, aug, synthetic) > 0 and abs(ratio - real / synthetic) < 0.01


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
    raw = make_dataset(tmp_path / "raw", per_class=4, size=64)
    out = run("benchmarks/seeds.py", "--raw", str(raw), "--out", str(tmp_path / "out"), "--seeds", "0", "1",
              "--params", str(ROOT / "params.yaml"), "-S", "model.arch=cnn", "-S", "model.pretrained=none",
              "-S", "model.channels=[8]", "-S", "model.hidden=8", "-S", "preprocess.image_size=32",
              "-S", "train.epochs=1", "-S", "train.batch_size=4", "-S", "train.device=cpu").stdout
    with (tmp_path / "out" / "seeds.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["seed"] for r in rows] == ["0", "1"] and out.splitlines()[-1].startswith("mean valid_auc")
    for seed, row in enumerate(rows):
        # Each seed ran the whole pipeline into its own folder, evaluation with robustness rows included.
        assert (tmp_path / "out" / f"seed-{seed}" / "eval" / "metrics.json").exists()
        assert 0 <= float(row["test_auc"]) <= 1
        mild = max(float(row["jpeg_q50_up_drop"]), float(row["blur_s1_down_drop"]))
        assert float(row["worst_robustness_drop"]) >= mild
