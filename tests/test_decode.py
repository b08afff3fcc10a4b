"""Decoding: only the allowed formats are opened, and every source mode becomes the right 8-bit RGB."""

from __future__ import annotations

import csv
import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, make_dataset
from deepfake_detector import heads, preprocess
from deepfake_detector.detector import Decision, Detector
from deepfake_detector.model import save_checkpoint
from deepfake_detector.params import ModelParams, PreprocessParams
from deepfake_detector.preprocess import IMAGE_FORMATS, IMAGE_SUFFIXES, decode_image

REFUSED = "unsupported format: {} (allowed: JPEG, PNG, WEBP, BMP, GIF, TIFF)"
COLOURS = [(255, 0, 0), (0, 255, 0), (40, 90, 200), (255, 255, 255)]
# Options that make each format lossless where it can be; JPEG is compared with a tolerance.
SAVE_OPTIONS = {"JPEG": {"quality": 95}, "WEBP": {"lossless": True}}


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def decoded(data: bytes) -> np.ndarray:
    image, _ = decode_image(io.BytesIO(data))
    return np.asarray(image)


def quadrants(colours, mode: str = "RGB", size: int = 32) -> Image.Image:
    """Four flat quadrants: top-left, top-right, bottom-left, bottom-right."""
    image, half = Image.new(mode, (size, size)), size // 2
    for (x, y), colour in zip(((0, 0), (half, 0), (0, half), (half, half)), colours):
        image.paste(colour, (x, y, x + half, y + half))
    return image


def centres(array: np.ndarray) -> np.ndarray:
    """The colour at the centre of each quadrant, as ints."""
    q = array.shape[0] // 4
    return np.array([array[q, q], array[q, 3 * q], array[3 * q, q], array[3 * q, 3 * q]], dtype=int)


def to_8bit(x: np.ndarray) -> np.ndarray:
    """round(x * 255 / 65535) in exact integer arithmetic (the rule decoding promises)."""
    return ((x.astype(np.int64) * 510 + 65535) // 131070).astype(np.uint8)


GREY_16 = {"flat": np.full((64, 64), 40000, np.uint16),  # 40000/65535 -> 155.65 -> 156
           "gradient": np.arange(65536, dtype=np.uint16).reshape(256, 256)}  # every 16-bit value


@pytest.fixture(scope="module")
def untrained_model(tmp_path_factory) -> Path:
    """A folder with a small randomly initialised model.pt and its detector.json (no training needed:
    the tests compare scores, not their quality)."""
    import torch

    torch.manual_seed(0)
    model = heads.build(ModelParams(arch="cnn", pretrained="none", channels=(8, 16), convs_per_block=1, hidden=16), 32)
    folder = tmp_path_factory.mktemp("untrained-model")
    save_checkpoint(model, folder / "model.pt")
    Decision().write(folder / "detector.json")
    return folder


def test_suffixes_name_exactly_the_allowed_formats():
    assert {Image.registered_extensions()[suffix] for suffix in IMAGE_SUFFIXES} == set(IMAGE_FORMATS)


@pytest.mark.parametrize("fmt", ["EPS", "ICO", "PPM", "PCX", "QOI", "JPEG2000"])
def test_other_formats_are_refused_with_their_name(tmp_path, fmt):
    data = encode(quadrants(COLOURS), fmt)
    with pytest.raises(ValueError, match=f"^{re.escape(REFUSED.format(fmt))}$"):
        decoded(data)
    (tmp_path / "image.bin").write_bytes(data)  # a path gives the same answer as bytes
    with pytest.raises(ValueError, match=f"unsupported format: {fmt} "):
        decode_image(tmp_path / "image.bin")


def test_eps_never_reaches_its_plugin(monkeypatch):
    """EPS would be rendered by Ghostscript: the plugin must not even parse the header."""
    data = encode(quadrants(COLOURS), "EPS")
    Image.init()
    factory, accept = Image.OPEN["EPS"]
    opened = []
    monkeypatch.setitem(Image.OPEN, "EPS", (lambda *args: opened.append(args) or factory(*args), accept))
    with pytest.raises(ValueError, match="unsupported format: EPS "):
        decoded(data)
    assert opened == []
    Image.open(io.BytesIO(data)).close()  # an unrestricted open does reach it: the spy works
    assert len(opened) == 1


def test_unrecognised_bytes_are_not_an_image():
    for data in (b"just some text", b"ab", b"\0" * 100):
        with pytest.raises(ValueError, match="^not an image$"):
            decoded(data)


@pytest.mark.parametrize("fmt", list(IMAGE_FORMATS))
def test_every_allowed_format_decodes(tmp_path, fmt):
    source = quadrants(COLOURS)
    path = tmp_path / f"image{IMAGE_FORMATS[fmt][0]}"
    source.save(path, format=fmt, **SAVE_OPTIONS.get(fmt, {}))
    image, _ = decode_image(path)
    array = np.asarray(image)
    assert image.mode == "RGB" and array.shape == (32, 32, 3)
    if fmt == "JPEG":
        assert np.abs(centres(array) - COLOURS).max() <= 8
    else:
        assert np.array_equal(array, np.asarray(source))


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (32, 32), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    assert (decoded(data) == (255, 0, 0)).all()


@pytest.mark.parametrize("grey", list(GREY_16))
@pytest.mark.parametrize("fmt, mode", [("PNG", "I;16"), ("TIFF", "I;16B")])
def test_16bit_greyscale_is_scaled_not_clipped(fmt, mode, grey):
    values = GREY_16[grey]
    source = Image.frombytes(mode, values.shape[::-1], values.astype(">u2" if mode.endswith("B") else "<u2").tobytes())
    image, source_mode = decode_image(io.BytesIO(encode(source, fmt)))
    array = np.asarray(image)
    assert source_mode == mode
    assert all(np.array_equal(array[..., c], to_8bit(values)) for c in range(3))


@pytest.mark.parametrize("grey", list(GREY_16))
def test_16bit_png_scores_like_its_8bit_version(tmp_path, untrained_model, grey):
    """The issue's acceptance: through the real Detector, a 16-bit PNG and the 8-bit PNG made with the
    same rounding get the same P(fake)."""
    values = GREY_16[grey]
    Image.fromarray(values).save(tmp_path / "16bit.png")
    Image.fromarray(to_8bit(values)).save(tmp_path / "8bit.png")
    Image.fromarray(values.clip(0, 255).astype(np.uint8)).save(tmp_path / "clipped.png")  # Pillow's convert()
    assert Image.open(tmp_path / "16bit.png").mode == "I;16"
    detector = Detector.from_checkpoint(untrained_model)
    files = [tmp_path / "16bit.png", tmp_path / "8bit.png", tmp_path / "clipped.png"]
    p_fake, errors, kept = detector.score_files(files)
    assert errors == {} and kept == [0, 1, 2]
    assert abs(p_fake[0] - p_fake[1]) < 1e-4
    assert abs(p_fake[0] - p_fake[2]) > 1e-3  # the model does tell the clipped reading apart


def test_32bit_integer_tiff_is_read_as_16bit_range_and_clipped():
    values = np.array([[-5, 0, 257, 40000, 65535, 70000, 2**31 - 1]], np.int32)
    image, mode = decode_image(io.BytesIO(encode(Image.fromarray(values), "TIFF")))
    assert mode == "I"
    assert np.asarray(image)[0, :, 0].tolist() == [0, 0, 1, 156, 255, 255, 255]


def test_float_tiff_is_scaled_from_unit_range_and_refused_outside_it():
    values = np.array([[0.0, 0.25, 0.5, 1.0]], np.float32)
    image, mode = decode_image(io.BytesIO(encode(Image.fromarray(values), "TIFF")))
    assert mode == "F"
    assert np.asarray(image)[0, :, 0].tolist() == [0, 64, 128, 255]  # round(x * 255), ties to even
    with pytest.raises(ValueError, match=r"^float image outside \[0, 1\]: min -0.5, max 2$"):
        decoded(encode(Image.fromarray(np.array([[-0.5, 0.5, 2.0]], np.float32)), "TIFF"))
    with pytest.raises(ValueError, match=r"float image outside \[0, 1\]"):
        decoded(encode(Image.fromarray(np.array([[0.5, np.nan]], np.float32)), "TIFF"))


def test_cmyk_jpeg_becomes_rgb():
    cmyk = quadrants([(0, 0, 0, 0), (255, 0, 0, 0), (0, 255, 0, 0), (0, 0, 0, 255)], "CMYK")
    image, mode = decode_image(io.BytesIO(encode(cmyk, "JPEG", quality=95)))
    assert mode == "CMYK"
    expected = [(255, 255, 255), (0, 255, 255), (255, 0, 255), (0, 0, 0)]  # white, cyan, magenta, black
    assert np.abs(centres(np.asarray(image)) - expected).max() <= 8


def test_lab_tiff_becomes_the_srgb_colours_it_encodes():
    rgb = quadrants(COLOURS)
    data = encode(rgb.convert("LAB"), "TIFF")  # CIE L*a*b* (D50) computed by LittleCMS
    assert Image.open(io.BytesIO(data)).mode == "LAB"
    image, mode = decode_image(io.BytesIO(data))
    # 8-bit Lab quantisation costs saturated colours a few levels; read as RGB, red would be (138, 81, 70).
    assert mode == "LAB" and np.abs(np.asarray(image, dtype=int) - np.asarray(rgb)).max() <= 16


def test_grey_alpha_tiff_is_flattened_onto_black_premultiplied_or_not():
    grey = Image.new("LA", (2, 1))
    grey.putpixel((0, 0), (200, 128))
    grey.putpixel((1, 0), (200, 255))
    data = encode(grey, "TIFF")
    assert decoded(data)[0, :, 0].tolist() == [100, 200]  # 200 at half opacity over black
    # The same pixels stored premultiplied (TIFF ExtraSamples 1, "associated alpha"): grey 100 at alpha 128.
    grey.putpixel((0, 0), (100, 128))
    extra_samples = b"\x52\x01\x03\x00\x01\x00\x00\x00\x02\x00"  # tag 338, SHORT, 1 value: 2 (unassociated)
    data = encode(grey, "TIFF")
    assert data.count(extra_samples) == 1
    premultiplied = data.replace(extra_samples, extra_samples[:-2] + b"\x01\x00")
    image, mode = decode_image(io.BytesIO(premultiplied))
    assert mode == "La" and np.asarray(image)[0, :, 0].tolist() == [100, 200]


def test_16bit_rgb_png_keeps_pillows_high_byte():
    """Pillow has no 16-bit colour mode: it reads the high byte, at most one level below round(x * 255 / 65535)
    and exact for 16-bit files made from 8-bit ones (x = 257 v). This documents it; a change shows here."""
    cv2 = pytest.importorskip("cv2")
    values = np.stack([np.arange(0, 65536, 16, dtype=np.uint16).reshape(64, 64)] * 3, axis=-1)
    values[..., 1] = 257 * (values[..., 1] >> 8)  # green: 8-bit values widened to 16 bits
    ok, png = cv2.imencode(".png", values[..., ::-1])  # OpenCV writes BGR
    assert ok and Image.open(io.BytesIO(png.tobytes())).mode == "RGB"
    array = decoded(png.tobytes())
    assert np.array_equal(array, (values >> 8).astype(np.uint8))
    assert np.abs(array.astype(int) - to_8bit(values)).max() == 1
    assert np.array_equal(array[..., 1], to_8bit(values[..., 1]))


@pytest.mark.slow
def test_preprocess_quarantines_refused_files_counted_by_kind(tmp_path):
    root = tmp_path / "dataset"
    folder = make_dataset(root, per_class=1) / "train" / "real"
    quadrants(COLOURS).save(folder / "drawing.eps", format="EPS")
    Image.fromarray(np.full((32, 32), 3.0, np.float32)).save(folder / "float.tif")
    Image.fromarray(GREY_16["flat"]).save(folder / "grey16.png")
    params = PreprocessParams(image_size=32, min_source_size=16)
    meta = preprocess.run(root, tmp_path / "out", params, seed=0, workers=1, progress=False)
    train = meta["splits"]["train"]
    assert train["quarantine_reasons"] == {"unsupported format": 1, "float image outside [0, 1]": 1}
    assert train["source_modes"] == {"RGB": 2, "I;16": 1}
    with (tmp_path / "out" / "quarantine.csv").open() as f:
        reasons = {Path(r["path"]).name: r["reason"] for r in csv.DictReader(f)}
    assert reasons == {"drawing.eps": REFUSED.format("EPS"), "float.tif": "float image outside [0, 1]: min 3, max 3"}


@pytest.mark.slow
def test_predict_cli_refuses_eps_in_one_line_and_skips_it_in_folders(tmp_path, untrained_model):
    folder = tmp_path / "photos"
    folder.mkdir()
    face = quadrants(COLOURS)
    for name, fmt in [("a.JPG", "JPEG"), ("b.jpeg", "JPEG"), ("c.png", "PNG"), ("d.webp", "WEBP"), ("e.bmp", "BMP"),
                      ("f.gif", "GIF"), ("g.tif", "TIFF"), ("h.TIFF", "TIFF"), ("skipped.eps", "EPS")]:
        face.save(folder / name, format=fmt)
    (folder / "notes.txt").write_text("not an image suffix")
    face.save(tmp_path / "named.eps", format="EPS")  # named on the command line: refused, with the reason
    out = tmp_path / "preds.csv"
    result = subprocess.run([sys.executable, "-m", "deepfake_detector.cli", "predict", str(folder),
                             str(tmp_path / "named.eps"), "--model", str(untrained_model), "--out", str(out),
                             "--params", str(ROOT / "params.yaml")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "9 images" in result.stdout and "1 unreadable" in result.stdout and "2 skipped" in result.stdout
    rows = {Path(r["path"]).name: r for r in csv.DictReader(out.open())}
    assert set(rows) == {"a.JPG", "b.jpeg", "c.png", "d.webp", "e.bmp", "f.gif", "g.tif", "h.TIFF", "named.eps",
                         "skipped.eps", "notes.txt"}
    assert rows["named.eps"]["error"] == REFUSED.format("EPS") and rows["named.eps"]["p_fake"] == ""
    # Left out of the folder scan, but counted and named: never silently.
    assert rows["skipped.eps"]["error"] == "skipped: .eps is not an image type read here"
    assert rows["notes.txt"]["error"] == "skipped: .txt is not an image type read here"
    assert all(0 <= float(r["p_fake"]) <= 1 for name, r in rows.items() if not r["error"])


def test_app_uploader_accepts_exactly_the_allowed_suffixes(monkeypatch, tmp_path, untrained_model):
    streamlit_testing = pytest.importorskip("streamlit.testing.v1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("DEEPFAKE_MODEL_PATH", str(untrained_model))
    monkeypatch.setenv("DEEPFAKE_SAMPLES", str(tmp_path / "no-samples"))
    at = streamlit_testing.AppTest.from_file(str(ROOT / "app" / "streamlit_app.py"), default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    assert set(at.file_uploader[0].allowed_type) == IMAGE_SUFFIXES
