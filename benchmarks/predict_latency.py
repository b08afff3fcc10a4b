"""Where scoring time goes, per step and per option, against the path before issue #24, in one run.

    .venv/bin/python benchmarks/predict_latency.py MODEL [--images 200] [--device cpu] [--json out.json]

MODEL is a folder with model.pt (and model.onnx, as the train stage writes them), e.g. models/.
On faces-mini test images (real files: decode, face search, fit, model) it prints:
- per step, one image at a time: p50 / p95 ms of decoding, the face search as it was (a cascade
  loaded per call) and as it is (one per thread; skipped for face crops), fitting, and the model
  per backend option (eager as before; batch norm folded; + channels_last; bf16 where the CPU has
  it; ONNX Runtime);
- single image end to end (bytes to P(fake)): p50 / p95, before and now;
- batch scoring of every image (``Detector.score``): images/s, before (sequential, eager) and now
  (reading overlapped with scoring), per backend;
- each option's largest P(fake) difference from the eager fp32 model and whether any label changes;
- ``deepfake predict`` of one image in a new process, wall seconds per backend (start-up included).
Ratios are to the path before, measured in the same run.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from deepfake_detector import backends, torch_backend
from deepfake_detector.detector import Detector
from deepfake_detector.predict import fit_image, largest_face
from deepfake_detector.preprocess import decode_image
from deepfake_detector.train import cpu_has_bf16

FACES_MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "faces-mini"
SEARCH = hasattr(cv2, "CascadeClassifier")  # OpenCV 5 builds have none


def timed(fn, items, repeat: int = 1) -> np.ndarray:
    """Seconds of ``fn(item)`` per item (best of ``repeat``), after one warm-up call."""
    fn(items[0])
    out = []
    for item in items:
        best = float("inf")
        for _ in range(repeat):
            start = time.perf_counter()
            fn(item)
            best = min(best, time.perf_counter() - start)
        out.append(best)
    return np.array(out)


def old_face_search(image):
    """The face search before #24: a cascade loaded for every image, on the full-size image."""
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    grey = np.asarray(image.convert("L"))
    return cascade.detectMultiScale(grey, scaleFactor=1.1, minNeighbors=5,
                                    minSize=(int(min(image.size) * 0.05 ** 0.5),) * 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--faces", type=Path, default=FACES_MINI, help="a faces-mini folder")
    parser.add_argument("--runs", type=int, default=3, help="`deepfake predict` start-ups timed per backend")
    args = parser.parse_args()
    device = torch.device(args.device)
    files = sorted((args.faces / "real-vs-fake" / "test").rglob("*.jpg"))[: args.images]
    payloads = [f.read_bytes() for f in files]
    torch_detector = Detector.from_checkpoint(args.model, device=device, backend="torch")
    size, model = torch_detector.image_size, torch_detector.model
    print(f"{len(files)} faces-mini test images, {torch.get_num_threads()} threads, device {device}, "
          f"model {args.model} ({model.arch}, {size} px)")
    figures: dict = {"images": len(files), "threads": torch.get_num_threads(), "device": str(device), "steps": {}}

    def report(group: str, name: str, seconds: np.ndarray, base: float | None = None) -> None:
        ms = seconds * 1000
        row = {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95))}
        ratio = f"  {base / row['p50_ms']:5.2f}x" if base else ""
        print(f"  {name:<34} p50 {row['p50_ms']:7.2f} ms  p95 {row['p95_ms']:7.2f} ms{ratio}")
        figures["steps"].setdefault(group, {})[name] = row

    print("per step, one image at a time:")
    decoded = [decode_image(io.BytesIO(p))[0] for p in payloads]
    report("steps", "decode", timed(lambda p: decode_image(io.BytesIO(p)), payloads))
    if SEARCH:
        before = timed(old_face_search, decoded)
        report("steps", "face search, before", before)
        report("steps", "face search, now (cached cascade)", timed(largest_face, decoded),
               np.percentile(before, 50) * 1e3)
    else:
        print("  face search: n/a (this OpenCV has no CascadeClassifier): left out of the before path too")
    report("steps", "fit to input size", timed(lambda im: fit_image(im, size, 1), decoded))
    arrays = np.stack([fit_image(im, size, 1) for im in decoded])
    options = {"eager (before)": torch_backend.TorchBackend(model, size, device, fold=False, channels_last=False),
               "batch norm folded": torch_backend.TorchBackend(model, size, device, channels_last=False),
               "folded + channels_last": torch_backend.TorchBackend(model, size, device)}
    if device.type == "cpu" and cpu_has_bf16():
        options["folded + channels_last, bf16"] = _Bf16(options["folded + channels_last"])
    onnx = args.model / backends.ONNX_FILE if args.model.is_dir() else args.model.parent / backends.ONNX_FILE
    if onnx.is_file() and backends.onnxruntime_installed():
        options["onnxruntime"] = backends.OnnxBackend(onnx, device.type == "cuda")
        print(f"  (onnxruntime runs on {options['onnxruntime'].session.get_providers()[0]})")
    singles = [a[None] for a in arrays]
    eager_single = None
    reference = options["eager (before)"](arrays)[0]
    figures["agreement"] = {}
    for name, backend in options.items():
        seconds = timed(backend, singles, repeat=3)
        eager_single = eager_single or np.percentile(seconds, 50) * 1e3
        report("model", f"model: {name}", seconds, eager_single)
        p = np.concatenate([backend(arrays[i:i + args.batch_size])[0]
                            for i in range(0, len(arrays), args.batch_size)])
        threshold = torch_detector.threshold
        figures["agreement"][name] = {"max_abs_diff": float(np.abs(p - reference).max()),
                                      "labels_changed": int(((p >= threshold) != (reference >= threshold)).sum())}
    print("same answers (against eager fp32, at threshold %.4f):" % torch_detector.threshold)
    for name, row in figures["agreement"].items():
        print(f"  {name:<34} max |dP(fake)| {row['max_abs_diff']:.2e}, labels changed {row['labels_changed']}")

    print("single image, bytes to P(fake):")
    eager = options["eager (before)"]

    def before_path(payload: bytes) -> None:
        image = decode_image(io.BytesIO(payload))[0]
        if SEARCH:
            old_face_search(image)  # its box is the whole image or none on these crops: the array is the same
        eager(fit_image(image, size, 1)[None])

    before_single = timed(before_path, payloads)
    report("single", "before (search, eager)", before_single)
    now = {}
    for name in ("torch", "onnxruntime"):
        if name == "onnxruntime" and "onnxruntime" not in options:
            continue
        detector = Detector.from_checkpoint(args.model, device=device, backend=name, notice=lambda _: None)
        now[name] = detector
        report("single", f"now ({name})", timed(lambda b: detector.predict(detector.prepare(b).array[None]), payloads),
               np.percentile(before_single, 50) * 1e3)

    print(f"batch scoring of {len(files)} images, batch size {args.batch_size}:")
    figures["batch"] = {}

    def batch_rate(name: str, fn) -> float:
        fn()  # warm-up
        start = time.perf_counter()
        fn()
        rate = len(files) / (time.perf_counter() - start)
        base = figures["batch"].get("before (sequential, eager)")
        print(f"  {name:<34} {rate:7.1f} images/s" + (f"  {rate / base:5.2f}x" if base else ""))
        figures["batch"][name] = rate
        return rate

    def sequential() -> None:
        for start in range(0, len(payloads), args.batch_size):
            batch = []
            for b in payloads[start:start + args.batch_size]:
                image = decode_image(io.BytesIO(b))[0]
                if SEARCH:
                    old_face_search(image)
                batch.append(fit_image(image, size, 1))
            eager(np.stack(batch))

    batch_rate("before (sequential, eager)", sequential)
    for name, detector in now.items():
        detector.batch_size = args.batch_size
        batch_rate(f"now ({name})", lambda d=detector: d.score(payloads, read=lambda b: b))

    print(f"`deepfake predict` of one image, a new process (median wall of {args.runs} runs):")
    figures["predict_one_s"] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in now:
            command = [sys.executable, "-m", "deepfake_detector.cli", "predict", str(files[0]), "--model",
                       str(args.model), "--out", f"{tmp}/preds.csv", "-S", f"evaluate.backend={name}"]
            walls = []
            for _ in range(args.runs):
                start = time.perf_counter()
                subprocess.run(command, check=True, capture_output=True)
                walls.append(time.perf_counter() - start)
            figures["predict_one_s"][name] = float(np.median(walls))
            print(f"  {name:<34} {np.median(walls):7.2f} s")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


class _Bf16:
    """The torch backend under bf16 autocast on a CPU (AVX512-BF16 / AMX)."""

    def __init__(self, backend: torch_backend.TorchBackend) -> None:
        self.backend = backend

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> backends.Outputs:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return torch_backend.outputs(self.backend.scorer(torch.from_numpy(images)))


if __name__ == "__main__":
    main()
