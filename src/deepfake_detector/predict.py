"""Score images with a trained model, prepared exactly as the training data was.

Decoding and resizing are :func:`preprocess.decode_image` and :func:`preprocess.fit_image`, the
code that built the training arrays (no blur or noise, as for valid and test). Photos that are
not tight face crops like the training data can have their largest face cropped first, and
:func:`grad_cam` shows which regions drove a decision.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from deepfake_detector.evaluate import predict_proba
from deepfake_detector.model import DeepfakeCNN, to_input
from deepfake_detector.preprocess import decode_image, fit_image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
MAX_BYTES = 20 * 2**20  # uploads larger than this are refused before decoding
MAX_PIXELS = 40_000_000  # and images with more pixels than this (decompression bombs) too


@dataclass(frozen=True)
class Prepared:
    """An image ready for the model, with what was done to get there."""

    array: np.ndarray  # uint8 (S, S, 3), the model input
    face_box: tuple[int, int, int, int] | None  # (left, top, right, bottom) of the crop, if cropped
    shown: Image.Image  # what the model sees, at source resolution (the crop, or the whole image)


def prepare(data: bytes, size: int, crop_faces: bool = True, max_bytes: int = MAX_BYTES,
            max_pixels: int = MAX_PIXELS) -> Prepared:
    """Check, decode, optionally face-crop and resize an uploaded file; ValueError with the reason."""
    if len(data) > max_bytes:
        raise ValueError(f"file too large: {len(data) / 2**20:.1f} MB > {max_bytes / 2**20:.0f} MB")
    image, _ = decode_image(io.BytesIO(data), max_pixels)
    box = largest_face(image) if crop_faces else None
    shown = image.crop(box) if box else image
    return Prepared(fit_image(shown, size, min_source_size=1), box, shown)


def largest_face(image: Image.Image, min_share: float = 0.05, tight_share: float = 0.35) -> tuple | None:
    """Box around the largest face (OpenCV's Haar cascade), widened like an FFHQ crop.

    None when no face is found, or when the face already fills ``tight_share`` of the picture (a
    tight crop, like the training data, is left as it is).
    """
    import cv2  # optional at import time: only cropping needs it

    grey = np.asarray(image.convert("L"))
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    side = min(image.size)
    faces = cascade.detectMultiScale(grey, scaleFactor=1.1, minNeighbors=5,
                                     minSize=(int(side * min_share ** 0.5),) * 2)
    if len(faces) == 0:
        return None
    x, y, w, h = max(faces, key=lambda f: f[2] * f[3])
    if w * h >= tight_share * image.size[0] * image.size[1]:
        return None
    # FFHQ crops show the whole head with some margin: about 2x the detector's box, centred a bit higher.
    half = int(max(w, h) * 1.0)
    cx, cy = x + w // 2, y + h // 2 - int(0.1 * h)
    left, top = max(0, cx - half), max(0, cy - half)
    right, bottom = min(image.size[0], cx + half), min(image.size[1], cy + half)
    return (int(left), int(top), int(right), int(bottom))


def grad_cam(model: DeepfakeCNN, array: np.ndarray) -> np.ndarray:
    """Grad-CAM of P(fake) on the last conv block: an (S, S) map in [0, 1], high where it drove 'fake'."""
    model.eval()
    layer = [m for m in model.features if isinstance(m, torch.nn.Conv2d)][-1]
    store: dict[str, torch.Tensor] = {}
    handles = [layer.register_forward_hook(lambda _m, _i, out: store.__setitem__("act", out)),
               layer.register_full_backward_hook(lambda _m, _gi, go: store.__setitem__("grad", go[0]))]
    try:
        x = to_input(torch.from_numpy(array[None].copy()))
        with torch.enable_grad():
            logits = model(x.requires_grad_(True))
            model.zero_grad()
            logits[0, 1].backward()
    finally:
        for handle in handles:
            handle.remove()
    weights = store["grad"].mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * store["act"]).sum(dim=1))[0].detach()
    cam = torch.nn.functional.interpolate(cam[None, None], size=array.shape[:2], mode="bilinear",
                                          align_corners=False)[0, 0].numpy()
    return cam / cam.max() if cam.max() > 0 else cam


def overlay(array: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """The heatmap in red-yellow over the image."""
    colour = np.stack([np.ones_like(heat), heat, np.zeros_like(heat)], axis=-1) * 255
    mixed = (1 - alpha * heat[..., None]) * array + alpha * heat[..., None] * colour
    return Image.fromarray(np.clip(mixed, 0, 255).astype(np.uint8))


def iter_images(paths: list[Path]) -> Iterator[Path]:
    """The files named, and the image files under any folder named (recursively, sorted)."""
    for path in map(Path, paths):
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            yield path


def predict_files(model: torch.nn.Module, paths: list[Path], image_size: int, batch_size: int = 64,
                  device: torch.device | None = None,
                  crop_faces: bool = False) -> tuple[np.ndarray, dict[Path, str], list[int]]:
    """P(fake) for each readable file, the reason for each file skipped, and the readable indices."""
    device = device or torch.device("cpu")
    images, errors, kept = [], {}, []
    for i, path in enumerate(paths):
        try:
            images.append(prepare(Path(path).read_bytes(), image_size, crop_faces).array)
            kept.append(i)
        except (ValueError, OSError) as exc:
            errors[Path(path)] = str(exc)
    batch = np.stack(images) if images else np.zeros((0, image_size, image_size, 3), np.uint8)
    return predict_proba(model.to(device), batch, batch_size, device), errors, kept
