"""The robustness matrix: the test split re-scored under each perturbation of :mod:`~deepfake_detector.degrade`
and level in ``evaluate.robustness``.

Each row works on a uint8 batch (N, S, S, 3) at the model's input size and returns one of the same
shape, so it slots into :meth:`Detector.predict <deepfake_detector.detector.Detector.predict>` batch by batch.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from deepfake_detector.degrade import blur, jpeg, noise, rescale
from deepfake_detector.params import RobustnessParams

Transform = Callable[[np.ndarray], np.ndarray]


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
