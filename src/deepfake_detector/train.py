"""Train the CNN on preprocessed splits; keep the checkpoint with the best validation metric."""

from __future__ import annotations

import csv
import json
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from deepfake_detector.errors import UserError
from deepfake_detector.evaluate import compute_metrics, predict_proba
from deepfake_detector.model import DeepfakeCNN, save_checkpoint, to_input
from deepfake_detector.params import ModelParams, TrainParams
from deepfake_detector.preprocess import load_split

EpochCallback = Callable[[int, dict[str, float]], None]


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU; an explicit CUDA request without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"train.device is {name!r} but CUDA is not available; use 'auto' or 'cpu'")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def fit(processed_dir: Path, out_dir: Path, model_params: ModelParams, params: TrainParams,
        device: torch.device, seed: int, on_epoch: EpochCallback | None = None,
        progress: bool = True) -> dict:
    """Train for ``params.epochs``; writes ``model.pt`` (best epoch) and ``history.csv`` to ``out_dir``.

    ``on_epoch(epoch, metrics)`` is called after each epoch (tracking hooks in here). Returns the
    best epoch's metrics and the wall time.
    """
    seed_everything(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_x, train_y = load_split(processed_dir, "train")
    valid_x, valid_y = load_split(processed_dir, "valid")
    if len(train_x) == 0 or len(valid_x) == 0:
        raise UserError(f"{processed_dir}: train and valid splits need images "
                        f"(have {len(train_x)} and {len(valid_x)})")
    model = DeepfakeCNN(model_params, image_size=train_x.shape[1]).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    # Cosine decay to zero settles the weights late in training, where the best checkpoint is picked.
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=params.epochs)
                 if params.scheduler == "cosine" else None)
    loss_fn = nn.CrossEntropyLoss()
    use_amp = params.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    generator = torch.Generator().manual_seed(seed)
    train_labels = torch.from_numpy(train_y)
    sign = -1.0 if params.monitor == "loss" else 1.0
    best: dict = {"score": -float("inf")}
    history = []
    start = time.perf_counter()
    for epoch in range(1, params.epochs + 1):
        model.train()
        order = torch.randperm(len(train_x), generator=generator)
        batches = [order[i:i + params.batch_size] for i in range(0, len(order), params.batch_size)]
        total_loss = correct = seen = 0.0
        bar = tqdm(batches, desc=f"epoch {epoch}/{params.epochs}", disable=not progress, unit="batch",
                   leave=False)
        for idx in bar:
            # Sorted indices read the memory map sequentially; the batch order stays random.
            idx = idx.sort().values
            x = to_input(torch.from_numpy(np.ascontiguousarray(train_x[idx.numpy()])).to(device))
            y = train_labels[idx].to(device)
            if params.hflip:
                flip = torch.rand(len(x), generator=generator) < 0.5
                x[flip.to(device)] = x[flip.to(device)].flip(-1)
            with torch.autocast(device.type, enabled=use_amp):
                logits = model(x)
                loss = loss_fn(logits, y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total_loss += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
            bar.set_postfix(loss=f"{total_loss / seen:.4f}")
        lr = optimizer.param_groups[0]["lr"]
        if scheduler:
            scheduler.step()
        valid = compute_metrics(valid_y, predict_proba(model, valid_x, params.batch_size * 2, device))
        row = {"epoch": epoch, "train_loss": total_loss / seen, "train_accuracy": correct / seen,
               "valid_loss": valid["log_loss"], "valid_accuracy": valid["accuracy"],
               "valid_auc": valid["roc_auc"], "lr": lr}
        history.append(row)
        if on_epoch:
            on_epoch(epoch, {k: v for k, v in row.items() if k != "epoch"})
        score = sign * {"auc": valid["roc_auc"], "accuracy": valid["accuracy"], "loss": valid["log_loss"]}[
            params.monitor]
        if epoch == 1 or score > best["score"]:  # NaN AUC (one-class valid) never beats epoch 1
            best = {"score": score, **row}
            save_checkpoint(model, out_dir / "model.pt", epoch=epoch, valid=valid)
        # One line per epoch always (CI and `dvc repro` logs); the per-batch bar only at a terminal.
        tqdm.write(f"epoch {epoch}: train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.3f} | "
                   f"valid loss {row['valid_loss']:.4f} acc {row['valid_accuracy']:.3f} "
                   f"auc {row['valid_auc']:.3f}")
    _write_history(out_dir / "history.csv", history)
    summary = {"best_epoch": best["epoch"], "best_valid_loss": best["valid_loss"],
               "best_valid_accuracy": best["valid_accuracy"], "best_valid_auc": best["valid_auc"],
               "train_seconds": time.perf_counter() - start, "device": str(device)}
    (out_dir / "train.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _write_history(path: Path, history: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
