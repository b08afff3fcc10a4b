"""Training, with tracking off: learns a separable task, seeded, best checkpoint kept."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from conftest import FLIPS_ONLY
from deepfake_detector import augment, train
from deepfake_detector.device import resolve_device
from deepfake_detector.errors import UserError
from deepfake_detector.heads import load_checkpoint
from deepfake_detector.params import ModelParams, TrainParams

MODEL = ModelParams(arch="cnn", pretrained="none", channels=(8, 16), convs_per_block=1, hidden=16, dropout=0.1)


@pytest.mark.slow
def test_fit_learns_and_reports_each_epoch(tmp_path, synthetic_processed):
    seen = []
    params = TrainParams(epochs=8, batch_size=16, lr=3e-3, warmup_epochs=0.0, augment=FLIPS_ONLY, monitor_window=1)
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
    # The saved checkpoint is the best epoch by its own valid AUC (a window of 1).
    best = max(history, key=lambda r: float(r["valid_auc"]))
    _, ckpt = load_checkpoint(tmp_path / "model.pt")
    assert ckpt["valid"]["roc_auc"] == pytest.approx(float(best["valid_auc"]))
    assert json.loads((tmp_path / "train.json").read_text())["best_epoch"] == ckpt["epoch"]


def test_monitor_window_averages_the_epochs_before_and_picks_the_checkpoint_by_it(tmp_path, synthetic_processed):
    spiky = [{"valid_auc": v} for v in (0.70, 0.90, 0.72, 0.84, 0.85, 0.86)]
    scores = [train.monitor_score(spiky[:e], "valid_auc", 3) for e in range(1, 7)]
    assert scores[:2] == [pytest.approx(0.70), pytest.approx(0.80)]  # fewer epochs than the window so far
    assert max(range(6), key=scores.__getitem__) == 5  # the lucky epoch 2 wins alone, not on average
    assert math.isnan(train.monitor_score([{"valid_auc": math.nan}, {"valid_auc": 0.9}], "valid_auc", 2))

    params = TrainParams(epochs=6, batch_size=16, warmup_epochs=0.0, monitor="loss", monitor_window=3,
                         augment=FLIPS_ONLY)
    summary = train.fit(synthetic_processed, tmp_path, MODEL, params, torch.device("cpu"), seed=1, progress=False)
    with (tmp_path / "history.csv").open() as f:
        losses = [float(r["valid_loss"]) for r in csv.DictReader(f)]
    windowed = [sum(losses[max(0, e - 3):e]) / len(losses[max(0, e - 3):e]) for e in range(1, 7)]
    assert summary["best_epoch"] == 1 + min(range(6), key=windowed.__getitem__)
    _, ckpt = load_checkpoint(tmp_path / "model.pt")  # that epoch's own weights and figures
    assert ckpt["epoch"] == summary["best_epoch"]
    assert ckpt["valid"]["log_loss"] == pytest.approx(losses[ckpt["epoch"] - 1])


def test_same_seed_same_weights(tmp_path, synthetic_processed):
    params = TrainParams(epochs=1, batch_size=16)
    for name in ("a", "b"):
        train.fit(synthetic_processed, tmp_path / name, MODEL, params, torch.device("cpu"), seed=3, progress=False)
    a, _ = load_checkpoint(tmp_path / "a" / "model.pt")
    b, _ = load_checkpoint(tmp_path / "b" / "model.pt")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fit_on_cuda_with_mixed_precision(tmp_path, synthetic_processed):
    params = TrainParams(epochs=2, batch_size=16, precision="auto")
    summary = train.fit(synthetic_processed, tmp_path, MODEL, params, torch.device("cuda"), seed=0, progress=False)
    assert summary["device"].startswith("cuda") and summary["precision"] in ("bfloat16", "float16")


def weights(path):
    model, _ = load_checkpoint(path)
    return model.state_dict()


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.values(), b.values()))


def test_cpu_precision_is_fp32_unless_bf16_is_asked_and_the_cpu_has_it(tmp_path, synthetic_processed):
    cpu = torch.device("cpu")
    assert train.autocast_dtype(cpu, "auto") is None and train.autocast_dtype(cpu, "fp32") is None
    with pytest.raises(UserError, match="fp16 needs a CUDA device"):
        train.autocast_dtype(cpu, "fp16")
    if not train.cpu_has_bf16():
        with pytest.raises(UserError, match="needs bf16 instructions"):
            train.autocast_dtype(cpu, "bf16")
        return
    for precision in ("bf16", "auto"):
        params = TrainParams(epochs=1, batch_size=16, precision=precision)
        summary = train.fit(synthetic_processed, tmp_path / precision, MODEL, params, cpu, seed=0, progress=False)
        assert summary["precision"] == {"bf16": "bfloat16", "auto": "float32"}[precision]
    # bf16 autocast really ran: the same seed gives other weights than fp32 does.
    assert not same(weights(tmp_path / "bf16" / "model.pt"), weights(tmp_path / "auto" / "model.pt"))


def test_resident_and_prefetched_data_give_the_same_weights(tmp_path, synthetic_processed):
    for setting in ("true", "false"):
        params = TrainParams(epochs=2, batch_size=16, data_on_device=setting)
        summary = train.fit(synthetic_processed, tmp_path / setting, MODEL, params, torch.device("cpu"), seed=1,
                            progress=False)
        assert summary["data_on_device"] is (setting == "true")
    assert same(weights(tmp_path / "true" / "model.pt"), weights(tmp_path / "false" / "model.pt"))


@pytest.mark.slow
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


def test_weight_average_is_what_is_validated_and_saved(tmp_path, synthetic_processed):
    from deepfake_detector.batches import Batches
    from deepfake_detector.checkpoint import CheckpointStore
    from deepfake_detector.distributed import SINGLE
    from deepfake_detector.metrics import compute_metrics
    from deepfake_detector.preprocess import load_split

    assert train.ema_decay(2.0, 10) ** 20 == pytest.approx(math.exp(-1))  # time constant: 2 epochs of 10 steps
    params = TrainParams(epochs=1, batch_size=8, warmup_epochs=0.0, ema_epochs=1.0)
    store = CheckpointStore(tmp_path / "ckpt", key="k")
    train.fit(synthetic_processed, tmp_path, MODEL, params, torch.device("cpu"), seed=0, progress=False, store=store)
    state = store.latest(log=print)
    average = {k.removeprefix("module."): v for k, v in state["ema"].items() if k.startswith("module.")}
    saved = weights(tmp_path / "model.pt")
    assert same(saved, average) and not same(saved, state["model"])
    # The epoch's valid figures are the average's.
    model, _ = load_checkpoint(tmp_path / "model.pt")
    images, labels = load_split(synthetic_processed, "valid")
    p_fake = train.validate(model, Batches(images, labels, torch.device("cpu"), False), 32, SINGLE)
    assert state["history"][0]["valid_loss"] == pytest.approx(compute_metrics(labels, p_fake)["log_loss"], abs=1e-9)


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
    from deepfake_detector.params import Params, ParamsError, with_overrides

    assert with_overrides(Params(), ["train.data_on_device=true"]).train.data_on_device == "true"
    with pytest.raises(ParamsError, match="data_on_device"):
        with_overrides(Params(), ["train.data_on_device=sometimes"])


def test_warm_up_then_cosine():
    params = TrainParams(epochs=10, warmup_epochs=2)
    factors = [train.lr_factor(params, 100, step) for step in range(100)]
    assert factors[0] == pytest.approx(1 / 21) and factors[19] == pytest.approx(20 / 21)  # 20 warm-up steps
    assert factors[20] == 1.0 and all(a > b for a, b in zip(factors[20:], factors[21:]))  # then cosine to ~0
    assert factors[-1] < 0.01


def test_augmentation_is_seeded_per_sample_and_does_what_it_says():
    from deepfake_detector.params import AugmentParams, BlurParams, JpegParams, NoiseParams

    every = AugmentParams(hflip=0.5, crop_scale=(0.5, 1.0), blur=BlurParams(prob=0.5), noise=NoiseParams(prob=0.5),
                          jpeg=JpegParams(prob=0.5))
    plans = [augment.draw(every, 64, torch.Generator().manual_seed(1)) for _ in range(2)]
    assert all(torch.equal(plans[0][k], plans[1][k]) for k in plans[0])  # same seed, same draws
    plan = plans[0]
    assert 10 < int(plan["flip"].sum()) < 54 and len(set(plan["blur"].tolist())) > 10  # per sample, not per batch
    x = torch.rand(64, 3, 32, 32)
    out = augment.apply(x, plan)
    assert torch.equal(out, augment.apply(x, plan)) and out.shape == x.shape and 0 <= out.min() and out.max() <= 1
    plain = {k: torch.zeros_like(v) for k, v in plan.items()} | {"crop": torch.ones(64, 4)}
    assert torch.equal(augment.apply(x, plain), x)  # nothing drawn, nothing done
    flipped = plain | {"flip": torch.ones(64, dtype=torch.bool)}
    assert torch.equal(augment.apply(x, flipped), x.flip(-1))
    blurred = augment.apply(x, plain | {"blur": torch.full((64,), 1.5)})
    assert blurred.diff(dim=-1).abs().mean() < 0.5 * x.diff(dim=-1).abs().mean()  # high frequencies gone
    images = (x * 255).byte().permute(0, 2, 3, 1).contiguous()
    quality = torch.zeros(64, dtype=torch.int32)
    quality[:3] = 30
    recompressed = augment.jpeg(images, quality)
    assert not torch.equal(recompressed[:3], images[:3]) and torch.equal(recompressed[3:], images[3:])


def test_mixup_blends_images_and_labels_alike_and_leaves_other_draws_alone(tmp_path, synthetic_processed):
    from deepfake_detector.params import AugmentParams

    plain = augment.draw(AugmentParams(), 64, torch.Generator().manual_seed(1))
    mixed = augment.draw(AugmentParams(mixup=0.5), 64, torch.Generator().manual_seed(1))
    assert "mix" not in plain and all(torch.equal(plain[k], mixed[k]) for k in plain)  # drawn last, only when on
    share = mixed["mix"]
    assert 10 < int((share < 1).sum()) < 54 and len(set(share.tolist())) > 10  # per image
    x, y = torch.rand(64, 3, 8, 8), torch.randint(0, 2, (64,))
    blended, target = augment.mix(x, y, share)
    own = share[:, None, None, None]
    assert torch.allclose(blended, own * x + (1 - own) * x.roll(1, 0))
    assert torch.equal(blended[share == 1], x[share == 1])
    assert torch.allclose(target.sum(1), torch.ones(64))
    assert torch.allclose(target[:, 1], share * y + (1 - share) * y.roll(1))
    assert augment.mix(x, y, None) == (x, y)
    # Training with it is seeded like the rest, and it does train on the blends.
    for name, rate in (("a", 0.5), ("b", 0.5), ("off", 0.0)):
        params = TrainParams(epochs=1, batch_size=16, augment=AugmentParams(mixup=rate))
        train.fit(synthetic_processed, tmp_path / name, MODEL, params, torch.device("cpu"), seed=4, progress=False)
    assert same(weights(tmp_path / "a" / "model.pt"), weights(tmp_path / "b" / "model.pt"))
    assert not same(weights(tmp_path / "a" / "model.pt"), weights(tmp_path / "off" / "model.pt"))


def test_validation_never_augments(tmp_path, synthetic_processed):
    """Valid scores of the saved best model equal a plain pass over the valid split."""
    from deepfake_detector.batches import Batches
    from deepfake_detector.distributed import SINGLE
    from deepfake_detector.metrics import compute_metrics
    from deepfake_detector.preprocess import load_split

    train.fit(synthetic_processed, tmp_path, MODEL, TrainParams(epochs=2, batch_size=16), torch.device("cpu"),
              seed=0, progress=False)
    model, ckpt = load_checkpoint(tmp_path / "model.pt")
    images, labels = load_split(synthetic_processed, "valid")
    p_fake = train.validate(model, Batches(images, labels, torch.device("cpu"), False), 32, SINGLE)
    assert ckpt["valid"]["roc_auc"] == pytest.approx(compute_metrics(labels, p_fake)["roc_auc"], abs=1e-9)


def test_balance_weights_the_classes_only_when_they_differ():
    """train.balance auto: n / (2 n_class) when sources make the classes unequal, so each counts alike;
    equal classes (one balanced source) keep the plain mean, and so the same numbers as before."""
    cpu = torch.device("cpu")
    weights = train.class_weights(np.array([0] * 2 + [1] * 6), "auto", cpu)
    assert weights.tolist() == [2.0, pytest.approx(2 / 3)]
    assert (weights * torch.tensor([2.0, 6.0])).tolist() == pytest.approx([4.0, 4.0])  # each class weighs alike
    assert train.class_weights(np.array([0, 1] * 4), "auto", cpu) is None
    assert train.class_weights(np.array([0] * 2 + [1] * 6), "none", cpu) is None
    assert train.class_weights(np.array([0] * 2 + [1] * 6), "sources", cpu) is None  # weighted per image instead


def test_balance_by_sources_weighs_each_class_half_and_its_sources_alike():
    """train.balance sources: n / (2 k_class n_group) per (class, source) group. Reals: 6 ffhq, 2 utk;
    fakes: 3 of ffhq's source (it holds both), 1 sd; 12 images."""
    labels = np.array([0] * 6 + [0] * 2 + [1] * 3 + [1])
    sources = ["ffhq"] * 6 + ["utk"] * 2 + ["ffhq"] * 3 + ["sd"]
    weights = train.source_weights(labels, sources, "sources")
    assert weights.tolist() == [0.5] * 6 + [1.5] * 2 + [1.0] * 3 + [3.0]
    groups = [weights[:6].sum(), weights[6:8].sum(), weights[8:11].sum(), weights[11:].sum()]
    assert [float(g) for g in groups] == [3.0] * 4  # every source of a class alike, each class n / 2
    assert float(weights.mean()) == 1.0  # on the scale of a plain mean
    assert train.source_weights(labels, sources, "auto") is None is train.source_weights(labels, sources, "none")
    # One source per class and equal classes: all weights equal, so the plain mean, as auto keeps.
    assert train.source_weights(np.array([0, 1] * 4), ["a"] * 8, "sources") is None
    # One source per class, unequal classes: the same numbers as auto's class weights.
    unequal = np.array([0] * 2 + [1] * 6)
    assert train.source_weights(unequal, ["a"] * 8, "sources").tolist() == \
        train.class_weights(unequal, "auto", torch.device("cpu"))[unequal].tolist()


def test_weighted_loss_is_the_weighted_mean_and_a_blend_weighs_as_its_two_images():
    torch.manual_seed(0)
    logits, target = torch.randn(4, 2), torch.tensor([0, 1, 1, 0])
    per_image = torch.nn.CrossEntropyLoss(reduction="none", label_smoothing=0.1)
    plain = torch.nn.CrossEntropyLoss(label_smoothing=0.1)(logits, target)
    assert torch.allclose(train.weighted_mean(per_image, torch.full((4,), 3.0), logits, target), plain)
    weights = torch.tensor([1.0, 0.0, 0.0, 1.0])  # images 1 and 2 count for nothing
    expected = (per_image(logits, target)[0] + per_image(logits, target)[3]) / 2
    assert torch.allclose(train.weighted_mean(per_image, weights, logits, target), expected)
    trainer = train.Trainer(train.build_model(MODEL, 32), TrainParams(epochs=1), torch.device("cpu"), seed=0,
                            world=train.SINGLE, steps_per_epoch=1, image_weights=torch.tensor([1.0, 2.0, 4.0, 8.0]))
    idx = torch.tensor([1, 2, 3])
    assert train.batch_weights(trainer, idx, {}).tolist() == [2.0, 4.0, 8.0]
    # MixUp blends each image of the batch with the one before it there (the first with the last), in
    # its drawn share: the blend weighs as the two images do, in those shares.
    share = torch.tensor([1.0, 0.25, 0.5, 1.0])
    blended = train.batch_weights(trainer, idx, {"mix": share[idx]})
    assert blended.tolist() == [0.25 * 2 + 0.75 * 8, 0.5 * 4 + 0.5 * 2, 8.0]
