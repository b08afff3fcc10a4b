"""The spectrum branch (model.spectrum): its features, its fit beside the CNN, and every way a model travels."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from conftest import FLIPS_ONLY
from deepfake_detector import heads, train
from deepfake_detector.backends import ONNX_FILE, OnnxBackend, onnxruntime_installed
from deepfake_detector.detector import Decision, Detector
from deepfake_detector.heads import load_checkpoint
from deepfake_detector.model import save_checkpoint, to_input
from deepfake_detector.params import ModelParams, TrainParams
from deepfake_detector.spectrum import SpectrumBranch
from deepfake_detector.torch_backend import TorchBackend, export_onnx

SIZE = 32
MODEL = ModelParams(arch="cnn", pretrained="none", channels=(8, 16), convs_per_block=1, hidden=16, spectrum=True)
CPU = torch.device("cpu")


def faces(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``n`` smooth random images per class (uint8 NHWC), labels and sources; the fakes carry fine noise
    (sigma 6 of 255), energy in the upper half of the spectrum's radii that the reals lack."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(40, 215, (2 * n, SIZE // 8, SIZE // 8, 3))
    smooth = coarse.repeat(8, 1).repeat(8, 2)
    smooth = (smooth + np.roll(smooth, 4, 1) + np.roll(smooth, 4, 2) + np.roll(smooth, (4, 4), (1, 2))) / 4
    labels = np.repeat([0, 1], n)
    noisy = smooth + rng.normal(0, 6, smooth.shape) * labels[:, None, None, None]
    return np.clip(noisy, 0, 255).round().astype(np.uint8), labels, ["real"] * n + ["noisy"] * n


def logits(model: torch.nn.Module, images: np.ndarray) -> torch.Tensor:
    with torch.inference_mode():
        return model(to_input(torch.from_numpy(images)))


def test_features_are_the_ring_means_of_the_log_amplitude_spectrum():
    x = torch.rand(3, 3, SIZE, SIZE)
    grey = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1).double().numpy() * 255
    freq = np.fft.fftfreq(SIZE, 1 / SIZE)
    ring = np.hypot(freq[:, None], freq[None, :]).astype(int).ravel()
    expected = np.stack([np.log1p(np.bincount(ring, np.abs(np.fft.fft2(g)).ravel()) / np.bincount(ring))
                         for g in grey])[:, SIZE // 4:SIZE // 2]
    got = SpectrumBranch(SIZE).features(x).double().numpy()
    assert got.shape == (3, SIZE // 4)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.fixture(scope="module")
def fitted() -> tuple[torch.nn.Module, dict, tuple[np.ndarray, np.ndarray]]:
    torch.manual_seed(0)
    model = heads.build(MODEL, SIZE)  # an untrained CNN: it cannot tell the classes apart, the spectrum can
    images, labels, sources = faces(40, seed=1)
    unfitted = logits(model.eval(), images)
    valid = faces(30, seed=2)
    report = heads.fit_heads(model, (images, labels, sources), valid, CPU, batch_size=16)["spectrum"]
    return model, {"report": report, "unfitted": unfitted, "train": (images, labels)}, valid[:2]


def test_an_unfitted_branch_leaves_the_cnn_logits_alone(fitted):
    model, seen, _ = fitted
    images = seen["train"][0]
    cnn = model.forward_features(to_input(torch.from_numpy(images)))[0].detach()
    torch.testing.assert_close(seen["unfitted"], cnn)  # before fit_heads: the CNN alone


def test_the_fitted_branch_calls_fake_what_the_cnn_cannot_and_never_lowers_its_odds(fitted):
    model, seen, (images, labels) = fitted
    assert seen["report"]["train_auc"] > 0.95 and seen["report"]["valid_auc"] > 0.95, seen["report"]
    x = to_input(torch.from_numpy(images))
    with torch.inference_mode():
        cnn = model.forward_features(x)[0]
        fused, (branch, known) = model(x), model.heads["spectrum"].score(x)
        # A head maps the input and the outputs so far to its own: the branch reads the CNN's logits alone.
        answered = model.heads["spectrum"](x, {"logits": cnn, "embedding": None, "stages": []})
    assert set(answered) == {"logits"}
    torch.testing.assert_close(answered["logits"], fused)
    assert known.all()  # the images it was fit on lie in its range
    cnn_odds, fused_odds = (cnn[:, 1] - cnn[:, 0]).numpy(), (fused[:, 1] - fused[:, 0]).numpy()
    assert roc_auc_score(labels, cnn_odds) < 0.8  # the untrained CNN is no detector
    assert roc_auc_score(labels, fused_odds) > 0.95
    assert (fused_odds >= cnn_odds - 1e-5).all()  # either branch may call an image fake
    # Aligned on the valid reals: there, the branch's odds have the CNN's mean and spread.
    aligned = (model.heads["spectrum"].gain * branch + model.heads["spectrum"].shift).numpy()[labels == 0]
    assert aligned.mean() == pytest.approx(cnn_odds[labels == 0].mean(), abs=1e-3)
    assert aligned.std() == pytest.approx(cnn_odds[labels == 0].std(), rel=1e-3)


def test_the_branch_abstains_on_spectra_outside_the_range_it_was_fit_on(fitted):
    model, _, (images, _) = fitted
    # Blurred (the fine noise and all detail gone) and noisier than any fake: far outside either end.
    blurred = torch.nn.functional.avg_pool2d(to_input(torch.from_numpy(images[:4])), 5, 1, 2, count_include_pad=False)
    noisy = (to_input(torch.from_numpy(images[:4])) + 0.3 * torch.randn(4, 3, SIZE, SIZE)).clamp(0, 1)
    for x in (blurred, noisy):
        with torch.inference_mode():
            assert not model.heads["spectrum"].score(x)[1].any()
            torch.testing.assert_close(model(x), model.forward_features(x)[0])  # the CNN's call alone


def test_the_branch_travels_in_the_checkpoint_without_its_constant_matrices(fitted, tmp_path):
    model, _, (images, _) = fitted
    state = model.state_dict()
    assert {"heads.spectrum.weight", "heads.spectrum.shift"} <= set(state) and "heads.spectrum.cos" not in state
    save_checkpoint(model, tmp_path / "model.pt", fit="resize")
    loaded, _ = load_checkpoint(tmp_path / "model.pt")
    torch.testing.assert_close(logits(loaded, images), logits(model.eval(), images))
    detector = Detector.from_checkpoint(tmp_path / "model.pt", decision=Decision(), backend="torch")
    p_fake = torch.softmax(logits(model, images), 1)[:, 1].numpy()
    np.testing.assert_allclose(detector.predict(images), p_fake, atol=1e-5)
    np.testing.assert_allclose(TorchBackend(model, SIZE, CPU)(images)[0], p_fake, atol=1e-5)


@pytest.mark.skipif(not onnxruntime_installed(), reason="needs the onnx extra")
def test_the_onnx_export_carries_the_branch(fitted, tmp_path):
    model, _, (images, labels) = fitted
    report = export_onnx(model, tmp_path / ONNX_FILE, images)  # refuses an export that scores differently
    assert report["checked"] == len(images)
    p_fake = OnnxBackend(tmp_path / ONNX_FILE)(images)[0]
    np.testing.assert_allclose(p_fake, torch.softmax(logits(model, images), 1)[:, 1].numpy(), atol=1e-4)
    assert roc_auc_score(labels, p_fake) > 0.95  # what only the branch can see (the CNN is untrained)


@pytest.mark.slow
def test_training_fits_the_branch_after_the_best_epoch(tmp_path, synthetic_processed):
    params = TrainParams(epochs=2, batch_size=16, lr=3e-3, warmup_epochs=0.0, augment=FLIPS_ONLY)
    summary = train.fit(synthetic_processed, tmp_path, MODEL, params, CPU, seed=0, progress=False)
    assert set(summary["spectrum"]) == {"train_auc", "valid_auc"}
    assert json.loads((tmp_path / "train.json").read_text())["spectrum"] == summary["spectrum"]
    model, ckpt = load_checkpoint(tmp_path / "model.pt")
    assert ckpt["config"]["spectrum"] and torch.isfinite(model.heads["spectrum"].shift)
    # The CNN in model.pt is the best epoch's, as without the branch.
    plain = train.fit(synthetic_processed, tmp_path / "plain", replace(MODEL, spectrum=False), params, CPU, seed=0,
                      progress=False)
    cnn, _ = load_checkpoint(tmp_path / "plain" / "model.pt")
    assert plain["best_epoch"] == summary["best_epoch"]
    for key, value in cnn.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)
