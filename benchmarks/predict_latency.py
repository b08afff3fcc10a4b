"""Single-image prediction latency on this machine: decode, face check, resize, model, P(fake).

    .venv/bin/python benchmarks/predict_latency.py MODEL [--images 200]

MODEL is a folder with model.pt (e.g. models/ after `make pipeline`) or an MLflow model URI.
Prints p50/p95 over faces-mini images, one request at a time, with and without Grad-CAM (what
the app adds per image).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from deepfake_detector.detector import Detector
from deepfake_detector.params import Params

FACES_MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "faces-mini"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--images", type=int, default=200)
    args = parser.parse_args()
    detector = Detector.load(args.model, Params().mlflow)
    files = sorted((FACES_MINI / "real-vs-fake" / "test").rglob("*.jpg"))[: args.images]
    payloads = [f.read_bytes() for f in files]
    for payload in payloads[:5]:  # warm-up: first calls pay for allocation and the cascade load
        detector.predict(detector.prepare(payload).array[None])
    for label, with_cam in (("predict", False), ("predict + Grad-CAM", True)):
        times = []
        for payload in payloads:
            start = time.perf_counter()
            array = detector.prepare(payload).array
            detector.predict(array[None])
            if with_cam:
                detector.explain(array)
            times.append(time.perf_counter() - start)
        ms = np.array(times) * 1000
        print(f"{label:>20}: p50 {np.percentile(ms, 50):6.1f} ms  p95 {np.percentile(ms, 95):6.1f} ms  "
              f"({len(ms)} images, {torch.get_num_threads()} threads, {detector.source})")


if __name__ == "__main__":
    main()
