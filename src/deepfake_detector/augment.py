"""Online augmentation, new every epoch: flips, random resized crops, Gaussian blur, noise, JPEG
and MixUp.

Every strength is drawn per sample (a batched ``transforms.v2`` call would draw one for the whole
batch) from the trainer's generator, on the main thread, for the whole epoch at its start: a plan
indexed by image. So a run is reproducible and a resumed one draws exactly what it would have.
JPEG re-compression needs CPU uint8 images (Pillow), so it runs where batches are read
(the prefetch thread, or a round trip for device-resident data); flips, crops, blur and noise run
on the device, on the float batch. Evaluation never augments.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from deepfake_detector import degrade
from deepfake_detector.params import AugmentParams

Plan = dict[str, torch.Tensor]


def draw(params: AugmentParams, n: int, generator: torch.Generator) -> Plan:
    """Per-image strengths for one epoch of ``n`` images (0 means: not applied)."""

    def uniform(bounds: tuple[float, float]) -> torch.Tensor:
        return bounds[0] + (bounds[1] - bounds[0]) * torch.rand(n, generator=generator)

    def chosen(prob: float) -> torch.Tensor:
        return torch.rand(n, generator=generator) < prob

    area, aspect = uniform(params.crop_scale), torch.exp(uniform((math.log(3 / 4), math.log(4 / 3))))
    if params.crop_scale[0] >= 1:
        aspect = torch.ones(n)  # crops off: the whole image, whatever the aspect draw
    cx, cy = torch.rand(n, generator=generator), torch.rand(n, generator=generator)
    plan = {"flip": chosen(params.hflip),
            # Crop width and height as shares of the side, and where its centre may go (0..1 of the slack).
            "crop": torch.stack([(area * aspect).sqrt().clamp(max=1), (area / aspect).sqrt().clamp(max=1), cx, cy], 1),
            "blur": torch.where(chosen(params.blur.prob), uniform(params.blur.sigma), 0.0),
            "noise": torch.where(chosen(params.noise.prob), uniform(params.noise.sigma), 0.0),
            "jpeg": torch.where(chosen(params.jpeg.prob), uniform(params.jpeg.quality).round(), 0.0).int(),
            "seed": torch.randint(0, 2**62, (n,), generator=generator)}
    if params.mixup > 0:  # drawn last and only when on, so runs without it draw what they always did
        plan["mix"] = torch.where(chosen(params.mixup), torch.rand(n, generator=generator), 1.0)
    return plan


def jpeg(images: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """Re-compress the uint8 NHWC CPU images whose ``quality`` is above 0, at that quality
    (:func:`degrade.jpeg`, as the robustness rows do)."""
    chosen = quality.nonzero().flatten().tolist()
    if not chosen:
        return images
    images = images.clone()
    for i in chosen:
        images[i] = torch.from_numpy(np.array(degrade.jpeg(images[i].numpy(), int(quality[i]))))
    return images


def apply(x: torch.Tensor, plan: Plan) -> torch.Tensor:
    """Flip, crop (resized back), blur and add noise to a float NCHW batch in [0, 1], per ``plan``
    (this batch's rows, on any device)."""
    device, n = x.device, len(x)
    flip = plan["flip"].to(device, non_blocking=True)
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    crop = plan["crop"].to(device, dtype=x.dtype, non_blocking=True)
    if bool((crop[:, :2] < 1).any()):
        # An affine grid per sample: scale to the crop's size, shift its centre within the slack.
        w, h, cx, cy = crop.unbind(1)
        theta = torch.zeros(n, 2, 3, device=device, dtype=x.dtype)
        theta[:, 0, 0], theta[:, 1, 1] = w, h
        theta[:, 0, 2], theta[:, 1, 2] = (1 - w) * (2 * cx - 1), (1 - h) * (2 * cy - 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    blurred = plan["blur"].nonzero().flatten()
    if len(blurred):  # only the chosen samples: the convolution is the costly part
        x = x.clone()
        rows = blurred.to(device)
        x[rows] = _gaussian_blur(x[rows], plan["blur"][blurred].to(device, dtype=x.dtype))
    noise = plan["noise"].to(device, dtype=x.dtype, non_blocking=True) / 255.0
    if bool((noise > 0).any()):
        # One device generator per batch, seeded from the plan: the same noise on every run.
        g = torch.Generator(device).manual_seed(int(plan["seed"][0]))
        x = x + noise[:, None, None, None] * torch.randn(x.shape, generator=g, device=device, dtype=x.dtype)
        x = x.clamp(0, 1)
    return x


def mix(x: torch.Tensor, y: torch.Tensor, share: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp: each image of the float batch ``x`` keeps ``share`` of itself (1: unmixed) and takes
    the rest from the one before it (a roll, as torchvision pairs them); the labels ``y`` blend
    alike into soft (real, fake) targets. ``share`` None: ``x`` and ``y`` as they are."""
    if share is None:
        return x, y
    own = share.to(x.device, dtype=x.dtype, non_blocking=True)
    x = x.roll(1, 0).lerp(x, own[:, None, None, None])
    onehot = F.one_hot(y, 2).to(x.dtype)
    return x, onehot.roll(1, 0).lerp(onehot, own[:, None])


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a sigma (> 0) per sample: one grouped convolution per direction."""
    n, c = x.shape[:2]
    radius = max(1, math.ceil(3 * float(sigma.max())))
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-offsets[None] ** 2 / (2 * sigma[:, None] ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (n * c, k)
    flat = F.pad(x.reshape(1, n * c, *x.shape[2:]), (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=n * c)
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=n * c)
    return flat.reshape(x.shape)
