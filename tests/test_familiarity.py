"""The familiarity head (model.familiarity): what it flags on known clusters, its fit after training,
and every way a model carries it (checkpoint, ONNX, both backends), or does not (older models)."""

from __future__ import annotations

import io
import json
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
from PIL import Image

from deepfake_detector import familiarity, heads, train
from deepfake_detector.backends import ONNX_FILE, OnnxBackend, onnxruntime_installed
from deepfake_detector.detector import Decision, Detector, familiar
from deepfake_detector.model import build_model, save_checkpoint, to_input
from deepfake_detector.params import ModelParams, TrainParams
from deepfake_detector.preprocess import load_split
from deepfake_detector.torch_backend import TOLERANCE, UNFAMILIARITY_TOLERANCE, TorchBackend, export_onnx

SIZE = 32
MODEL = ModelParams(arch="cnn", pretrained="none", channels=(8, 16), hidden=16)
CPU = torch.device("cpu")
needs_onnx = pytest.mark.skipif(not onnxruntime_installed(), reason="needs the onnx extra")

# Two Gaussian blobs in 8-D, 20 apart along the first two axes, one spread per axis (0.5 to 2): the
# train embeddings of two classes that share one covariance, as the Mahalanobis head assumes.
D = 8
SPREAD = np.linspace(0.5, 2.0, D)
CENTRES = 20 * np.eye(D)[:2]


def blobs(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` points per blob, their class and their source (two sources per class, alike)."""
    labels = np.repeat([0, 1], n)
    points = CENTRES[labels] + rng.normal(size=(2 * n, D)) * SPREAD
    sources = np.where(np.arange(2 * n) % 2, "a", "b")
    return points, labels, sources


def groups(labels: np.ndarray, sources: np.ndarray, by: str) -> np.ndarray:
    """What heads.fit_heads hands familiarity.fit: the class, or the source and class."""
    return labels if by == "class" else np.char.add(sources, labels.astype(str))


def unfamiliarity(head: familiarity.FamiliarityHead, points: np.ndarray) -> np.ndarray:
    """The head's output for embeddings ``points`` (it reads neither the image nor the logits)."""
    e = torch.as_tensor(points, dtype=torch.float32)
    return head(torch.zeros(len(e), 3, 1, 1), torch.zeros(len(e), 2), e)["unfamiliarity"].numpy()


@pytest.mark.parametrize("by", ["class", "source"])
@pytest.mark.parametrize("kind", familiarity.KINDS)
def test_the_head_accepts_the_clusters_and_flags_what_lies_far_from_them(kind, by):
    rng = np.random.default_rng(0)
    train_points, train_labels, train_sources = blobs(500, rng)
    head = familiarity.FamiliarityHead(kind)
    assert (unfamiliarity(head, train_points[:3]) == 0).all()  # unfitted: every image familiar
    familiarity.fit(head, train_points, groups(train_labels, train_sources, by), seed=0)
    if kind == "mahalanobis":  # a Gaussian per group; knn keeps train embeddings whatever their group
        assert head.means.shape == ({"class": 2, "source": 4}[by], D)
    valid = blobs(500, rng)[0]
    share = 0.05
    scale = familiarity.calibrate(head, head.distance(torch.as_tensor(valid, dtype=torch.float32)).numpy(), share)
    assert float(head.scale) == pytest.approx(scale)
    assert np.mean(unfamiliarity(head, valid) >= 1) == pytest.approx(share, abs=1 / len(valid))
    # New points of the same clusters: flagged about as often as the valid ones, no more.
    assert np.mean(unfamiliarity(head, blobs(500, rng)[0]) < 1) >= 0.9
    # 10 sigma from a centre, across the axes that neither centre lies on: every one flagged.
    far = np.array([centre + sign * 10 * SPREAD[k] * np.eye(D)[k]
                    for centre in CENTRES for k in range(2, D) for sign in (-1, 1)])
    assert (unfamiliarity(head, far) >= 1.5).all()


def test_mahalanobis_measures_each_axis_in_its_own_spread():
    """3 away from a centre is 6 sigma along the narrowest axis (flagged), 1.5 along the widest (accepted):
    the shared covariance counts, not the Euclidean distance."""
    rng = np.random.default_rng(1)
    points, labels, _ = blobs(500, rng)
    head = familiarity.FamiliarityHead("mahalanobis")
    familiarity.fit(head, points, labels)
    familiarity.calibrate(head, head.distance(torch.as_tensor(blobs(500, rng)[0], dtype=torch.float32)).numpy(), 0.05)
    narrow, wide = CENTRES[0] + 3 * np.eye(D)[0], CENTRES[0] + 3 * np.eye(D)[D - 1]
    assert head.means.shape == (2, D) and head.precision.shape == (D, D)
    u_narrow, u_wide = unfamiliarity(head, np.stack([narrow, wide]))
    assert u_narrow >= 1 > u_wide


def test_knn_keeps_a_bounded_bank_of_unit_embeddings():
    rng = np.random.default_rng(2)
    head = familiarity.FamiliarityHead("knn")
    points = rng.normal(size=(familiarity.BANK_SIZE + 100, D)) + 5
    familiarity.fit(head, points, np.zeros(len(points)), seed=0)
    assert head.bank.shape == (familiarity.BANK_SIZE, D)
    torch.testing.assert_close(head.bank.norm(dim=1), torch.ones(familiarity.BANK_SIZE))
    with pytest.raises(ValueError, match="familiarity kind must be one of mahalanobis, knn"):
        familiarity.FamiliarityHead("none")


def random_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``n`` random uint8 NHWC images per class, their labels and sources (two per class)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (2 * n, SIZE, SIZE, 3), dtype=np.uint8)
    labels = np.repeat([0, 1], n)
    return images, labels, [f"s{i % 2}" for i in range(2 * n)]


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def fitted_model(config: ModelParams) -> tuple[torch.nn.Module, dict]:
    """An untrained network of ``config`` with its heads fit on random images (what train does after
    its last epoch), and the figures fit_heads returns."""
    torch.manual_seed(0)
    model = heads.build(config, SIZE)
    figures = heads.fit_heads(model, random_split(24, seed=1), random_split(24, seed=2), CPU, batch_size=16)
    return model.eval(), figures


@pytest.mark.parametrize("spectrum", [False, True])
@pytest.mark.parametrize("kind", familiarity.KINDS)
def test_the_fitted_head_round_trips_through_the_checkpoint(kind, spectrum, tmp_path):
    model, figures = fitted_model(replace(MODEL, familiarity=kind, spectrum=spectrum))
    assert set(figures) == ({"familiarity", "spectrum"} if spectrum else {"familiarity"})
    assert figures["familiarity"]["valid_flagged"] == pytest.approx(MODEL.unfamiliar_share, abs=1 / 48)
    save_checkpoint(model, tmp_path / "model.pt")
    loaded, ckpt = heads.load_checkpoint(tmp_path / "model.pt")
    assert ckpt["config"]["familiarity"] == kind and list(loaded.heads) == list(model.heads)
    x = to_input(torch.from_numpy(random_split(8, seed=3)[0]))
    with torch.inference_mode():
        expected, got = model.outputs(x), loaded.outputs(x)
    assert set(got) == {"logits", "embedding", "unfamiliarity"} and got["unfamiliarity"].shape == (16,)
    assert (expected["unfamiliarity"] > 0).all()  # fitted: real distances, not the unfitted zeros
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def test_heads_join_the_network_on_its_device():
    """train attaches the heads to the network where it trained (CUDA there): the meta device stands in."""
    model = build_model(replace(MODEL, spectrum=True), SIZE).to("meta")
    heads.attach(model)
    assert list(model.heads) == ["spectrum", "familiarity"]
    assert {t.device.type for t in model.heads.buffers()} == {"meta"}


@needs_onnx
@pytest.mark.parametrize("kind", familiarity.KINDS)
def test_onnx_export_carries_the_unfamiliarity_as_its_second_output(kind, tmp_path):
    model, _ = fitted_model(replace(MODEL, familiarity=kind))
    images = random_split(12, seed=4)[0]
    report = export_onnx(model, tmp_path / ONNX_FILE, images)  # refuses outputs that differ from PyTorch
    assert report["checked"] == len(images)
    onnx = OnnxBackend(tmp_path / ONNX_FILE)
    assert [o.name for o in onnx.session.get_outputs()] == ["p_fake", "unfamiliarity"]
    (p_onnx, u_onnx), (p_torch, u_torch) = onnx(images), TorchBackend(model, SIZE, CPU)(images)
    assert u_onnx.shape == u_torch.shape == (len(images),) and (u_torch > 0).all()
    assert np.abs(p_onnx - p_torch).max() <= TOLERANCE
    assert np.abs(u_onnx - u_torch).max() <= UNFAMILIARITY_TOLERANCE
    # Through the Detector on both backends, from image files: the same verdicts.
    save_checkpoint(model, tmp_path / "model.pt")
    paths = []
    for i, image in enumerate(images[:4]):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(png(image))
    scored = {backend: Detector.from_checkpoint(tmp_path, Decision(crop_faces=False), backend=backend).score(paths)
              for backend in ("torch", "onnxruntime")}
    assert all(s.errors == [""] * 4 for s in scored.values())
    np.testing.assert_allclose(scored["onnxruntime"].unfamiliarity, scored["torch"].unfamiliarity,
                               atol=UNFAMILIARITY_TOLERANCE)
    assert [familiar(u) for u in scored["onnxruntime"].unfamiliarity] == \
        [familiar(u) for u in scored["torch"].unfamiliarity]


@needs_onnx
def test_a_model_without_the_head_exports_one_output(tmp_path):
    model, figures = fitted_model(replace(MODEL, familiarity="none", spectrum=True))
    assert "familiarity" not in figures and list(model.heads) == ["spectrum"]
    images = random_split(4, seed=5)[0]
    export_onnx(model, tmp_path / ONNX_FILE, images)
    onnx = OnnxBackend(tmp_path / ONNX_FILE)
    assert [o.name for o in onnx.session.get_outputs()] == ["p_fake"]
    assert onnx(images)[1] is None and TorchBackend(model, SIZE, CPU)(images)[1] is None


@pytest.mark.parametrize("backend", ["torch", pytest.param("onnxruntime", marks=needs_onnx)])
def test_a_checkpoint_from_before_the_head_scores_without_a_verdict(backend, tmp_path):
    """A spectrum model saved before heads existed: no familiarity in its config, the branch's keys
    ``spectrum.*``. It loads, scores as it did, and its unfamiliarity is NaN (no verdict)."""
    model, _ = fitted_model(replace(MODEL, familiarity="none", spectrum=True))
    config = {k: v for k, v in asdict(model.config).items()
              if k not in ("familiarity", "familiar_groups", "unfamiliar_share")}
    state = {k.removeprefix("heads."): v for k, v in model.state_dict().items()}
    assert "spectrum.weight" in state
    torch.save({"config": config, "image_size": SIZE, "state_dict": state, "epoch": 1}, tmp_path / "model.pt")
    loaded, _ = heads.load_checkpoint(tmp_path / "model.pt")
    assert loaded.config.familiarity == "none" and list(loaded.heads) == ["spectrum"]
    images = random_split(4, seed=6)[0]
    if backend == "onnxruntime":
        export_onnx(loaded, tmp_path / ONNX_FILE, images)
    detector = Detector.from_checkpoint(tmp_path, Decision(crop_faces=False), backend=backend)
    assert detector.backend.name == backend
    p_fake, u = detector.assess(images)
    with torch.inference_mode():
        expected = torch.softmax(model(to_input(torch.from_numpy(images))), 1)[:, 1].numpy()
    np.testing.assert_allclose(p_fake, expected, atol=TOLERANCE)
    assert np.isnan(u).all()
    (tmp_path / "face.png").write_bytes(png(images[0]))
    scored = detector.score([tmp_path / "face.png", tmp_path / "missing.png"])
    assert scored.errors[0] == "" and scored.errors[1] and np.isnan(scored.unfamiliarity).all()
    assert familiar(scored.unfamiliarity[0]) is None


@pytest.mark.parametrize("kind", familiarity.KINDS)
def test_training_fits_the_head_and_calibrates_it_on_valid(kind, tmp_path, synthetic_processed):
    share = 0.25  # of the 48 valid images: 12
    config = replace(MODEL, familiarity=kind, unfamiliar_share=share)
    summary = train.fit(synthetic_processed, tmp_path, config, TrainParams(epochs=1, batch_size=16), CPU, seed=0,
                        progress=False)
    written = json.loads((tmp_path / "train.json").read_text())
    assert set(written["familiarity"]) == {"scale", "valid_flagged"}
    assert written["familiarity"] == summary["familiarity"]
    valid_images = np.array(load_split(synthetic_processed, "valid")[0])
    n = len(valid_images)
    assert written["familiarity"]["valid_flagged"] == pytest.approx(share, abs=1 / n)
    # The model.pt written scores the valid images with the same flagging distance.
    model, ckpt = heads.load_checkpoint(tmp_path / "model.pt")
    assert ckpt["config"]["familiarity"] == kind
    assert float(model.heads["familiarity"].scale) == pytest.approx(written["familiarity"]["scale"], rel=1e-6)
    _, u = Detector.from_checkpoint(tmp_path, Decision(), backend="torch").assess(valid_images)
    assert np.mean(u >= 1) == pytest.approx(share, abs=1 / n)
