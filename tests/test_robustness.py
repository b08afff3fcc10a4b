"""Each robustness perturbation changes the pixels the way its name says."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter

from conftest import synthetic_face
from deepfake_detector.degrade import blur, jpeg, noise, rescale
from deepfake_detector.params import RobustnessParams
from deepfake_detector.robustness import perturbations

IMAGE = np.asarray(synthetic_face(1, 3, 64))  # has a pixel-level checkerboard: high frequencies to lose


def high_freq(x: np.ndarray) -> float:
    return float(np.abs(np.diff(x.astype(float), axis=1)).mean())


def test_jpeg_is_a_real_reencode_and_lower_quality_loses_more():
    out = jpeg(IMAGE, 50)
    buffer = io.BytesIO()
    Image.fromarray(IMAGE).save(buffer, format="JPEG", quality=50)
    assert np.array_equal(out, np.asarray(Image.open(buffer).convert("RGB")))
    error = {q: np.abs(jpeg(IMAGE, q).astype(float) - IMAGE).mean() for q in (90, 75, 50, 30)}
    assert 0 < error[90] < error[75] < error[50] < error[30]


def test_blur_is_gaussian_with_the_given_sigma():
    out = blur(IMAGE, 1.0)
    assert np.array_equal(out, np.asarray(Image.fromarray(IMAGE).filter(ImageFilter.GaussianBlur(1.0))))
    assert high_freq(blur(IMAGE, 2.0)) < high_freq(out) < high_freq(IMAGE)


def test_noise_has_the_given_std_and_is_seeded():
    flat = np.full((64, 64, 3), 128, np.uint8)
    out = noise(flat, 5.0, np.random.default_rng(0))
    residual = out.astype(float) - 128
    assert abs(residual.mean()) < 0.2 and 4.8 < residual.std() < 5.2
    assert np.array_equal(out, noise(flat, 5.0, np.random.default_rng(0)))


def test_downscale_upscale_keeps_size_and_loses_detail():
    out = rescale(IMAGE, 0.5)
    assert out.shape == IMAGE.shape and out.dtype == np.uint8
    assert high_freq(out) < 0.5 * high_freq(IMAGE)
    small = Image.fromarray(IMAGE).resize((32, 32), Image.Resampling.BICUBIC)
    assert np.array_equal(out, np.asarray(small.resize((64, 64), Image.Resampling.BICUBIC)))


def test_perturbations_follow_params_and_work_on_batches():
    params = RobustnessParams(jpeg_quality=(90, 30), blur_sigma=(1.0,), noise_sigma=(5.0,), downscale=(0.5,))
    rows = perturbations(params, seed=0)
    assert [name for name, _ in rows] == ["jpeg_q90", "jpeg_q30", "blur_s1", "noise_s5", "downscale_x0.5"]
    batch = np.stack([IMAGE, IMAGE[::-1]])
    for name, transform in rows:
        out = transform(batch)
        assert out.shape == batch.shape and out.dtype == np.uint8 and not np.array_equal(out, batch), name
    assert np.array_equal(dict(perturbations(params, seed=0))["noise_s5"](batch),
                          dict(perturbations(params, seed=0))["noise_s5"](batch))
