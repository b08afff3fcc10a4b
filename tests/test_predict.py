"""Prediction outside the pipeline: limits on input, face cropping, Grad-CAM, the batch CLI, and
`mlflow models serve` answering a real POST with the in-process probability."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import FACES_MINI, ROOT, free_port, synthetic_face, wait_http
from deepfake_detector.model import load_checkpoint
from deepfake_detector.params import MlflowParams
from deepfake_detector.predict import grad_cam, largest_face, prepare, predict_files

needs_faces = pytest.mark.skipif(not (FACES_MINI / "real-vs-fake").is_dir(), reason="faces-mini not available")


@pytest.fixture
def model_dir(synthetic_model):
    return synthetic_model


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_oversized_files_and_decompression_bombs_are_refused():
    data = png_bytes(Image.new("RGB", (1500, 1500)))
    with pytest.raises(ValueError, match="file too large"):
        prepare(data, 32, max_bytes=1000)
    with pytest.raises(ValueError, match="decompression bomb"):
        prepare(data, 32, max_pixels=1_000_000)
    assert prepare(data, 32, crop_faces=False).array.shape == (32, 32, 3)
    assert Image.MAX_IMAGE_PIXELS == 89478485  # PIL's own limit is restored afterwards


@needs_faces
def test_small_face_in_a_big_photo_is_cropped_but_a_tight_crop_is_not():
    face_path = sorted((FACES_MINI / "real-vs-fake" / "test" / "real").glob("*.jpg"))[0]
    face = Image.open(face_path).convert("RGB")
    assert largest_face(face) is None  # already a tight crop, like the training data
    photo = Image.new("RGB", (1024, 768), (90, 120, 90))
    photo.paste(face, (600, 300))
    box = largest_face(photo)
    assert box is not None
    left, top, right, bottom = box
    assert left <= 650 and right >= 800 and top <= 350 and bottom >= 500  # around the pasted face
    prepared = prepare(png_bytes(photo), 64)
    assert prepared.face_box == box and prepared.array.shape == (64, 64, 3)


def test_grad_cam_is_a_normalised_map_over_the_image(model_dir):
    model, _ = load_checkpoint(model_dir / "model.pt")
    array = np.asarray(synthetic_face(1, 1, 32))
    heat = grad_cam(model, array)
    assert heat.shape == (32, 32) and heat.min() >= 0 and heat.max() <= 1
    assert heat.max() > heat.min()  # a map, not a constant
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())  # hooks removed


def test_predict_cli_scores_a_folder_and_reports_bad_files(tmp_path, model_dir):
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    for i in range(3):
        synthetic_face(i % 2, 100 + i, 32).save(folder / f"{i}.jpg")
    synthetic_face(1, 200, 32).save(folder / "nested" / "deep.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (folder / "readme.txt").write_text("ignored: not an image suffix")
    out = tmp_path / "preds.csv"
    result = subprocess.run([sys.executable, "-m", "deepfake_detector.cli", "predict", str(folder), "--model",
                             str(model_dir), "--out", str(out), "--params", str(ROOT / "params.yaml")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "5 images" in result.stdout and "1 unreadable" in result.stdout
    rows = {Path(r["path"]).name: r for r in csv.DictReader(out.open())}
    assert set(rows) == {"0.jpg", "1.jpg", "2.jpg", "deep.png", "broken.jpg"}
    assert rows["broken.jpg"]["p_fake"] == "" and rows["broken.jpg"]["error"]
    for name in ("0.jpg", "deep.png"):
        assert 0 <= float(rows[name]["p_fake"]) <= 1 and rows[name]["label"] in ("real", "fake")


@needs_faces
def test_mlflow_models_serve_answers_a_post_like_in_process(tmp_path, model_dir, monkeypatch):
    from deepfake_detector.tracking import Tracker, move_alias

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # the sqlite store's artifacts (./mlruns) land here
    params = MlflowParams(tracking_uri=uri)
    tracker = Tracker.start(params, "serve-test", {}, {})
    with tracker.running():
        model_uri = tracker.log_model(model_dir / "model.pt", png_bytes(synthetic_face(0, 0, 32)))
    version = tracker.register(model_uri, {"threshold": "0.5"})
    move_alias(params, "champion", version, {})

    face = sorted((FACES_MINI / "real-vs-fake" / "test" / "fake").glob("*.jpg"))[0]
    model, _ = load_checkpoint(model_dir / "model.pt")
    expected, _, _ = predict_files(model, [face], model.image_size, crop_faces=True)

    port = free_port()
    # mlflow serves through `uvicorn`, looked up on PATH: this venv's.
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m",
                               "models:/deepfake-detector@champion", "--env-manager", "local", "-h", "127.0.0.1",
                               "-p", str(port)], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=(tmp_path / "serve.log").open("w"))
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", server, tmp_path / "serve.log")
        body = json.dumps({"dataframe_split": {"columns": ["image"],
                                               "data": [[base64.b64encode(face.read_bytes()).decode()]]}})
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body.encode(),
                                         headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())
    finally:
        server.terminate()
        server.wait(timeout=30)
    served = answer["predictions"][0]["p_fake"]
    assert served == pytest.approx(float(expected[0]), abs=1e-6)
