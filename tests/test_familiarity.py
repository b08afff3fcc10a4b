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
from deepfake_detector.torch_backend import (
    TOLERANCE,
    UNFAMILIARITY_TOLERANCE,
    TorchBackend,
    export_onnx,
    unfamiliarity_difference,
)

SIZE = 32
# Three blocks: the familiarity head's default features, the stages, are the first two blocks' outputs (two parts).
MODEL = ModelParams(arch="cnn", pretrained="none", channels=(8, 16, 32), hidden=16)
CPU = torch.device("cpu")
needs_onnx = pytest.mark.skipif(not onnxruntime_installed(), reason="needs the onnx extra")

# Two Gaussian blobs in 8-D, 20 apart along the first two axes, one spread per axis (0.5 to 2): the
# train embeddings of two classes that share one covariance, as the Mahalanobis head assumes.
D = 8
SPREAD = np.linspace(0.5, 2.0, D)
CENTRES = 20 * np.eye(D)[:2]
# A second feature vector of the same images (another stage): 4-D, unit spread, each class about its own axis.
D2 = 4
CENTRES2 = 10 * np.eye(D2)[2:]


def blobs(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` points per blob, their class and their source (two sources per class, alike)."""
    labels = np.repeat([0, 1], n)
    points = CENTRES[labels] + rng.normal(size=(2 * n, D)) * SPREAD
    sources = np.where(np.arange(2 * n) % 2, "a", "b")
    return points, labels, sources


def second(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The second feature vector of points of classes ``labels``."""
    return CENTRES2[labels] + rng.normal(size=(len(labels), D2))


def groups(labels: np.ndarray, sources: np.ndarray, by: str) -> np.ndarray:
    """What heads.fit_heads hands familiarity.fit: the class, or the source and class."""
    return labels if by == "class" else np.char.add(sources, labels.astype(str))


def unfamiliarity(head: familiarity.FamiliarityHead, vectors: list[np.ndarray]) -> np.ndarray:
    """The head's output for the feature ``vectors`` of some images, handed over as the network's
    outputs would hold them (the head reads neither the image nor the logits)."""
    tensors = [torch.as_tensor(v, dtype=torch.float32) for v in vectors]
    n = len(tensors[0])
    out = {"logits": torch.zeros(n, 2), "stages": tensors} if head.features != "embedding" else \
        {"logits": torch.zeros(n, 2), "embedding": tensors[0]}
    return head(torch.zeros(n, 3, 1, 1), out)["unfamiliarity"].numpy()


def far_points() -> np.ndarray:
    """10 sigma from a centre of :func:`blobs`, across the axes that neither centre lies on."""
    return np.array([centre + sign * 10 * SPREAD[k] * np.eye(D)[k]
                     for centre in CENTRES for k in range(2, D) for sign in (-1, 1)])


@pytest.mark.parametrize("by", ["class", "source"])
@pytest.mark.parametrize("kind", familiarity.KINDS)
def test_the_head_accepts_the_clusters_and_flags_what_lies_far_from_them(kind, by):
    """One part: the embedding alone."""
    rng = np.random.default_rng(0)
    train_points, train_labels, train_sources = blobs(500, rng)
    head = familiarity.FamiliarityHead(kind, features="embedding")
    assert (unfamiliarity(head, [train_points[:3]]) == 0).all()  # unfitted: every image familiar
    familiarity.fit(head, [train_points], groups(train_labels, train_sources, by), seed=0)
    assert len(head.parts) == 1
    if kind == "mahalanobis":  # a Gaussian per group; knn keeps train embeddings whatever their group
        assert head.parts[0].means.shape == ({"class": 2, "source": 4}[by], D)
    valid = blobs(500, rng)[0]
    share = 0.05
    calibrated = familiarity.calibrate(head, [valid], share)
    np.testing.assert_allclose(unfamiliarity(head, [valid]), calibrated, rtol=1e-5)  # what the head answers
    assert np.mean(calibrated >= 1) == pytest.approx(share, abs=1 / len(valid))
    # New points of the same clusters: flagged about as often as the valid ones, no more.
    assert np.mean(unfamiliarity(head, [blobs(500, rng)[0]]) < 1) >= 0.9
    assert (unfamiliarity(head, [far_points()]) >= 1.5).all()  # every one flagged


@pytest.mark.parametrize("kind", familiarity.KINDS)
def test_a_head_of_two_parts_flags_what_lies_far_in_either(kind):
    """Two feature vectors (two stages), a part each: a point familiar in one and far in the other is flagged."""
    rng = np.random.default_rng(3)
    points, labels, sources = blobs(500, rng)
    head = familiarity.FamiliarityHead(kind, features="stages")
    assert (unfamiliarity(head, [points[:3], second(labels[:3], rng)]) == 0).all()  # unfitted
    familiarity.fit(head, [points, second(labels, rng)], groups(labels, sources, "source"), seed=0)
    assert len(head.parts) == 2
    if kind == "mahalanobis":
        assert [tuple(p.means.shape) for p in head.parts] == [(4, D), (4, D2)]
    valid, valid_labels, _ = blobs(500, rng)
    valid = [valid, second(valid_labels, rng)]
    share = 0.05
    calibrated = familiarity.calibrate(head, valid, share)
    assert all(np.isfinite(float(p.scale)) and float(p.scale) > 0 for p in head.parts)
    np.testing.assert_allclose(unfamiliarity(head, valid), calibrated, rtol=1e-5)
    assert np.mean(calibrated >= 1) == pytest.approx(share, abs=1 / len(calibrated))
    new, new_labels, _ = blobs(500, rng)
    assert np.mean(unfamiliarity(head, [new, second(new_labels, rng)]) < 1) >= 0.9
    # Far in the first vector, familiar in the second: flagged.
    far = far_points()
    far_labels = np.repeat([0, 1], len(far) // 2)
    assert (unfamiliarity(head, [far, second(far_labels, rng)]) >= 1.5).all()
    # Familiar in the first, far in the second (8 sigma across the axes neither of its centres lies on): flagged.
    n = len(far)
    near = CENTRES[far_labels] + rng.normal(size=(n, D)) * SPREAD * 0.5
    off = CENTRES2[far_labels] + 8 * rng.choice([-1, 1], size=(n, 1)) * np.eye(D2)[rng.integers(0, 2, n)]
    assert (unfamiliarity(head, [near, second(far_labels, rng)]) < 1).mean() >= 0.9  # both familiar: accepted
    assert (unfamiliarity(head, [near, off]) >= 1.5).all()


@pytest.mark.parametrize("kind", familiarity.KINDS)
def test_the_joint_head_flags_stages_that_were_never_seen_together(kind):
    """One density of both vectors side by side: an image whose first vector is one class's and whose
    second is the other's is familiar to a head of a part per vector, but the joint head never saw the
    pair and flags it; images like the train split are accepted as before."""
    rng = np.random.default_rng(5)
    points, labels, sources = blobs(500, rng)
    train = [points, second(labels, rng)]
    valid, valid_labels, _ = blobs(500, rng)
    valid = [valid, second(valid_labels, rng)]
    new, new_labels, _ = blobs(200, rng)
    mixed = [new, second(1 - new_labels, rng)]  # each vector from a class, the two from different classes
    shares = {}
    for features in ("joint", "stages"):
        head = familiarity.FamiliarityHead(kind, features=features)

        def measured(vectors: list[np.ndarray]) -> list[np.ndarray]:
            """What heads.vectors hands fit and calibrate: the vectors the head reads of the stages."""
            return [v.numpy() for v in head.vectors({"stages": [torch.as_tensor(v) for v in vectors]})]

        familiarity.fit(head, measured(train), groups(labels, sources, "source"), seed=0)
        assert len(head.parts) == (1 if features == "joint" else 2)
        if kind == "mahalanobis" and features == "joint":
            assert tuple(head.parts[0].means.shape) == (4, D + D2)
        calibrated = familiarity.calibrate(head, measured(valid), 0.05)
        assert np.mean(calibrated >= 1) == pytest.approx(0.05, abs=1 / len(calibrated))
        assert np.mean(unfamiliarity(head, [new, second(new_labels, rng)]) < 1) >= 0.9
        shares[features] = np.mean(unfamiliarity(head, mixed) >= 1)
    assert shares["joint"] == 1 and shares["stages"] <= 0.1


def test_flagging_distance_flags_only_beyond_tied_distances():
    """A constant feature ties the distances: the flagging distance then lies just beyond the tie, so
    only the rows beyond it are flagged, not the whole tied mass (nor everything, at a tie at zero)."""
    share = 0.05
    tied = np.array([1.0] * 97 + [3.0, 4.0, 5.0], dtype=np.float32)
    scale = familiarity.flagging_distance(tied, share)
    assert 1.0 < scale <= 3.0 and list(tied >= scale).count(True) == 3
    for constant in (np.ones(100), np.zeros(100)):
        scale = familiarity.flagging_distance(constant, share)
        assert scale > 0 and not (constant >= scale).any()
    spread = np.arange(100, dtype=np.float32)  # no ties: the share itself
    assert np.mean(spread >= familiarity.flagging_distance(spread, share)) == pytest.approx(share, abs=0.01)


def test_a_constant_part_flags_nothing_of_its_own():
    """A feature the same for every image (knn): its part ties on the valid images and flags only a
    row that differs; the other part sets what is flagged."""
    rng = np.random.default_rng(5)
    points, labels, _ = blobs(200, rng)
    constant = np.ones((len(points), D2))
    head = familiarity.FamiliarityHead("knn", features="stages")
    familiarity.fit(head, [points, constant], labels, seed=0)
    valid = blobs(200, rng)[0]
    share = 0.05
    calibrated = familiarity.calibrate(head, [valid, np.ones((len(valid), D2))], share)
    assert np.isfinite(calibrated).all() and np.mean(calibrated >= 1) == pytest.approx(share, abs=1 / len(valid))
    tied = head.parts[1].distance(torch.ones(3, D2))
    assert (tied < head.parts[1].scale).all()  # the tie itself is not flagged
    differs = np.ones((1, D2))
    differs[0, 0] = 3
    assert unfamiliarity(head, [valid[:1], differs])[0] >= 1


def test_mahalanobis_measures_each_axis_in_its_own_spread():
    """3 away from a centre is 6 sigma along the narrowest axis (flagged), 1.5 along the widest (accepted):
    the shared covariance counts, not the Euclidean distance."""
    rng = np.random.default_rng(1)
    points, labels, _ = blobs(500, rng)
    head = familiarity.FamiliarityHead("mahalanobis", features="embedding")
    familiarity.fit(head, [points], labels)
    familiarity.calibrate(head, [blobs(500, rng)[0]], 0.05)
    narrow, wide = CENTRES[0] + 3 * np.eye(D)[0], CENTRES[0] + 3 * np.eye(D)[D - 1]
    assert head.parts[0].means.shape == (2, D) and head.parts[0].precision.shape == (D, D)
    u_narrow, u_wide = unfamiliarity(head, [np.stack([narrow, wide])])
    assert u_narrow >= 1 > u_wide


def test_knn_keeps_a_bounded_bank_of_unit_embeddings():
    rng = np.random.default_rng(2)
    head = familiarity.FamiliarityHead("knn", features="embedding")
    points = rng.normal(size=(familiarity.BANK_SIZE + 100, D)) + 5
    familiarity.fit(head, [points], np.zeros(len(points)), seed=0)
    bank = head.parts[0].bank
    assert bank.shape == (familiarity.BANK_SIZE, D)
    torch.testing.assert_close(bank.norm(dim=1), torch.ones(familiarity.BANK_SIZE))
    with pytest.raises(ValueError, match="familiarity kind must be one of mahalanobis, knn"):
        familiarity.FamiliarityHead("none")


def test_the_head_reads_the_features_it_was_made_for():
    e, s1, s2 = torch.rand(2, 5), torch.rand(2, 3), torch.rand(2, 4)
    out = {"logits": torch.zeros(2, 2), "embedding": e, "stages": [s1, s2]}
    assert familiarity.FamiliarityHead("knn", features="embedding").vectors(out) == [e]
    assert familiarity.FamiliarityHead("mahalanobis", features="stages").vectors(out) == [s1, s2]
    joint = familiarity.FamiliarityHead("mahalanobis").vectors(out)  # joint: the default
    assert len(joint) == 1 and torch.equal(joint[0], torch.cat([s1, s2], 1))
    for features in familiarity.FEATURES:  # a network without stages
        assert familiarity.FamiliarityHead("knn", features=features).vectors({**out, "stages": []}) == [e]
    with pytest.raises(ValueError, match="familiarity features must be one of joint, stages, embedding"):
        familiarity.FamiliarityHead("knn", features="layers")


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


# Of MODEL's head: the outputs of its first two blocks, side by side or a part each, or the embedding.
PARTS = {"joint": 1, "stages": 2, "embedding": 1}
WIDTHS = {"joint": [8 + 16], "stages": [8, 16], "embedding": [MODEL.hidden]}


def same_outputs(got: dict, expected: dict) -> None:
    """``got`` holds exactly the outputs of ``expected``, equal (the stages a list of tensors)."""
    assert set(got) == set(expected)
    for key, value in expected.items():
        pairs = zip(got[key], value, strict=True) if isinstance(value, list) else [(got[key], value)]
        assert all(torch.equal(a, b) for a, b in pairs), key


@pytest.mark.parametrize("kind, spectrum, features", [(kind, spectrum, "joint") for kind in familiarity.KINDS
                                                      for spectrum in (False, True)]
                         + [(kind, False, features) for kind in familiarity.KINDS for features in ("stages", "embedding")])
def test_the_fitted_head_round_trips_through_the_checkpoint(kind, spectrum, features, tmp_path):
    model, figures = fitted_model(replace(MODEL, familiarity=kind, spectrum=spectrum, familiar_features=features))
    assert set(figures) == ({"familiarity", "spectrum"} if spectrum else {"familiarity"})
    assert figures["familiarity"]["valid_flagged"] == pytest.approx(MODEL.unfamiliar_share, abs=1 / 48)
    assert len(model.heads["familiarity"].parts) == PARTS[features]
    save_checkpoint(model, tmp_path / "model.pt")
    loaded, ckpt = heads.load_checkpoint(tmp_path / "model.pt")
    assert ckpt["config"]["familiarity"] == kind and ckpt["config"]["familiar_features"] == features
    assert list(loaded.heads) == list(model.heads)
    head = loaded.heads["familiarity"]
    assert head.features == features and len(head.parts) == PARTS[features]  # the parts remade from the state dict
    if kind == "mahalanobis":  # each part measures its own vector: the first two blocks, or the hidden layer
        assert [p.means.shape[1] for p in head.parts] == WIDTHS[features]
    x = to_input(torch.from_numpy(random_split(8, seed=3)[0]))
    with torch.inference_mode():
        expected, got = model.outputs(x), loaded.outputs(x)
    assert set(got) == {"logits", "embedding", "stages", "unfamiliarity"} and got["unfamiliarity"].shape == (16,)
    assert (expected["unfamiliarity"] > 0).all()  # fitted: real distances, not the unfitted zeros
    same_outputs(got, expected)


def test_a_network_without_stages_measures_its_embedding(tmp_path):
    """A CNN of one block has no stage before its last (which the embedding pools): the default head
    measures the embedding, one part, and round-trips so."""
    model, figures = fitted_model(replace(MODEL, channels=(8,)))
    head = model.heads["familiarity"]
    assert head.features == "joint" and len(head.parts) == 1 and head.parts[0].means.shape == (4, MODEL.hidden)
    assert figures["familiarity"]["valid_flagged"] == pytest.approx(MODEL.unfamiliar_share, abs=1 / 48)
    save_checkpoint(model, tmp_path / "model.pt")
    loaded, _ = heads.load_checkpoint(tmp_path / "model.pt")
    x = to_input(torch.from_numpy(random_split(4, seed=3)[0]))
    with torch.inference_mode():
        expected, got = model.outputs(x), loaded.outputs(x)
    assert expected["stages"] == [] and (expected["unfamiliarity"] > 0).all()
    same_outputs(got, expected)


def test_heads_join_the_network_on_its_device():
    """train attaches the heads to the network where it trained (CUDA there): the meta device stands in."""
    model = build_model(replace(MODEL, spectrum=True), SIZE).to("meta")
    heads.attach(model)
    assert list(model.heads) == ["spectrum", "familiarity"]
    assert {t.device.type for t in model.heads.buffers()} == {"meta"}


@needs_onnx
@pytest.mark.parametrize("features", familiarity.FEATURES)
@pytest.mark.parametrize("kind", familiarity.KINDS)
def test_onnx_export_carries_the_unfamiliarity_as_its_second_output(kind, features, tmp_path):
    model, _ = fitted_model(replace(MODEL, familiarity=kind, familiar_features=features))
    assert len(model.heads["familiarity"].parts) == PARTS[features]
    images = random_split(12, seed=4)[0]
    report = export_onnx(model, tmp_path / ONNX_FILE, images)  # refuses outputs that differ from PyTorch
    assert report["checked"] == len(images)
    onnx = OnnxBackend(tmp_path / ONNX_FILE)
    assert [o.name for o in onnx.session.get_outputs()] == ["p_fake", "unfamiliarity"]
    (p_onnx, u_onnx), (p_torch, u_torch) = onnx(images), TorchBackend(model, SIZE, CPU)(images)
    assert u_onnx.shape == u_torch.shape == (len(images),) and (u_torch > 0).all()
    assert np.abs(p_onnx - p_torch).max() <= TOLERANCE
    assert unfamiliarity_difference(u_onnx, u_torch) <= UNFAMILIARITY_TOLERANCE
    # Through the Detector on both backends, from image files: the same verdicts.
    save_checkpoint(model, tmp_path / "model.pt")
    paths = []
    for i, image in enumerate(images[:4]):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(png(image))
    scored = {backend: Detector.from_checkpoint(tmp_path, Decision(crop_faces=False), backend=backend).score(paths)
              for backend in ("torch", "onnxruntime")}
    assert all(s.errors == [""] * 4 for s in scored.values())
    assert unfamiliarity_difference(scored["onnxruntime"].unfamiliarity,
                                    scored["torch"].unfamiliarity) <= UNFAMILIARITY_TOLERANCE
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
              if k not in ("familiarity", "familiar_features", "familiar_groups", "unfamiliar_share")}
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


@pytest.mark.parametrize("fitted", [True, False])
@pytest.mark.parametrize("kind", familiarity.KINDS)
def test_a_checkpoint_from_before_the_heads_parts_scores_as_it_did(kind, fitted, tmp_path):
    """A head of one density (its buffers at ``heads.familiarity.*``, no familiar_features in the config):
    it loads as an embedding head of that one part, with the same unfamiliarity; unfitted, of none."""
    model, _ = fitted_model(replace(MODEL, familiarity=kind, familiar_features="embedding"))
    state = model.state_dict()
    part = {k.removeprefix("heads.familiarity.parts.0."): v for k, v in state.items()
            if k.startswith("heads.familiarity.parts.0.")}
    assert set(part) == {"means", "precision", "bank", "scale"}
    if fitted:  # the single density's flagging distance: the part's and the head's in one
        part["scale"] = part["scale"] * state["heads.familiarity.scale"]
    else:
        part = {"means": torch.zeros(0, 0), "precision": torch.zeros(0, 0), "bank": torch.zeros(0, 0),
                "scale": torch.tensor(float("inf"))}
    old = {k: v for k, v in state.items() if not k.startswith("heads.familiarity.")}
    old |= {f"heads.familiarity.{k}": v for k, v in part.items()}
    config = {k: v for k, v in asdict(model.config).items() if k != "familiar_features"}
    torch.save({"config": config, "image_size": SIZE, "state_dict": old, "epoch": 1}, tmp_path / "model.pt")
    loaded, _ = heads.load_checkpoint(tmp_path / "model.pt")
    head = loaded.heads["familiarity"]
    assert head.features == "embedding" and len(head.parts) == (1 if fitted else 0)
    x = to_input(torch.from_numpy(random_split(4, seed=7)[0]))
    with torch.inference_mode():
        got = loaded.outputs(x)["unfamiliarity"]
        expected = model.outputs(x)["unfamiliarity"] if fitted else torch.zeros(len(x))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)


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
