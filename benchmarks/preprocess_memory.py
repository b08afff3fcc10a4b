"""Preprocess memory stays flat as the image count grows.

Builds datasets of growing size from faces-mini (symlinks in a temp folder, nothing copied into
the project), preprocesses each in a fresh process and prints images, wall time and peak RSS of
the main process and of the decode workers. The ratios between sizes are the figure to read;
absolute times depend on the machine.

    .venv/bin/python benchmarks/preprocess_memory.py [--sizes 1000 4000 16000] [--image-size 128]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

FACES_MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "faces-mini"
SPLITS, CLASSES = ("train", "valid", "test"), ("real", "fake")

MEASURE = """
import json, resource, sys, time
from pathlib import Path
from deepfake_detector.params import PreprocessParams
from deepfake_detector.preprocess import run
start = time.perf_counter()
meta = run(Path(sys.argv[1]), Path(sys.argv[2]), PreprocessParams(image_size=int(sys.argv[3])), seed=0,
           progress=False)
print(json.dumps({"images": sum(s["images"] for s in meta["splits"].values()),
                  "seconds": time.perf_counter() - start,
                  "main_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def build(root: Path, total: int) -> None:
    """``total`` images spread evenly over splits and classes, cycling through faces-mini."""
    per_folder = total // (len(SPLITS) * len(CLASSES))
    for split in SPLITS:
        for cls in CLASSES:
            sources = sorted((FACES_MINI / "real-vs-fake" / split / cls).glob("*.jpg"))
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(per_folder):
                (folder / f"{i:06d}.jpg").symlink_to(sources[i % len(sources)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1200, 4800, 19200])
    parser.add_argument("--image-size", type=int, default=128)
    args = parser.parse_args()
    if not FACES_MINI.is_dir():
        sys.exit(f"faces-mini not found at {FACES_MINI}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for total in args.sizes:
            raw, out = Path(tmp) / f"raw{total}", Path(tmp) / f"out{total}"
            build(raw, total)
            result = subprocess.run([sys.executable, "-c", MEASURE, str(raw), str(out), str(args.image_size)],
                                    capture_output=True, text=True, check=True)
            row = json.loads(result.stdout.strip().splitlines()[-1])
            row["output_mb"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20
            rows.append(row)
            print(f"{row['images']:>7} images  {row['seconds']:7.1f} s  {row['images'] / row['seconds']:6.0f} img/s  "
                  f"main {row['main_rss_mb']:6.0f} MB  worker {row['worker_rss_mb']:6.0f} MB  "
                  f"output {row['output_mb']:7.0f} MB", flush=True)
    first, last = rows[0], rows[-1]
    print(f"\n{last['images'] / first['images']:.0f}x the images: "
          f"main RSS x{last['main_rss_mb'] / first['main_rss_mb']:.2f}, "
          f"worker RSS x{last['worker_rss_mb'] / first['worker_rss_mb']:.2f}, "
          f"output x{last['output_mb'] / first['output_mb']:.1f}")


if __name__ == "__main__":
    main()
