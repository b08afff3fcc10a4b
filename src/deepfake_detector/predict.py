"""Score images with a trained model, prepared exactly as the training data was.

Decoding and resizing are :func:`preprocess.decode_image` and :func:`preprocess.fit_image`, the
code that built the training arrays (no blur or noise, as for valid and test). Photos that are
not tight face crops like the training data can have their largest face cropped first. The
:class:`~deepfake_detector.detector.Detector` applies this with its model's settings.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from deepfake_detector.preprocess import IMAGE_SUFFIXES, decode_image, fit_image

MAX_BYTES = 20 * 2**20  # uploads larger than this are refused before decoding
MAX_PIXELS = 40_000_000  # and images with more pixels than this (decompression bombs) too
SEARCH_SIDE = 640  # the face search runs on a copy at most this large

# What the face search found, reported with every score (predict's CSV, the served rows, the app):
# only "cropped", "fills image" and "crop-sized" say the model saw a face the way it was trained to.
FACE_CROPPED = "cropped"  # a face found in a larger picture; the crop (face_box) was scored
FACE_FILLS = "fills image"  # a face found that fills the picture: scored whole
FACE_CROP_SIZED = "crop-sized"  # square and at most twice the input size, like the training crops: scored whole, no search
FACE_NOT_FOUND = "not found"  # no face found: the whole picture was scored, and the answer means little
FACE_OFF = "off"  # the search was turned off (--no-face-crop): scored whole
TIGHT_SHARE = 0.35  # a face covering this share of the picture is a tight crop already

# The per-image CSV of `deepfake predict` and `deepfake evaluate` alike: `actual` is the label of a
# labelled set (empty for predict), `predicted` the label at the threshold, `unfamiliarity` and
# `familiar` the familiarity head's verdict (false: unlike the faces the model was trained on; both
# empty for a model without the head), `error` why a file was not scored (then `p_fake`,
# `predicted`, `unfamiliarity` and `familiar` are empty).
PREDICTION_COLUMNS = ("path", "source", "actual", "p_fake", "predicted", "unfamiliarity", "familiar", "face",
                      "face_box", "error")


@dataclass(frozen=True)
class Prepared:
    """An image ready for the model, with what was done to get there."""

    array: np.ndarray  # uint8 (S, S, 3), the model input
    face_box: tuple[int, int, int, int] | None  # (left, top, right, bottom) of the crop, if cropped
    shown: Image.Image  # what the model sees, at source resolution (the crop, or the whole image)
    face: str  # what the face search found (FACE_*)


def prepare(data: bytes, size: int, crop_faces: bool = True, max_bytes: int = MAX_BYTES,
            max_pixels: int = MAX_PIXELS, min_source_size: int = 1, fit: str = "resize") -> Prepared:
    """Check, decode, optionally face-crop and fit (``fit_image``'s ``how``) an uploaded file;
    ValueError with the reason.

    An image smaller than ``min_source_size`` on either side is refused, as preprocess quarantines it.
    """
    if len(data) > max_bytes:
        raise ValueError(f"file too large: {len(data) / 2**20:.1f} MB > {max_bytes / 2**20:.0f} MB")
    image, _ = decode_image(io.BytesIO(data), max_pixels)
    if min(image.size) < min_source_size:
        raise ValueError(f"too small: {image.size[0]}x{image.size[1]} < {min_source_size}")
    box, face = None, FACE_OFF
    if crop_faces:
        face, box = (FACE_CROP_SIZED, None) if face_crop(image, size) else find_face(image)
    shown = image.crop(box) if box else image
    return Prepared(fit_image(shown, size, 1, fit), box, shown, face)


def face_crop(image: Image.Image, size: int) -> bool:
    """Whether ``image`` is already a face crop like the training data (square, at most twice the
    model's input size): the face search is skipped for it, as the evaluate stage scores such images whole."""
    return image.size[0] == image.size[1] <= 2 * size


_local = threading.local()  # one face cascade per thread
_first_import = threading.Lock()


def _cascade():
    """The Haar face cascade, loaded once per thread (loading costs ~10 ms; a classifier is not shared)."""
    if not hasattr(_local, "cascade"):
        # OpenCV's package replaces itself while it is first imported: two threads at once can see it half made.
        with _first_import:
            import cv2  # optional at import time: only cropping needs it

            _local.cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    return _local.cascade


def find_face(image: Image.Image, min_share: float = 0.05, tight_share: float = TIGHT_SHARE,
              search_side: int = SEARCH_SIDE) -> tuple[str, tuple[int, int, int, int] | None]:
    """What the face search (OpenCV's Haar cascade) makes of ``image``: FACE_CROPPED with the box to
    crop, around the largest face and widened like an FFHQ crop; FACE_FILLS when that face already
    covers ``tight_share`` of the picture (a tight crop, like the training data, is left as it is);
    or FACE_NOT_FOUND.

    The search runs on a grey copy at most ``search_side`` pixels on its longer side (faces a
    twentieth of the picture's area are still ~140 px there).
    """
    scale = min(1.0, search_side / max(image.size))
    grey = image.convert("L")
    if scale < 1:
        grey = grey.resize((round(image.size[0] * scale), round(image.size[1] * scale)), Image.Resampling.BILINEAR)
    side = min(grey.size)
    faces = _cascade().detectMultiScale(np.asarray(grey), scaleFactor=1.1, minNeighbors=5,
                                        minSize=(int(side * min_share ** 0.5),) * 2)
    if len(faces) == 0:
        return FACE_NOT_FOUND, None
    x, y, w, h = (v / scale for v in max(faces, key=lambda f: f[2] * f[3]))
    if w * h >= tight_share * image.size[0] * image.size[1]:
        return FACE_FILLS, None
    # FFHQ crops show the whole head with some margin: about 2x the detector's box, centred a bit higher.
    half = int(max(w, h) * 1.0)
    cx, cy = x + w // 2, y + h // 2 - int(0.1 * h)
    left, top = max(0, cx - half), max(0, cy - half)
    right, bottom = min(image.size[0], cx + half), min(image.size[1], cy + half)
    return FACE_CROPPED, (int(left), int(top), int(right), int(bottom))


def largest_face(image: Image.Image, min_share: float = 0.05, tight_share: float = TIGHT_SHARE) -> tuple | None:
    """The box :func:`find_face` crops to, or None when it crops nothing."""
    return find_face(image, min_share, tight_share)[1]


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


def skipped_files(folder: Path) -> list[Path]:
    """The files under ``folder`` that a scan leaves out (recursively, sorted): their type is not an
    image type read here (:data:`IMAGE_SUFFIXES`; a phone's ``.heic``, say). Hidden files and folders
    (``.DS_Store``, ``.thumbnails/``) are not counted."""
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() not in IMAGE_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def box_text(box: tuple[int, int, int, int] | None) -> str:
    """A face box as the CSV writes it: ``left top right bottom``, empty when nothing was cropped."""
    return " ".join(map(str, box)) if box else ""
