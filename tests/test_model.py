"""The CNN's shapes, configurability and checkpoint round trip."""

from __future__ import annotations

import pytest
import torch

from deepfake_detector.model import DeepfakeCNN, load_checkpoint, save_checkpoint, to_input
from deepfake_detector.params import ModelParams


@pytest.mark.parametrize("channels, convs, size", [((8,), 1, 32), ((8, 16, 32), 2, 64), ((16, 32, 64, 128), 2, 128)])
def test_output_is_two_logits_per_image(channels, convs, size):
    model = DeepfakeCNN(ModelParams(channels=channels, convs_per_block=convs, hidden=16), size)
    out = model(torch.rand(3, 3, size, size))
    assert out.shape == (3, 2)
    probs = torch.softmax(out, dim=1)
    assert torch.allclose(probs.sum(1), torch.ones(3))


def test_depth_and_width_follow_params():
    small = DeepfakeCNN(ModelParams(channels=(8, 16), convs_per_block=1, batch_norm=False), 32)
    large = DeepfakeCNN(ModelParams(channels=(8, 16, 32), convs_per_block=2, batch_norm=True), 32)
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
    model = DeepfakeCNN(ModelParams(channels=(8, 16), hidden=8), 32).eval()
    save_checkpoint(model, tmp_path / "m.pt", epoch=3)
    loaded, ckpt = load_checkpoint(tmp_path / "m.pt")
    x = torch.rand(2, 3, 32, 32)
    assert ckpt["epoch"] == 3 and loaded.image_size == 32 and loaded.config == model.config
    assert torch.equal(model(x), loaded(x))
