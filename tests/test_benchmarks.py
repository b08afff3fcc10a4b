"""The benchmarks run (tiny settings): figures come from running them, so they must not rot."""

from __future__ import annotations

import csv
import subprocess
import sys

from conftest import ROOT
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
        "--params", str(ROOT / "params.yaml"), "-S", "model.arch=cnn", "-S", "model.pretrained=none", "-S", "model.channels=[8]", "-S", "model.hidden=8",
        "-S", "train.epochs=1", "-S", "train.batch_size=16", "-S", "train.device=cpu")
    with (tmp_path / "learning_curve.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["train_images"]) for r in rows] == [6, 12, 24, 48]  # 1/8 ... all of 48 images
    assert {r["pretrained"] for r in rows} == {"none"} and (tmp_path / "learning_curve.png").stat().st_size > 0
