"""Perturbations for the robustness matrix: what a face goes through after it leaves the generator.

Each works on a uint8 batch (N, S, S, 3) at the model's input size and returns one of the same
shape, so it slots into :meth:`Detector.predict <deepfake_detector.detector.Detector.predict>` batch by batch.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFilter

from deepfake_detector.params import RobustnessParams

Transform = Callable[[np.ndarray], np.ndarray]


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """Re-encode as JPEG at ``quality`` and decode again."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


def blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur with standard deviation ``sigma`` pixels."""
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius=sigma)))


def noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Add Gaussian noise of std ``sigma`` (0-255 units), rounded and clipped back to uint8."""
    noisy = image.astype(np.float32) + rng.normal(0.0, sigma, image.shape).astype(np.float32)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def rescale(image: np.ndarray, factor: float) -> np.ndarray:
    """Downscale by ``factor`` (bicubic), then back up to the original size: detail is lost."""
    height, width = image.shape[:2]
    small = Image.fromarray(image).resize((max(1, round(width * factor)), max(1, round(height * factor))),
                                          Image.Resampling.BICUBIC)
    return np.asarray(small.resize((width, height), Image.Resampling.BICUBIC))


def perturbations(params: RobustnessParams, seed: int = 0) -> list[tuple[str, Transform]]:
    """(name, batch transform) for every perturbation and level in ``params``, in a fixed order."""

    def per_image(fn: Callable[[np.ndarray], np.ndarray]) -> Transform:
        return lambda batch: np.stack([fn(image) for image in batch])

    rows: list[tuple[str, Transform]] = []
    rows += [(f"jpeg_q{q}", per_image(lambda im, q=q: jpeg(im, q))) for q in params.jpeg_quality]
    rows += [(f"blur_s{s:g}", per_image(lambda im, s=s: blur(im, s))) for s in params.blur_sigma]
    for s in params.noise_sigma:
        rng = np.random.default_rng(seed)  # one stream per row: the same noise on every rerun
        rows.append((f"noise_s{s:g}", lambda batch, s=s, rng=rng: noise(batch, s, rng)))
    rows += [(f"downscale_x{f:g}", per_image(lambda im, f=f: rescale(im, f))) for f in params.downscale]
    return rows
