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
    assert set(seen[0][1]) == {"train_loss", "train_accuracy", "valid_loss", "valid_accuracy", "valid_auc", "lr",
                               "epoch_seconds"}
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


def weights(path):
    model, _ = load_checkpoint(path)
    return model.state_dict()


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.values(), b.values()))


def test_resident_and_prefetched_data_give_the_same_weights(tmp_path, synthetic_processed):
    for setting in ("true", "false"):
        params = TrainParams(epochs=2, batch_size=16, data_on_device=setting)
        summary = train.fit(synthetic_processed, tmp_path / setting, MODEL, params, torch.device("cpu"), seed=1,
                            progress=False)
        assert summary["data_on_device"] is (setting == "true")
    assert same(weights(tmp_path / "true" / "model.pt"), weights(tmp_path / "false" / "model.pt"))


def test_torn_checkpoint_falls_back_to_the_one_before(tmp_path, synthetic_processed):
    from deepfake_detector.checkpoint import CheckpointStore

    params = TrainParams(epochs=3, batch_size=16)
    train.fit(synthetic_processed, tmp_path / "full", MODEL, params, torch.device("cpu"), seed=2, progress=False)
    store = CheckpointStore(tmp_path / "ckpt", key="k")
    train.fit(synthetic_processed, tmp_path / "first", MODEL, TrainParams(epochs=3, batch_size=16), torch.device("cpu"),
              seed=2, progress=False, store=store)
    newest, previous = store.files()
    assert (newest.name, previous.name) == ("epoch-0003.pt", "epoch-0002.pt")  # two kept
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a torn write
    said = []
    state = store.latest(log=said.append)
    assert "unreadable" in said[0] and state["position"]["epoch"] == 3  # epoch 2 done, 3 next
    train.fit(synthetic_processed, tmp_path / "resumed", MODEL, params, torch.device("cpu"), seed=2, progress=False,
              resume=state)
    assert same(weights(tmp_path / "resumed" / "model.pt"), weights(tmp_path / "full" / "model.pt"))
    assert CheckpointStore(tmp_path / "ckpt", key="other").latest(log=said.append) is None
    assert "other train params or data" in said[-1]


def test_ddp_batches_split_each_global_batch_without_duplicates():
    from deepfake_detector.distributed import World

    order = torch.randperm(37, generator=torch.Generator().manual_seed(0))
    single = train.epoch_batches(order, 8, World())
    ranks = [train.epoch_batches(order, 8, World(rank, 2, rank)) for rank in range(2)]
    assert len(ranks[0]) == len(ranks[1])  # same number of steps on every rank
    for step, (a, b) in enumerate(zip(*ranks)):
        assert not set(a.tolist()) & set(b.tolist())
        assert set(a.tolist()) | set(b.tolist()) <= set(single[step].tolist())  # the same global batch
    assert sum(len(a) + len(b) for a, b in zip(*ranks)) == 36  # the odd tail is dropped


def test_data_on_device_reads_yaml_booleans():
    from deepfake_detector.params import ParamsError, with_overrides, Params

    assert with_overrides(Params(), ["train.data_on_device=true"]).train.data_on_device == "true"
    with pytest.raises(ParamsError, match="data_on_device"):
        with_overrides(Params(), ["train.data_on_device=sometimes"])
