"""Validate, resize and degrade raw faces into uint8 arrays that training memory-maps.

Output per split: ``images.npy`` (N x S x S x 3, uint8) and ``index.csv`` (source path, label,
applied blur and noise). Images are decoded once here, never again per epoch; the ``.npy`` is
written image by image with its header fixed up at the end, so memory stays flat however many
images there are. Files that do not decode, or are too small, go to ``quarantine.csv`` with the
reason and are counted in ``report.json``; they never stop the run. The output folder is built
beside itself and renamed into place when complete: a crash leaves the previous outputs intact.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import multiprocessing
import os
import struct
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import yaml
from PIL import Image, ImageOps
from tqdm import tqdm

from deepfake_detector.atomic import replacing_dir
from deepfake_detector.data import CLASSES, INFO_FILE, SPLITS, DataError
from deepfake_detector.degrade import blur, noise
from deepfake_detector.params import PreprocessParams, to_dict
from deepfake_detector.sources import (
    DEFAULT_NAME,
    SOURCES_FILE,
    TWINS_SOURCE,
    Entry,
    check_classes,
    count_classes,
    list_images,
    source_name,
    twins_info,
)

NPY_HEADER_BYTES = 128  # room for any (N, S, S, 3) shape; the header is padded to this size
OUTPUTS = ("meta.json", "quarantine.csv", *SPLITS)  # all a run writes into its output folder
# The only formats decoded (Pillow's names), with their file suffixes. Any other format never reaches
# its Pillow plugin: EPS would run Ghostscript, and rarely used decoders are attack surface for nothing.
IMAGE_FORMATS: dict[str, tuple[str, ...]] = {
    "JPEG": (".jpg", ".jpeg"), "PNG": (".png",), "WEBP": (".webp",), "BMP": (".bmp",), "GIF": (".gif",),
    "TIFF": (".tif", ".tiff"),
}
IMAGE_SUFFIXES = frozenset(suffix for suffixes in IMAGE_FORMATS.values() for suffix in suffixes)


@dataclass(frozen=True)
class Job:
    path: Path
    rel: str  # path relative to the source's data root
    label: int
    augment: bool
    source: str  # the name of the source (data.source) it came from
    key: str  # its stable identity, which seeds its degradation: ``rel``, with the source's name if several


def degrade(image: np.ndarray, params: PreprocessParams, seed: int, key: str) -> tuple[np.ndarray, float, float]:
    """Apply the seeded Gaussian blur and additive noise to an RGB uint8 array.

    The random draws depend only on ``seed`` and ``key`` (the image's relative path), so the
    result is the same in any order, process or rerun. Returns the image and the blur and noise
    sigmas applied (0 when not applied).
    """
    digest = hashlib.sha256(key.encode()).digest()
    rng = np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])
    do_blur, blur_sigma = rng.random() < params.blur.prob, rng.uniform(*params.blur.sigma)
    do_noise, noise_sigma = rng.random() < params.noise.prob, rng.uniform(*params.noise.sigma)
    blur_sigma = float(blur_sigma) if do_blur else 0.0
    noise_sigma = float(noise_sigma) if do_noise else 0.0
    if blur_sigma > 0:
        image = blur(image, blur_sigma)
    if noise_sigma > 0:
        image = noise(image, noise_sigma, rng)
    return image, blur_sigma, noise_sigma


def decode_image(source: Path | BinaryIO, max_pixels: int | None = None) -> tuple[Image.Image, str]:
    """Decode a file path or binary file object to an 8-bit RGB image; returns it and the source mode.

    Only :data:`IMAGE_FORMATS` are opened; animated files give their first frame. 16- and 32-bit
    integer greyscale is scaled from 0..65535 and float greyscale from [0, 1] (refused outside it),
    CMYK and LAB are converted (LAB through LittleCMS), transparency is flattened onto black.
    Raises ``ValueError`` with a short reason for anything that is not a usable image, including
    images over ``max_pixels`` (checked from the header, before decoding) or PIL's own limit.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source, formats=list(IMAGE_FORMATS)) as img:
                if max_pixels and img.size[0] * img.size[1] > max_pixels:
                    raise Image.DecompressionBombError(f"{img.size[0]}x{img.size[1]} pixels")
                img.load()  # a truncated or corrupt file fails here, not later
                mode = img.mode
                img = _to_8bit(ImageOps.exif_transpose(img))
                if img.mode == "La":  # premultiplied alpha (TIFF): the grey is already flattened onto black
                    img = img.getchannel("L")
                elif img.has_transparency_data:
                    # Flatten transparency onto black rather than letting convert() keep garbage pixels.
                    rgba = img.convert("RGBA")
                    img = Image.new("RGB", rgba.size)
                    img.paste(rgba, mask=rgba.getchannel("A"))
                return img.convert("RGB"), mode
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError("image too large (decompression bomb guard)") from None
    except Image.UnidentifiedImageError:
        raise ValueError(_unidentified_reason(source)) from None
    except (OSError, SyntaxError) as exc:  # PIL raises SyntaxError for some broken headers
        raise ValueError(f"corrupt image: {exc}") from None


def _to_8bit(img: Image.Image) -> Image.Image:
    """Integer greyscale (I;16*, I) as "L" scaled from 0..65535 (clipped), float greyscale (F) as "L"
    scaled from [0, 1] (ValueError outside it, NaN included); other modes unchanged.

    Pillow's own convert() would clip these to 0..255 instead of scaling them.
    """
    if img.mode == "F":
        x = np.asarray(img)
        if not np.all((x >= 0) & (x <= 1)):
            raise ValueError(f"float image outside [0, 1]: min {x.min():g}, max {x.max():g}")
        scaled = x * 255
    elif img.mode == "I" or img.mode.startswith("I;16"):
        # float32 is exact enough: x * 255 / 65535 is never within 0.002 of a half.
        scaled = np.asarray(img).clip(0, 65535).astype(np.float32) * np.float32(255 / 65535)
    else:
        return img
    return Image.fromarray(np.rint(scaled).astype(np.uint8))


def _unidentified_reason(source: Path | BinaryIO) -> str:
    """Why Pillow did not open ``source``: empty, a format outside :data:`IMAGE_FORMATS` (named by
    Pillow's signature checks, which read 16 bytes and run no decoder), or not an image at all."""
    if isinstance(source, (str, Path)):
        with open(source, "rb") as f:
            head = f.read(16)
    else:
        source.seek(0)
        head = source.read(16)
    if not head:
        return "empty file"
    Image.init()  # every plugin's signature check; decode_image still opens IMAGE_FORMATS only
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        with contextlib.suppress(struct.error):  # DIB's check fails on files under 4 bytes
            if accept and accept(head):
                if name in IMAGE_FORMATS:  # its own plugin already rejected the header
                    return "not an image"
                # "kind: detail", like the other reasons: the report counts them by kind.
                return f"unsupported format: {name} (allowed: {', '.join(IMAGE_FORMATS)})"
    return "not an image"


def fit_image(img: Image.Image, size: int, min_source_size: int, how: str = "resize") -> np.ndarray:
    """``size`` x ``size`` uint8 HWC, the model's input: ``resize`` takes the centre square resized
    (bicubic); ``crop`` the centre ``size`` square at the image's own pixels (resized only if smaller)."""
    if min(img.size) < min_source_size:
        raise ValueError(f"too small: {img.size[0]}x{img.size[1]} < {min_source_size}")
    if how == "crop" and min(img.size) >= size:
        left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
        img = img.crop((left, top, left + size, top + size))
    elif img.size != (size, size):
        img = ImageOps.fit(img, (size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def load_image(path: Path, size: int, min_source_size: int, how: str = "resize") -> tuple[np.ndarray, str]:
    """Decode and fit ``path``; returns the uint8 array and the source mode (ValueError if unusable)."""
    img, mode = decode_image(path)
    return fit_image(img, size, min_source_size, how), mode


def _process(args: tuple[Job, PreprocessParams, int]) -> tuple[Job, np.ndarray | None, str, float, float]:
    job, params, seed = args
    try:
        image, mode = load_image(job.path, params.image_size, params.min_source_size, params.fit)
    except ValueError as exc:
        return job, None, str(exc), 0.0, 0.0
    blur = noise = 0.0
    if job.augment:
        image, blur, noise = degrade(image, params, seed, job.key)
    return job, image, mode, blur, noise


def run(raw_dir: Path, out_dir: Path, params: PreprocessParams, seed: int, workers: int | None = None,
        progress: bool = True, twins_dir: Path | None = None) -> dict:
    """Preprocess every split of the source(s) downloaded into ``raw_dir`` into ``out_dir``, and the
    twins stage's output ``twins_dir`` as the fake source ``twins`` when it made twins (a ``data.source``
    entry of that name is then an error); returns the report.

    Every image keeps its source's name (``index.csv``'s ``source`` column). A split that lacks real
    or fake images across all sources is an error naming it. Everything is written into
    ``<out_dir>.tmp-<pid>`` first, which replaces ``out_dir`` once complete.
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    roots = raw_sources(raw_dir)
    twins = twins_info(twins_dir)
    if twins:
        if TWINS_SOURCE in roots:
            raise DataError(f"data.source has a source named {TWINS_SOURCE!r}, the name of the twins stage's "
                            "source: name it otherwise")
        roots[TWINS_SOURCE] = Path(twins_dir)
    entries = {name: list_images(root, params.split_ratios) for name, root in roots.items()}
    jobs = {split: [] for split in SPLITS}
    for name, listed in entries.items():
        kept: Counter = Counter()
        for e in listed:  # sorted by split, label and path: the first N of each split and class
            kept[e.split, e.label] += 1
            if not params.limit_per_class or kept[e.split, e.label] <= params.limit_per_class:
                key = e.rel if len(roots) == 1 else f"{name}/{e.rel}"
                jobs[e.split].append(Job(e.path, e.rel, e.label, e.split in params.splits, name, key))
    check_classes(count_classes(Entry(j.path, j.rel, j.label, split) for split in SPLITS for j in jobs[split]),
                  roots)
    workers = workers or os.cpu_count() or 1
    report: dict = {"image_size": params.image_size, "sources": list(roots), "splits": {}, "quarantined": 0}
    with replacing_dir(out_dir, OUTPUTS) as staging:
        with (staging / "quarantine.csv").open("w", newline="") as qf, \
                multiprocessing.get_context("spawn").Pool(workers) as pool:
            quarantine = csv.writer(qf)
            quarantine.writerow(["path", "reason"])
            for split in SPLITS:
                results = pool.imap(_process, ((j, params, seed) for j in jobs[split]), chunksize=32)
                bar = tqdm(results, total=len(jobs[split]), desc=f"preprocess {split}", disable=not progress,
                           unit="img")
                stats = _write_split(bar, staging / split, params.image_size, quarantine)
                report["splits"][split] = stats
                report["quarantined"] += stats["quarantined"]
        meta = {"params": to_dict(params), "seed": seed, "classes": list(CLASSES),
                "download": _download_info(raw_dir), **({"twins": twins} if twins else {}), **report}
        (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def raw_sources(raw_dir: Path) -> dict[str, Path]:
    """The named source folders of a download: ``raw_dir/<name>`` per entry of its ``sources.json``,
    else ``raw_dir`` itself, named after the source it was downloaded from."""
    listing = raw_dir / SOURCES_FILE
    if listing.exists():
        return {name: raw_dir / name for name in json.loads(listing.read_text())}
    info = raw_dir / INFO_FILE
    location = json.loads(info.read_text()).get("source", "") if info.exists() else ""
    return {source_name(location, strict=False) if location else DEFAULT_NAME: raw_dir}


def _download_info(raw_dir: Path) -> dict | None:
    """What the download stage recorded: one source's ``download.json``, or several in ``sources.json``."""
    for name in (INFO_FILE, SOURCES_FILE):
        if (raw_dir / name).exists():
            info = json.loads((raw_dir / name).read_text())
            if name == SOURCES_FILE:  # "source" as data.source writes several: a mapping's YAML text
                info = {"source": yaml.safe_dump({n: i["source"] for n, i in info.items()}, default_flow_style=True,
                                                 sort_keys=False, width=1 << 16).strip(), "sources": info}
            return info
    return None


def _write_split(results, split_dir: Path, size: int, quarantine) -> dict:
    split_dir.mkdir(parents=True, exist_ok=True)
    counts: Counter = Counter()
    per_source: dict[str, Counter] = defaultdict(Counter)
    modes: Counter = Counter()
    reasons: Counter = Counter()
    n = 0
    with (split_dir / "images.npy").open("wb") as images, (split_dir / "index.csv").open("w", newline="") as f:
        index = csv.writer(f)
        index.writerow(["path", "label", "source", "blur_sigma", "noise_sigma"])
        images.write(b"\0" * NPY_HEADER_BYTES)
        for job, image, mode_or_reason, blur, noise in results:
            if image is None:
                quarantine.writerow([job.key, mode_or_reason])
                reasons[mode_or_reason.split(":")[0]] += 1
                continue
            images.write(image.tobytes())
            index.writerow([job.key, job.label, job.source, f"{blur:.4f}", f"{noise:.4f}"])
            counts[CLASSES[job.label]] += 1
            per_source[job.source][CLASSES[job.label]] += 1
            modes[mode_or_reason] += 1
            n += 1
        images.seek(0)
        images.write(npy_header((n, size, size, 3)))
    return {"images": n, **{c: counts[c] for c in CLASSES}, "quarantined": sum(reasons.values()),
            "quarantine_reasons": dict(reasons), "source_modes": dict(modes),
            "sources": {name: {c: n[c] for c in CLASSES} for name, n in sorted(per_source.items())}}


def npy_header(shape: tuple[int, ...]) -> bytes:
    """A ``.npy`` v1.0 header for a C-ordered uint8 array, padded to :data:`NPY_HEADER_BYTES`."""
    text = repr({"descr": "|u1", "fortran_order": False, "shape": shape})
    pad = NPY_HEADER_BYTES - 10 - len(text) - 1
    if pad < 0:
        raise ValueError(f"shape {shape} does not fit a {NPY_HEADER_BYTES}-byte header")
    body = (text + " " * pad + "\n").encode("latin1")
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body


def load_split(processed_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Memory-mapped images (N, S, S, 3) and labels (N,) of one preprocessed split."""
    split_dir = Path(processed_dir) / split
    images = np.load(split_dir / "images.npy", mmap_mode="r")
    with (split_dir / "index.csv").open() as f:
        labels = np.array([int(row["label"]) for row in csv.DictReader(f)], dtype=np.int64)
    if len(labels) != len(images):
        raise ValueError(f"{split_dir}: {len(images)} images but {len(labels)} labels")
    return images, labels


def read_index(processed: Path, split: str) -> tuple[list[str], list[dict[str, str]]]:
    """The columns and rows of a preprocessed split's ``index.csv``; a row without a source (a folder
    preprocessed before sources were named) gets the one source ``meta.json`` names."""
    meta = json.loads((Path(processed) / "meta.json").read_text())
    fallback = next(iter(meta.get("sources") or [DEFAULT_NAME]))
    with (Path(processed) / split / "index.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        columns = list(reader.fieldnames or [])
    for row in rows:
        row["source"] = row.get("source") or fallback
    if "source" not in columns:
        columns.append("source")
    return columns, rows
