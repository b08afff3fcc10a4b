"""PNG plots of an evaluation (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from deepfake_detector.data import CLASSES


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # servers and CI have no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)


def _curve(path: Path, x: list[float], y: list[float], label: str, xlabel: str, ylabel: str, title: str,
           diagonal: str | None = None, style: str = "-", legend: str = "lower right") -> None:
    """One model curve on a square plot, with an optional y = x reference line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if diagonal:
        ax.plot([0, 1], [0, 1], "--", color="grey", label=diagonal)
    ax.plot(x, y, style, label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel, xlim=(0, 1), ylim=(0, 1.02), title=title)
    ax.legend(loc=legend)
    _save(fig, path)


def roc(path: Path, rows: list[dict], auc: float) -> None:
    _curve(path, [r["fpr"] for r in rows], [r["tpr"] for r in rows], f"model (AUC {auc:.3f})",
           "false positive rate (real called fake)", "true positive rate (fakes caught)", "ROC, test split",
           diagonal="chance")


def precision_recall(path: Path, rows: list[dict], ap: float) -> None:
    _curve(path, [r["recall"] for r in rows], [r["precision"] for r in rows], f"model (AP {ap:.3f})",
           "recall (fakes caught)", "precision (flagged that are fake)", "Precision-recall, test split",
           legend="lower left")


def confusion(path: Path, matrix: np.ndarray, threshold: float) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(matrix, cmap="Blues")
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=CLASSES, yticklabels=CLASSES, xlabel="predicted",
           ylabel="actual", title=f"Confusion matrix at {threshold:.3f}")
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > matrix.max() / 2 else "black")
    _save(fig, path)


def reliability(path: Path, rows: list[dict], brier: float) -> None:
    _curve(path, [r["mean_p_fake"] for r in rows], [r["fraction_fake"] for r in rows], f"model (Brier {brier:.3f})",
           "mean predicted P(fake)", "fraction that are fake", "Reliability, test split",
           diagonal="perfectly calibrated", style="o-", legend="upper left")


def robustness(path: Path, rows: list[dict], clean_auc: float) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = [r["perturbation"] for r in rows]
    ax.bar(names, [r["auc"] for r in rows], color="tab:blue")
    ax.axhline(clean_auc, color="black", linestyle="--", label=f"clean AUC {clean_auc:.3f}")
    ax.axhline(0.5, color="grey", linestyle=":", label="chance")
    ax.set(ylabel="ROC AUC", ylim=(0, 1), title="Robustness: test AUC under perturbations")
    ax.tick_params(axis="x", rotation=45)
    ax.legend(loc="lower left")
    _save(fig, path)


def per_source(path: Path, rows: list[dict], threshold: float) -> None:
    """Rows of metrics.per_source, a panel per kind present: each source's fakes (ROC AUC against all
    reals, recall at ``threshold``) and each source's reals (false positive rate at ``threshold``,
    ROC AUC of all fakes against them), side by side."""
    plt = _pyplot()
    at = f"at {threshold:.3f}"
    kinds = [("n_fake", "fakes", "Each source's fakes against all real images",
              (("roc_auc", "ROC AUC vs all reals"), ("recall", f"recall {at}"))),
             ("n_real", "reals", "Each source's real images against all fakes",
              (("false_positive_rate", f"false positive rate {at}"), ("real_roc_auc", "ROC AUC of all fakes vs them")))]
    panels = [(count, noun, title, bars, mine) for count, noun, title, bars in kinds
              if (mine := [r for r in rows if count in r])]
    widths = [max(4.5, 1.2 * len(mine) + 2) for *_, mine in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(sum(widths), 3.5), squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    for ax, (count, noun, title, bars, mine) in zip(axes.flat, panels):
        x = np.arange(len(mine))
        for offset, (key, label) in zip((-0.2, 0.2), bars):
            ax.bar(x + offset, [r[key] for r in mine], width=0.4, label=label)
        ax.axhline(0.5, color="grey", linestyle=":", label="chance AUC")
        ax.set_xticks(x, [f"{r['source']}\n({r[count]} {noun})" for r in mine])
        ax.set(ylim=(0, 1.35), yticks=np.linspace(0, 1, 6))  # the legend above the bars: a low FPR stays in sight
        ax.set_title(title, fontsize=10)
        ax.legend(loc="upper left", fontsize=8, ncol=2)
    _save(fig, path)


def training_curves(path: Path, history: list[dict]) -> None:
    plt = _pyplot()
    epochs = [int(r["epoch"]) for r in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.5))
    for key in ("train_loss", "valid_loss"):
        left.plot(epochs, [float(r[key]) for r in history], label=key)
    for key in ("train_accuracy", "valid_accuracy", "valid_auc"):
        right.plot(epochs, [float(r[key]) for r in history], label=key)
    left.set(xlabel="epoch", title="Loss")
    right.set(xlabel="epoch", title="Accuracy and AUC")
    left.legend()
    right.legend()
    _save(fig, path)


def mistakes(path: Path, images: list[np.ndarray], captions: list[str]) -> None:
    plt = _pyplot()
    cols = 4
    rows = max(1, -(-len(images) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, captions):
        ax.imshow(image)
        ax.set_title(caption, fontsize=8)
    fig.suptitle("Most confident mistakes" if images else "No mistakes", fontsize=10)
    _save(fig, path)
