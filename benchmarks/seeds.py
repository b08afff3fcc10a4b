"""Seeds: preprocess, train and evaluate one configuration on several seeds, with the core alone.

For each ``--seeds`` value it runs what ``dvc repro -S seed=N`` runs (preprocess, train, evaluate
with its robustness rows) for ``params.yaml`` with ``-S`` overrides, but with no MLflow, DVC or
checkpoints, so it also runs on a bare GPU machine that has only torch. Prints a row per seed and
the mean, and writes ``seeds.csv`` (and each seed's model and evaluation) to ``--out``. Choose on
the valid columns; test is the record.

    python benchmarks/seeds.py --raw ../shared/data/faces-mini --out build/seeds --seeds 0 1 2 \\
        -S model.arch=cnn -S model.pretrained=none -S preprocess.image_size=128 -S train.epochs=80
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from deepfake_detector import evaluate, preprocess  # noqa: E402
from deepfake_detector.params import Params, flatten, load_params, with_overrides  # noqa: E402
from deepfake_detector.promote import robustness_drop  # noqa: E402
from deepfake_detector.device import resolve_device  # noqa: E402
from deepfake_detector.train import fit  # noqa: E402

COLUMNS = ("valid_auc", "valid_accuracy", "test_auc", "test_accuracy", "eer", "jpeg_q50_up_drop",
           "blur_s1_down_drop", "worst_robustness_drop")


def worst_drop(metrics: dict, prefix: str, keep: Callable[[float], bool]) -> float:
    """Clean test AUC minus the worst AUC of the robustness rows ``prefix<level>`` whose level ``keep`` accepts."""
    rows = [row["auc"] for name, row in metrics["robustness"].items()
            if name.startswith(prefix) and keep(float(name.removeprefix(prefix)))]
    return metrics["roc_auc"] - min(rows) if rows else float("nan")


def run_seed(p: Params, raw: Path, out: Path, device: torch.device) -> dict:
    """One seed's pipeline into ``out``: the row of figures."""
    preprocess.run(raw, out / "processed", p.preprocess, p.seed, progress=False)
    summary = fit(out / "processed", out / "model", p.model, p.train, device, p.seed, progress=False)
    m = evaluate.run(out / "processed", out / "model" / "model.pt", out / "eval", p.evaluate, device, p.seed)
    return {"seed": p.seed, "valid_auc": summary["best_valid_auc"], "valid_accuracy": summary["best_valid_accuracy"],
            "test_auc": m["roc_auc"], "test_accuracy": m["accuracy"], "eer": m["eer"],
            # Mild degradations a detector should shrug off (JPEG quality >= 50, blur sigma <= 1) ...
            "jpeg_q50_up_drop": worst_drop(m, "jpeg_q", lambda q: q >= 50),
            "blur_s1_down_drop": worst_drop(m, "blur_s", lambda s: s <= 1),
            # ... and the promote gate's figure: clean test AUC minus the worst perturbed one.
            "worst_robustness_drop": robustness_drop({f"test_{k}": v for k, v in flatten(m).items()}),
            "best_epoch": summary["best_epoch"], "train_seconds": round(summary["train_seconds"], 1),
            "device": summary["device"], "precision": summary["precision"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--raw", type=Path, required=True, help="a dataset folder in the 140k layout")
    parser.add_argument("--out", type=Path, default=Path("build/seeds"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("-S", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    p = with_overrides(load_params(args.params), args.overrides)
    device = resolve_device(p.train.device)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{' '.join(args.overrides) or 'params.yaml as is'} on {device}", flush=True)
    rows = []
    for seed in args.seeds:
        start = time.perf_counter()
        row = run_seed(replace(p, seed=seed), args.raw, args.out / f"seed-{seed}", device)
        rows.append({**row, "seconds": round(time.perf_counter() - start, 1)})
        print(" ".join(f"{k} {v:.4f}" if isinstance(v, float) and k in COLUMNS else f"{k} {v}"
                       for k, v in rows[-1].items()), flush=True)
    print("mean " + " ".join(f"{k} {sum(r[k] for r in rows) / len(rows):.4f}" for k in COLUMNS), flush=True)
    with (args.out / "seeds.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
