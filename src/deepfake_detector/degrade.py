"""What a face goes through after it leaves the generator: JPEG re-compression, Gaussian blur,
additive noise and down-scaling, each on one uint8 RGB (H, W, 3) image.

The one implementation that preprocess (seeded degradation of the training set), online
augmentation (JPEG) and the robustness matrix share, so a "blur of sigma 1" means the same
everywhere.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """Re-encode as JPEG at ``quality`` (Pillow's libjpeg) and decode again."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=int(quality))
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
