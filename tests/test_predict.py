"""Prediction outside the pipeline: limits on input, face cropping, Grad-CAM, the batch CLI, and
`mlflow models serve` answering a real POST with the in-process probability."""

from __future__ import annotations

import base64
import csv
import json
import os
import subprocess
import sys
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import FACES_MINI, ROOT, free_port, model_copy, png_bytes, stop_server, synthetic_face, wait_http
from deepfake_detector.detector import Decision, Detector
from deepfake_detector.params import MlflowParams, Params
from deepfake_detector.predict import PREDICTION_COLUMNS, largest_face, prepare
from deepfake_detector.scoring import predict_paths
from deepfake_detector.tracking import SERVING_REQUIREMENTS

needs_faces = pytest.mark.skipif(not (FACES_MINI / "real-vs-fake").is_dir(), reason="faces-mini not available")


@pytest.fixture
def model_dir(synthetic_model):
    return synthetic_model


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


@needs_faces
def test_face_search_is_skipped_for_face_crops_of_the_training_size_only():
    face = Image.open(sorted((FACES_MINI / "real-vs-fake" / "test" / "real").glob("*.jpg"))[0]).convert("RGB")
    square = Image.new("RGB", (400, 400), (90, 120, 90))
    square.paste(face.resize((160, 160)), (200, 40))
    assert largest_face(square) is not None  # a face the search finds, off centre
    # For a 224 px model a 400 px square is a face crop (at most twice its size): scored whole, no search.
    assert prepare(png_bytes(square), 224).face_box is None
    assert prepare(png_bytes(square), 128).face_box == largest_face(square)  # 400 > 2 x 128: searched
    wide = Image.new("RGB", (400, 300), (90, 120, 90))
    wide.paste(face.resize((120, 120)), (240, 40))
    assert prepare(png_bytes(wide), 224).face_box == largest_face(wide) is not None  # not square: searched
    # What is refused stays refused: too small, and not an image.
    with pytest.raises(ValueError, match="too small"):
        prepare(png_bytes(face.resize((40, 40))), 224, min_source_size=64)
    with pytest.raises(ValueError, match="not an image"):
        prepare(b"no image here", 224)


def test_grad_cam_is_a_normalised_map_over_the_image(model_dir):
    detector = Detector.from_checkpoint(model_dir)
    array = np.asarray(synthetic_face(1, 1, 32))
    heat = detector.explain(array)
    assert heat.shape == (32, 32) and heat.min() >= 0 and heat.max() <= 1
    assert heat.max() > heat.min()  # a map, not a constant
    model = detector.model
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())  # no hooks, ever
    assert all(p.grad is None for p in model.parameters())  # and no gradients left on the shared model


def test_grad_cam_from_concurrent_threads_matches_each_alone(model_dir):
    detector = Detector.from_checkpoint(model_dir)
    arrays = [np.asarray(synthetic_face(i % 2, 300 + i, 32)) for i in range(4)]
    alone = [detector.explain(a) for a in arrays]
    start = threading.Barrier(len(arrays))

    def explain_many(i: int) -> list[np.ndarray]:
        start.wait()
        return [detector.explain(arrays[i]) for _ in range(20)]

    with ThreadPoolExecutor(len(arrays)) as pool:
        together = list(pool.map(explain_many, range(len(arrays))))
    for i, maps in enumerate(together):
        for heat in maps:
            np.testing.assert_allclose(heat, alone[i], atol=1e-6)
    assert not all(np.allclose(alone[0], a) for a in alone[1:])  # different images, different maps


def test_decision_travels_with_a_local_model(tmp_path, model_dir, capsys):
    import shutil

    shutil.copy(model_dir / "model.pt", tmp_path / "model.pt")
    default = Detector.from_checkpoint(tmp_path)
    assert default.threshold == 0.5 and "no detector.json" in capsys.readouterr().out
    Decision(threshold=0.8, rule="max_accuracy", crop_faces=False, min_source_size=24).write(tmp_path / "detector.json")
    detector = Detector.from_checkpoint(tmp_path)
    assert detector.threshold == 0.8 and detector.label(0.79) == "real" and detector.label(0.8) == "fake"
    with pytest.raises(ValueError, match="too small: 16x16 < 24"):  # preprocess would have quarantined it
        detector.prepare(png_bytes(synthetic_face(0, 0, 16)))


def test_predict_cli_scores_a_folder_and_reports_bad_files(tmp_path, model_dir):
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    for i in range(3):
        synthetic_face(i % 2, 100 + i, 32).save(folder / f"{i}.jpg")
    synthetic_face(1, 200, 32).save(folder / "nested" / "deep.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (folder / "readme.txt").write_text("ignored: not an image suffix")
    out = tmp_path / "preds.csv"
    result = predict_cli(folder, model_dir, out)
    assert result.returncode == 0, result.stderr
    assert "5 images" in result.stdout and "1 unreadable" in result.stdout and "1 skipped" in result.stdout
    with out.open() as f:
        assert next(csv.reader(f)) == list(PREDICTION_COLUMNS)
    rows = {Path(r["path"]).name: r for r in csv.DictReader(out.open())}
    assert set(rows) == {"0.jpg", "1.jpg", "2.jpg", "deep.png", "broken.jpg", "readme.txt"}
    for name in ("broken.jpg", "readme.txt"):  # not scored: no answer, no verdict
        assert rows[name]["p_fake"] == rows[name]["unfamiliarity"] == rows[name]["familiar"] == ""
        assert rows[name]["error"]
    assert rows["readme.txt"]["error"] == "skipped: .txt is not an image type read here"
    for name in ("0.jpg", "deep.png"):
        assert 0 <= float(rows[name]["p_fake"]) <= 1 and rows[name]["predicted"] in ("real", "fake")
        assert rows[name]["face"] == "crop-sized"  # a 32 px square: scored whole, like the training crops
    scored = [r for r in rows.values() if not r["error"]]
    # The familiarity verdict, as the Detector gives it: unfamiliarity to 6 places, familiar below 1.
    detector = Detector.from_checkpoint(model_dir)
    for row in scored:
        expected = float(detector.assess(detector.prepare(Path(row["path"]).read_bytes()).array[None])[1][0])
        assert row["unfamiliarity"] == f"{float(row['unfamiliarity']):.6f}"
        assert float(row["unfamiliarity"]) == pytest.approx(expected, rel=1e-4, abs=1e-6)
        assert row["familiar"] == ("true" if float(row["unfamiliarity"]) < 1 else "false")
    flagged = sum(r["familiar"] == "false" for r in scored)
    assert f"{flagged} flagged unfamiliar" in result.stdout
    assert {r["source"] for r in rows.values()} == {"photos"}  # the folder given names every image under it


def predict_cli(folder: Path, model: Path, out: Path) -> subprocess.CompletedProcess:
    """``deepfake predict FOLDER --model MODEL --out OUT``, as a new process."""
    return subprocess.run([sys.executable, "-m", "deepfake_detector.cli", "predict", str(folder), "--model",
                           str(model), "--out", str(out), "--params", str(ROOT / "params.yaml")],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("distance,familiar", [(1e-30, "false"), (None, "")], ids=["flags-everything", "no-head"])
def test_predict_writes_the_familiarity_verdict_or_none(tmp_path, model_dir, distance, familiar):
    """A head that flags every face: each row says so, and the summary counts them; a model without the
    head: every row scored, with empty verdict columns, and the summary says nothing of them."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(4):
        synthetic_face(i % 2, 300 + i, 32).save(folder / f"{i}.png")
    out = tmp_path / "preds.csv"
    result = predict_cli(folder, model_copy(model_dir, tmp_path / "model", distance), out)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 4 and all(0 <= float(r["p_fake"]) <= 1 and r["error"] == "" for r in rows)
    assert [r["familiar"] for r in rows] == [familiar] * 4
    unfamiliarity = [r["unfamiliarity"] for r in rows]
    if familiar:  # a distance over a tiny flagging distance: far beyond 1
        assert all(float(u) > 1e6 for u in unfamiliarity) and "4 flagged unfamiliar" in result.stdout
    else:
        assert unfamiliarity == [""] * 4 and "flagged" not in result.stdout


def test_predict_of_a_folder_without_images_is_an_error(tmp_path, model_dir):
    from deepfake_detector.data import DataError

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found in"):
        predict_paths(Params(), [tmp_path / "empty"], str(model_dir), tmp_path / "preds.csv")
    assert not (tmp_path / "preds.csv").exists()


def test_predict_names_each_images_source_as_given(tmp_path, model_dir):
    for name in ("gan", "diffusion"):
        (tmp_path / name).mkdir()
        synthetic_face(1, 7, 32).save(tmp_path / name / "a.jpg")
    synthetic_face(0, 8, 32).save(tmp_path / "single.png")
    out = tmp_path / "preds.csv"
    predict_paths(Params(), [f"{{sd: {tmp_path / 'diffusion'}, stylegan: {tmp_path / 'gan'}}}",
                             tmp_path / "single.png", tmp_path / "gan"], str(model_dir), out)
    rows = [(Path(r["path"]).relative_to(tmp_path).as_posix(), r["source"]) for r in csv.DictReader(out.open())]
    # A mapping names its folders; a file given alone has no source; a folder given twice is scored twice.
    assert rows == [("diffusion/a.jpg", "sd"), ("gan/a.jpg", "stylegan"), ("single.png", ""), ("gan/a.jpg", "gan")]


@pytest.mark.slow
@needs_faces
def test_mlflow_models_serve_answers_a_post_like_in_process(tmp_path, model_dir, monkeypatch):
    import mlflow

    from deepfake_detector.tracking import Tracker, move_alias

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # the sqlite store's artifacts (./mlruns) land here
    params = MlflowParams(tracking_uri=uri)
    tracker = Tracker.start(params, "serve-test", {}, {})
    Decision(threshold=0.3, rule="fixed", min_source_size=16).write(tmp_path / "detector.json")
    with tracker.running():
        model_uri = tracker.log_model(model_dir / "model.pt", tmp_path / "detector.json",
                                      png_bytes(synthetic_face(0, 0, 32)))
    version = tracker.register(model_uri, {"threshold": "0.3"})
    move_alias(params, "champion", version, {})
    logged = Path(mlflow.artifacts.download_artifacts(model_uri))
    assert not list(logged.rglob("*.pkl"))  # logged from code: nothing pickled
    requirements = (logged / "requirements.txt").read_text()
    assert all(name in requirements for name in SERVING_REQUIREMENTS)

    face = sorted((FACES_MINI / "real-vs-fake" / "test" / "fake").glob("*.jpg"))[0]
    detector = Detector.load("models:/deepfake-detector@champion", params)
    expected, _, _ = detector.score_files([face])
    assert detector.threshold == 0.3

    port = free_port()
    # mlflow serves through `uvicorn`, looked up on PATH: this venv's.
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m",
                               "models:/deepfake-detector@champion", "--env-manager", "local", "-h", "127.0.0.1",
                               "-p", str(port)], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=(tmp_path / "serve.log").open("w"))
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", server, tmp_path / "serve.log")
        tiny, bomb = png_bytes(synthetic_face(1, 0, 8)), png_bytes(Image.new("L", (7000, 7000)))  # 49 MP
        rows = [[base64.b64encode(data).decode()] for data in (face.read_bytes(), tiny, bomb)]
        rows += [["not base64!"], [base64.b64encode(b"just some text").decode()]]
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}})
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body.encode(),
                                         headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())
    finally:
        stop_server(server)
    served, too_small, too_large, no_base64, text = answer["predictions"]
    assert served["p_fake"] == pytest.approx(float(expected[0]), abs=1e-6)
    assert served["predicted"] == detector.label(float(expected[0])) and served["error"] == ""
    assert served["familiar"] is (served["unfamiliarity"] < 1)  # the familiarity head's verdict, as JSON
    # A 256 px face against a 32 px model: searched (larger than twice the input), found filling the picture.
    assert served["face"] == "fills image" and served["face_box"] == ""
    # A bad row gets its reason, not a stack trace, and does not cost the good row its score; its
    # p_fake is null (JSON has no NaN).
    assert no_base64["predicted"] is None and no_base64["error"] and "Traceback" not in no_base64["error"]
    assert text["error"] == "not an image" and text["p_fake"] is text["unfamiliarity"] is text["familiar"] is None
    assert too_small["error"].startswith("too small: 8x8") and too_small["predicted"] is None
    assert "too large" in too_large["error"] and too_large["predicted"] is None


SERVE_PATH = """
import base64, json, sys, types
import pandas
from deepfake_detector.serving import ImageModel
model = ImageModel()
model.load_context(types.SimpleNamespace(artifacts={"checkpoint": sys.argv[1], "decision": sys.argv[2]}))
out = model.predict(None, pandas.DataFrame({"image": [base64.b64encode(open(sys.argv[3], "rb").read()).decode()]}))
assert out["error"][0] == "", out
print(json.dumps({name: getattr(module, "__file__", None) for name, module in sys.modules.items()}))
"""


def test_serving_requirements_are_what_serving_imports(tmp_path, model_dir):
    """The packages our modules on the serving path import (and that serving really loads) are exactly
    the logged requirements: none missing, none extra."""
    import ast
    from importlib.metadata import packages_distributions

    from deepfake_detector.backends import ONNX_FILE
    from deepfake_detector.heads import load_checkpoint
    from deepfake_detector.torch_backend import export_onnx

    Decision().write(tmp_path / "detector.json")  # face crop on: the OpenCV path runs too
    synthetic_face(1, 0, 96).crop((0, 0, 96, 80)).save(tmp_path / "face.png")  # not a face crop: the search runs
    # With its ONNX export beside it, as the train stage writes it: served by each backend in turn.
    export_onnx(load_checkpoint(model_dir / "model.pt")[0], tmp_path / ONNX_FILE)
    (tmp_path / "model.pt").write_bytes((model_dir / "model.pt").read_bytes())
    loaded = {}
    for backend in ("torch", "onnxruntime"):
        result = subprocess.run([sys.executable, "-c", SERVE_PATH, str(tmp_path / "model.pt"),
                                 str(tmp_path / "detector.json"), str(tmp_path / "face.png")],
                                capture_output=True, text=True, timeout=300,
                                env={**os.environ, "DEEPFAKE_BACKEND": backend})
        assert result.returncode == 0, result.stderr
        loaded |= json.loads(result.stdout.splitlines()[-1])
    ours = [Path(f) for name, f in loaded.items() if name.startswith("deepfake_detector.") and f]
    imported = set()
    for path in ours:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = {m for m in imported & set(loaded) if m not in sys.stdlib_module_names}
    third_party -= {"deepfake_detector", "mlflow"}  # MLflow puts itself in the environment
    distributions = packages_distributions()
    needed = {dist.lower() for module in third_party for dist in distributions[module]}
    assert needed == set(SERVING_REQUIREMENTS)


def test_folder_scan_does_not_follow_a_link_loop(tmp_path):
    from deepfake_detector.predict import iter_images

    (tmp_path / "faces" / "sub").mkdir(parents=True)
    synthetic_face(1, 0, 32).save(tmp_path / "faces" / "sub" / "a.png")
    (tmp_path / "faces" / "sub" / "loop").symlink_to(tmp_path / "faces", target_is_directory=True)
    assert list(iter_images([tmp_path / "faces"])) == [tmp_path / "faces" / "sub" / "a.png"]


def test_a_model_not_yet_evaluated_refuses_what_preprocess_quarantines(tmp_path, synthetic_processed):
    """min_source_size travels in model.pt from the data's meta.json: with no detector.json yet, an 8x8
    image is refused by predict, not labelled."""
    from deepfake_detector.params import Params, with_overrides
    from deepfake_detector.scoring import predict_paths
    from deepfake_detector.stages import train

    assert json.loads((synthetic_processed / "meta.json").read_text())["params"]["min_source_size"] == 16
    p = with_overrides(Params(), ["model.arch=cnn", "model.pretrained=none", "model.channels=[4]", "model.hidden=4",
                                  "train.epochs=1", "train.batch_size=16", "train.device=cpu", "mlflow.enabled=false"])
    train.run(p, synthetic_processed, tmp_path / "models")
    assert not (tmp_path / "models" / "detector.json").exists() and not (tmp_path / "eval").exists()
    synthetic_face(1, 0, size=8).save(tmp_path / "tiny.png")
    synthetic_face(1, 0, size=32).save(tmp_path / "face.png")
    summary = predict_paths(p, [tmp_path / "tiny.png", tmp_path / "face.png"], str(tmp_path / "models"),
                            tmp_path / "preds.csv", crop_faces=False)
    assert (summary["unreadable"], summary["fake"] + summary["real"]) == (1, 1)
    with (tmp_path / "preds.csv").open() as f:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(f)}
    assert rows["tiny.png"]["predicted"] == "" and "16" in rows["tiny.png"]["error"], rows["tiny.png"]
    assert rows["face.png"]["predicted"] in ("real", "fake")


def test_face_cascades_load_safely_from_several_threads_at_once():
    """A fresh process whose first face searches start on several threads together (what batch
    scoring does): OpenCV's first import must not be seen half made (it failed 4 runs in 6 before)."""
    code = ("from concurrent.futures import ThreadPoolExecutor\n"
            "from deepfake_detector.predict import _cascade\n"
            "with ThreadPoolExecutor(8) as pool:\n"
            "    assert len({id(c) for c in pool.map(lambda _: _cascade(), range(32))}) >= 1\n")
    for _ in range(3):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
