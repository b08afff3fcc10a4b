"""Score a model on a preprocessed split: metrics, ROC and confusion data, and their plots.

The positive class is ``fake`` (label 1): precision and recall are about catching fakes.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch
from sklearn import metrics as skm

from deepfake_detector.data import CLASSES
from deepfake_detector.model import load_checkpoint, to_input
from deepfake_detector.params import EvaluateParams
from deepfake_detector.preprocess import load_split


@torch.no_grad()
def predict_proba(model: torch.nn.Module, images: np.ndarray, batch_size: int,
                  device: torch.device) -> np.ndarray:
    """P(fake) for each image of a uint8 (N, S, S, 3) array, in order."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.array(images[start:start + batch_size])).to(device)  # copy off the memmap
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            logits = model(to_input(batch))
        out.append(torch.softmax(logits.float(), dim=1)[:, 1].cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def compute_metrics(labels: np.ndarray, p_fake: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Threshold metrics at ``threshold`` plus ranking metrics (AUC, AP) and log loss."""
    labels = np.asarray(labels).astype(int)
    p_fake = np.asarray(p_fake, dtype=np.float64)
    pred = (p_fake >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(labels, pred, labels=[0, 1]).ravel()
    both = len(np.unique(labels)) == 2  # ranking metrics need both classes present
    return {
        "n": int(len(labels)),
        "accuracy": float(skm.accuracy_score(labels, pred)),
        "precision": float(skm.precision_score(labels, pred, zero_division=0)),
        "recall": float(skm.recall_score(labels, pred, zero_division=0)),
        "f1": float(skm.f1_score(labels, pred, zero_division=0)),
        "roc_auc": float(skm.roc_auc_score(labels, p_fake)) if both else float("nan"),
        "average_precision": float(skm.average_precision_score(labels, p_fake)) if both else float("nan"),
        "log_loss": float(skm.log_loss(labels, p_fake, labels=[0, 1])),
        "tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp),
    }


def run(processed_dir: Path, model_path: Path, out_dir: Path, params: EvaluateParams,
        device: torch.device, split: str = "test") -> dict[str, float]:
    """Evaluate ``model_path`` on ``split``; writes ``metrics.json`` and ``plots/`` under ``out_dir``."""
    out_dir = Path(out_dir)
    plots = out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    model, _ = load_checkpoint(model_path, device)
    images, labels = load_split(processed_dir, split)
    p_fake = predict_proba(model, images, params.batch_size, device)
    result = compute_metrics(labels, p_fake, params.threshold)
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    _write_plot_data(plots, processed_dir, split, labels, p_fake, params.threshold)
    return result


def _write_plot_data(plots: Path, processed_dir: Path, split: str, labels: np.ndarray,
                     p_fake: np.ndarray, threshold: float) -> None:
    with (Path(processed_dir) / split / "index.csv").open() as f:
        paths = [row["path"] for row in csv.DictReader(f)]
    pred = (p_fake >= threshold).astype(int)
    with (plots / "predictions.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "actual", "predicted", "p_fake"])
        w.writerows((p, CLASSES[a], CLASSES[b], f"{s:.6f}") for p, a, b, s in zip(paths, labels, pred, p_fake))
    if len(np.unique(labels)) == 2:
        fpr, tpr, thr = skm.roc_curve(labels, p_fake)
        roc = [{"fpr": float(a), "tpr": float(b), "threshold": float(min(t, 1.0))} for a, b, t in zip(fpr, tpr, thr)]
    else:
        roc = []
    (plots / "roc.json").write_text(json.dumps({"roc": roc}) + "\n")
    _draw(plots, labels, p_fake, pred, roc)


def _draw(plots: Path, labels: np.ndarray, p_fake: np.ndarray, pred: np.ndarray, roc: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    images = plots / "images"
    images.mkdir(exist_ok=True)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([r["fpr"] for r in roc], [r["tpr"] for r in roc], label="model")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="chance")
    ax.set(xlabel="false positive rate (real called fake)", ylabel="true positive rate (fakes caught)",
           title="ROC, test split")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(images / "roc.png", dpi=100)
    plt.close(fig)

    cm = skm.confusion_matrix(labels, pred, labels=[0, 1])
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(cm, cmap="Blues")
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=CLASSES, yticklabels=CLASSES,
           xlabel="predicted", ylabel="actual", title="Confusion matrix, test split")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    fig.tight_layout()
    fig.savefig(images / "confusion.png", dpi=100)
    plt.close(fig)
