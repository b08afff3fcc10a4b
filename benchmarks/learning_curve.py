"""Learning curve: test AUC and accuracy against the number of training images, pretrained vs from scratch.

Trains the arch of ``params.yaml`` (with ``-S`` overrides) on 1/8, 1/4, 1/2 and all of the train
split of a preprocessed dataset (the same images for both runs of a size, each class halved alike),
once with ``model.pretrained`` as set and once from scratch, and scores the test split at the
threshold chosen on valid. Writes ``learning_curve.csv`` and ``learning_curve.png`` to ``--out``.

    python benchmarks/learning_curve.py --data data/processed --out build/learning-curve
"""

from __future__ import annotations

import argparse
import csv
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from deepfake_detector.detector import Decision, Detector
from deepfake_detector.evaluate import valid_threshold
from deepfake_detector.metrics import compute_metrics
from deepfake_detector.params import load_params, with_overrides
from deepfake_detector.preprocess import load_split, read_index
from deepfake_detector.device import resolve_device
from deepfake_detector.train import fit

FRACTIONS = (0.125, 0.25, 0.5, 1.0)


def subset(processed: Path, out: Path, fraction: float, seed: int) -> int:
    """A copy of ``processed`` whose train split keeps ``fraction`` of each class (seeded)."""
    shutil.copytree(processed, out, ignore=shutil.ignore_patterns("train"))
    images, labels = load_split(processed, "train")
    rng = np.random.default_rng(seed)
    keep = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:round(fraction * (labels == c).sum())]
                                   for c in (0, 1)]))
    (out / "train").mkdir()
    np.save(out / "train" / "images.npy", np.asarray(images[keep]))
    with (processed / "train" / "index.csv").open() as f:
        rows = list(csv.reader(f))
    with (out / "train" / "index.csv").open("w", newline="") as f:
        csv.writer(f).writerows([rows[0], *(rows[i + 1] for i in keep)])
    return len(keep)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data/processed"))
    parser.add_argument("--out", type=Path, default=Path("build/learning-curve"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("-S", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    p = with_overrides(load_params(args.params), args.overrides)
    device = resolve_device(p.train.device)
    args.out.mkdir(parents=True, exist_ok=True)
    valid_x, valid_y = load_split(args.data, "valid")
    valid_sources = [row["source"] for row in read_index(args.data, "valid")[1]]
    test_x, test_y = load_split(args.data, "test")
    results = []
    for pretrained in dict.fromkeys((p.model.pretrained, "none")):
        model = replace(p.model, pretrained=pretrained)
        for fraction in FRACTIONS:
            with tempfile.TemporaryDirectory() as tmp:
                data = Path(tmp) / "processed"
                n = subset(args.data, data, fraction, p.seed)
                start = time.perf_counter()
                fit(data, Path(tmp) / "model", model, p.train, device, p.seed, progress=False)
                detector = Detector.from_checkpoint(Path(tmp) / "model", Decision(), device)
                threshold = valid_threshold(valid_y, detector.predict(valid_x), valid_sources, p.model.spectrum_only,
                                            p.evaluate)
                m = compute_metrics(test_y, detector.predict(test_x), threshold)
            results.append({"arch": model.arch, "pretrained": pretrained, "train_images": n,
                            "test_auc": round(m["roc_auc"], 4), "test_accuracy": round(m["accuracy"], 4),
                            "seconds": round(time.perf_counter() - start, 1)})
            print(results[-1], flush=True)
    with (args.out / "learning_curve.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(results[0]))
        writer.writeheader()
        writer.writerows(results)
    plot(results, args.out / "learning_curve.png")


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for pretrained in dict.fromkeys(r["pretrained"] for r in results):
        rows = [r for r in results if r["pretrained"] == pretrained]
        for ax, key in zip(axes, ("test_auc", "test_accuracy")):
            ax.plot([r["train_images"] for r in rows], [r[key] for r in rows], marker="o",
                    label=f"pretrained: {pretrained}")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("training images")
            ax.set_ylabel(key.replace("_", " "))
            ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"learning curve: {results[0]['arch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
