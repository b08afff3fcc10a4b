"""Training, with tracking off: learns a separable task, seeded, best checkpoint kept."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from deepfake_detector import train
from deepfake_detector.errors import UserError
from deepfake_detector.model import load_checkpoint
from deepfake_detector.params import ModelParams, TrainParams

MODEL = ModelParams(channels=(8, 16), convs_per_block=1, hidden=16, dropout=0.1)


def test_fit_learns_and_reports_each_epoch(tmp_path, synthetic_processed):
    seen = []
    params = TrainParams(epochs=8, batch_size=16, lr=3e-3)
    summary = train.fit(synthetic_processed, tmp_path, MODEL, params, torch.device("cpu"), seed=0,
                        on_epoch=lambda e, m: seen.append((e, m)), progress=False)
    assert [e for e, _ in seen] == list(range(1, 9))
    assert set(seen[0][1]) == {"train_loss", "train_accuracy", "valid_loss", "valid_accuracy", "valid_auc", "lr"}
    lrs = [m["lr"] for _, m in seen]  # cosine schedule: starts at train.lr, decays every epoch
    assert lrs[0] == params.lr and all(a > b for a, b in zip(lrs, lrs[1:]))
    assert summary["best_valid_auc"] >= 0.95, summary
    with (tmp_path / "history.csv").open() as f:
        history = list(csv.DictReader(f))
    assert len(history) == 8
    # The saved checkpoint is the best epoch by valid AUC.
    best = max(history, key=lambda r: float(r["valid_auc"]))
    _, ckpt = load_checkpoint(tmp_path / "model.pt")
    assert ckpt["valid"]["roc_auc"] == pytest.approx(float(best["valid_auc"]))
    assert json.loads((tmp_path / "train.json").read_text())["best_epoch"] == ckpt["epoch"]


def test_same_seed_same_weights(tmp_path, synthetic_processed):
    params = TrainParams(epochs=1, batch_size=16)
    for name in ("a", "b"):
        train.fit(synthetic_processed, tmp_path / name, MODEL, params, torch.device("cpu"), seed=3, progress=False)
    a, _ = load_checkpoint(tmp_path / "a" / "model.pt")
    b, _ = load_checkpoint(tmp_path / "b" / "model.pt")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_device_resolution():
    assert train.resolve_device("cpu").type == "cpu"
    assert train.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            train.resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fit_on_cuda_with_mixed_precision(tmp_path, synthetic_processed):
    params = TrainParams(epochs=2, batch_size=16, amp=True)
    summary = train.fit(synthetic_processed, tmp_path, MODEL, params, torch.device("cuda"), seed=0, progress=False)
    assert summary["device"].startswith("cuda")
