"""Issue #32: scoring as a new user does it, with a model folder copied somewhere and the venv's
`deepfake` run from a folder outside the repository (no params.yaml there).

One test (or a few) per item of the issue: the pipeline's eval/ is never overwritten (1); served rows
are valid JSON and a local model folder can be served without a registry (2); predict and evaluate
work outside the repo and a read creates nothing (3); one-line errors (4); a non-zero exit when nothing
was scored (5); skipped files are counted and named (6); the model folder carries its threshold (7);
the face-search outcome is reported (8); one per-image schema, a file's source, the below-chance
warning, --threshold's range and one-class sets (9)."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import types
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import FACES_MINI, ROOT, free_port, model_copy, png_bytes, stop_server, synthetic_face, wait_http
from deepfake_detector.detector import Decision, Detector
from deepfake_detector.predict import PREDICTION_COLUMNS

needs_faces = pytest.mark.skipif(not (FACES_MINI / "real-vs-fake").is_dir(), reason="faces-mini not available")


# --- helpers -------------------------------------------------------------------------------------

@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """An empty folder outside the repository, with no params.yaml: the working directory of the CLI."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    assert ROOT not in cwd.resolve().parents and not (cwd / "params.yaml").exists()
    return cwd


@pytest.fixture
def model(tmp_path: Path, synthetic_model: Path) -> Path:
    """A copy of the trained model folder on its own (no detector.json, no eval/ beside it)."""
    folder = tmp_path / "copied" / "models"
    shutil.copytree(synthetic_model, folder)
    (folder / "detector.json").unlink(missing_ok=True)
    return folder


def deepfake(cwd: Path, env: dict[str, str], *args, timeout: int = 300) -> subprocess.CompletedProcess:
    """The `deepfake` CLI of this venv, run as a new process in ``cwd``."""
    return subprocess.run([sys.executable, "-m", "deepfake_detector.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit status 2 and a single line on stderr holding each of ``fragments``, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def labelled_set(root: Path, classes: tuple[str, ...] = ("real", "fake"), n: int = 3) -> Path:
    """Unseen synthetic faces (32 px PNG) in ``root/real`` and ``root/fake``."""
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for i in range(n):
            synthetic_face(("real", "fake").index(cls), 7000 + i, 32).save(root / cls / f"{i}.png")
    return root


def plain_picture(path: Path, size: tuple[int, int] = (600, 400)) -> Path:
    """A picture with no face in it: a smooth colour gradient."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    array = np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, 120)], axis=-1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def faces_mini_face() -> Image.Image:
    return Image.open(sorted((FACES_MINI / "real-vs-fake" / "test" / "real").glob("*.jpg"))[0]).convert("RGB")


def _save(image: Image.Image, folder: Path) -> Path:
    """``image`` as a PNG file in ``folder`` (never the CLI's working directory)."""
    path = folder / "scored-in-process.png"
    image.save(path)
    return path


def refuse_nan(token: str):
    raise ValueError(f"not JSON: {token}")


# --- 1. evaluate --data never overwrites the pipeline's evaluation ------------------------------------

@pytest.fixture
def workspace(tmp_path: Path, synthetic_model: Path) -> Path:
    """A trained pipeline's models/ and eval/ copied elsewhere (no params.yaml), plus a labelled set."""
    ws = tmp_path / "workspace"
    shutil.copytree(synthetic_model, ws / "models")
    (ws / "models" / "detector.json").unlink(missing_ok=True)  # as before issue #32: only eval/ holds it
    Decision(threshold=0.3, rule="eer", min_source_size=16).write(ws / "eval" / "detector.json")
    (ws / "eval" / "model_card.md").write_text("# deepfake-detector\n\nThe pipeline's model card.\n")
    (ws / "eval" / "metrics.json").write_text('{"roc_auc": 0.99}\n')
    (ws / "eval" / "plots").mkdir()
    (ws / "eval" / "plots" / "predictions.csv").write_text("path,actual,predicted,p_fake\n")
    labelled_set(tmp_path / "sets" / "other-faces")
    return ws


def test_evaluate_data_without_out_leaves_the_pipeline_eval_untouched(workspace, tmp_path, cli_env):
    before = tree(workspace / "eval")
    for _ in range(2):  # and a second run replaces its own outputs, not eval/
        result = deepfake(workspace, cli_env, "evaluate", "--data", tmp_path / "sets" / "other-faces",
                          "--model", "models")
        assert result.returncode == 0, result.stderr
    assert tree(workspace / "eval") == before  # detector.json and the model card still there, same bytes
    out = workspace / "eval-data" / "other-faces"
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["n_real"], metrics["n_fake"]) == (3, 3)
    assert metrics["threshold"] == pytest.approx(0.3)  # eval/detector.json was read, not replaced
    assert str(Path("eval-data") / "other-faces") in result.stdout
    assert not (out / "detector.json").exists() and not (out / "model_card.md").exists()


def test_evaluate_data_refuses_an_out_holding_a_pipeline_evaluation(workspace, tmp_path, cli_env):
    before = tree(workspace / "eval")
    result = deepfake(workspace, cli_env, "evaluate", "--data", tmp_path / "sets" / "other-faces", "--model", "models",
                      "--out", "eval")
    assert_one_line_error(result, "eval", "detector.json", "--out")
    assert tree(workspace / "eval") == before
    assert sorted(p.name for p in workspace.iterdir()) == ["eval", "models"]  # no staging folder left behind


# --- 2. served output is JSON; a local model folder is served without a registry ---------------------

def served_rows(model: Path, decision: Path, images: list[bytes]) -> list[dict]:
    """The served model's rows for ``images`` and two rows that are not images, as the scoring
    server writes them (a bare NaN token, which JSON parsers refuse, would raise)."""
    import pandas as pd
    from mlflow.pyfunc.scoring_server import predictions_to_json

    from deepfake_detector.serving import ImageModel

    served = ImageModel()
    served.load_context(types.SimpleNamespace(artifacts={"checkpoint": str(model / "model.pt"),
                                                         "decision": str(decision)}))
    rows = [base64.b64encode(data).decode() for data in images]
    rows += ["not base64!", base64.b64encode(b"just some text").decode()]
    df = served.predict(None, pd.DataFrame({"image": rows}))
    assert list(df.columns) == ["p_fake", "predicted", "unfamiliarity", "familiar", "face", "face_box", "error"]
    json.dumps(df.to_dict(orient="records"), allow_nan=False)  # NaN would raise: JSON has none
    answer = io.StringIO()
    predictions_to_json(df, answer)
    return json.loads(answer.getvalue(), parse_constant=refuse_nan)["predictions"]


def test_served_error_rows_have_null_p_fake_and_the_answer_is_valid_json(tmp_path, model):
    Decision(threshold=0.3, min_source_size=16).write(tmp_path / "detector.json")
    face = png_bytes(synthetic_face(1, 3, 32))
    good, plain, no_base64, text = served_rows(model, tmp_path / "detector.json",
                                               [face, png_bytes(Image.open(plain_picture(tmp_path / "plain.png")))])
    assert isinstance(good["p_fake"], float) and 0 <= good["p_fake"] <= 1
    assert good["predicted"] == ("fake" if good["p_fake"] >= 0.3 else "real") and good["error"] == ""
    assert (good["face"], good["face_box"]) == ("crop-sized", "")
    # The familiarity verdict of the Detector itself: familiar below 1.
    detector = Detector.from_checkpoint(model)
    unfamiliarity = float(detector.assess(detector.prepare(face).array[None])[1][0])
    assert good["unfamiliarity"] == pytest.approx(unfamiliarity, rel=1e-5)
    assert good["familiar"] is (unfamiliarity < 1)
    assert plain["face"] == "not found" and plain["predicted"] in ("real", "fake")
    assert isinstance(plain["unfamiliarity"], float) and isinstance(plain["familiar"], bool)
    for bad in (no_base64, text):
        assert bad["p_fake"] is bad["predicted"] is bad["unfamiliarity"] is bad["familiar"] is None and bad["error"]
    assert text["error"] == "not an image"


@pytest.mark.parametrize("distance,familiar", [(1e-30, False), (float("inf"), True), (None, None)],
                         ids=["flags-everything", "flags-nothing", "no-head"])
def test_served_rows_carry_the_familiarity_verdict_or_null(tmp_path, synthetic_model, distance, familiar):
    """A head that flags every face, one that flags none, and a model without one: its rows have no
    verdict (null), and still their P(fake)."""
    model = model_copy(synthetic_model, tmp_path / "model", distance)
    Decision(threshold=0.3, min_source_size=16).write(tmp_path / "detector.json")
    faces = [png_bytes(synthetic_face(i % 2, 3 + i, 32)) for i in range(3)]
    rows = served_rows(model, tmp_path / "detector.json", faces)
    for row in rows[:3]:
        assert isinstance(row["p_fake"], float) and row["familiar"] is familiar
        if familiar is None:
            assert row["unfamiliarity"] is None
        else:  # a distance over an infinite flagging distance is 0; over a tiny one, far beyond 1
            assert row["unfamiliarity"] == 0.0 if familiar else row["unfamiliarity"] > 1e6
    for bad in rows[3:]:
        assert bad["unfamiliarity"] is bad["familiar"] is None


def test_package_saves_a_model_folder_that_loads_without_a_registry(outside, model, cli_env):
    import mlflow
    import pandas as pd

    Decision(threshold=0.3, rule="eer", min_source_size=16).write(model / "detector.json")
    result = deepfake(outside, cli_env, "package", "--model", model, "--out", "served-model")
    assert result.returncode == 0, result.stderr
    assert "mlflow models serve -m served-model" in result.stdout
    assert sorted(p.name for p in outside.iterdir()) == ["served-model"]  # no mlflow.db, no mlruns/
    mlmodel = (outside / "served-model" / "MLmodel").read_text()
    assert "python_function" in mlmodel and "serving.py" in mlmodel
    assert not list((outside / "served-model").rglob("*.pkl"))  # from code: nothing pickled
    decisions = list((outside / "served-model").rglob("detector.json"))
    assert len(decisions) == 1 and Decision.read(decisions[0]).threshold == 0.3  # the model's own threshold
    loaded = mlflow.pyfunc.load_model(str(outside / "served-model"))
    answer = loaded.predict(pd.DataFrame({"image": [base64.b64encode(png_bytes(synthetic_face(0, 5, 32))).decode(),
                                                    "not base64!"]}))
    expected, _, _ = Detector.from_checkpoint(model).score_files([_save(synthetic_face(0, 5, 32), outside.parent)])
    assert answer["p_fake"][0] == pytest.approx(float(expected[0]), abs=1e-6) and answer["p_fake"][1] is None
    # A second package into the same folder is refused, in one line, and leaves it as it was.
    assert_one_line_error(deepfake(outside, cli_env, "package", "--model", model, "--out", "served-model"),
                          "served-model", "exists")


@pytest.mark.slow
def test_mlflow_models_serve_of_a_packaged_folder_answers_valid_json(outside, model, cli_env):
    Decision(threshold=0.3, rule="eer", min_source_size=16).write(model / "detector.json")
    result = deepfake(outside, cli_env, "package", "--model", model, "--out", "served-model")
    assert result.returncode == 0, result.stderr
    good = _save(synthetic_face(1, 9, 32), outside.parent)
    expected, _, _ = Detector.from_checkpoint(model).score_files([good])
    port, log = free_port(), outside.parent / "serve.log"
    env = {**cli_env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{cli_env['PATH']}"}  # uvicorn: this venv's
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", "served-model",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], env=env, cwd=outside,
                              stdout=subprocess.DEVNULL, stderr=log.open("w"))
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", server, log)
        rows = [[base64.b64encode(good.read_bytes()).decode()], ["not base64!"]]
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        raw = urllib.request.urlopen(request, timeout=60).read().decode()
    finally:
        stop_server(server)
    served, bad = json.loads(raw, parse_constant=refuse_nan)["predictions"]  # a NaN token would raise
    assert served["p_fake"] == pytest.approx(float(expected[0]), abs=1e-6)
    assert served["predicted"] == ("fake" if expected[0] >= 0.3 else "real") and served["error"] == ""
    assert served["face"] == "crop-sized"
    assert bad["p_fake"] is None and bad["predicted"] is None and bad["error"]
    assert not (outside / "mlflow.db").exists()


# --- 3. predict and evaluate work outside the repo; a read creates nothing --------------------------

def test_predict_outside_the_repo_needs_no_params_file(outside, model, tmp_path, cli_env):
    image = _save(synthetic_face(1, 2, 32), tmp_path)
    result = deepfake(outside, cli_env, "predict", image, "--model", model, "--out", "preds.csv")
    assert result.returncode == 0, result.stderr
    assert "params" not in result.stderr and "1 images: " in result.stdout
    _, rows = read_rows(outside / "preds.csv")
    assert len(rows) == 1 and 0 <= float(rows[0]["p_fake"]) <= 1


def test_evaluate_data_outside_the_repo_needs_no_params_file(outside, model, tmp_path, cli_env):
    data = labelled_set(tmp_path / "faces")
    result = deepfake(outside, cli_env, "evaluate", "--data", data, "--model", model, "--out", "scored")
    assert result.returncode == 0, result.stderr
    assert json.loads((outside / "scored" / "metrics.json").read_text())["n"] == 6


def test_default_model_outside_the_repo_creates_no_mlflow_store(outside, tmp_path, cli_env):
    image = _save(synthetic_face(1, 2, 32), tmp_path)
    # predict's default --model is the registry's champion: there is no store here to look it up in.
    assert_one_line_error(deepfake(outside, cli_env, "predict", image), "no MLflow store", "mlflow.db")
    # evaluate's default --model is the folder models/, which is not here.
    assert_one_line_error(deepfake(outside, cli_env, "evaluate", "--data", labelled_set(tmp_path / "faces")),
                          "no such model folder: models")
    assert list(outside.iterdir()) == []  # no mlflow.db, no mlruns/, no predictions/, no eval-data/


def test_mistyped_model_path_says_no_such_model_folder(outside, model, tmp_path, cli_env):
    image = _save(synthetic_face(1, 2, 32), tmp_path)
    typo = model.parent / "modles"
    line = assert_one_line_error(deepfake(outside, cli_env, "predict", image, "--model", typo, "--out", "p.csv"),
                                 f"no such model folder: {typo}")
    assert "No such artifact" not in line
    assert list(outside.iterdir()) == [] and not typo.exists()


# --- 4. one line, not a traceback ------------------------------------------------------------------

@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_model_folder_without_model_pt_is_one_line(outside, tmp_path, cli_env, command):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    args = ([_save(synthetic_face(1, 2, 32), tmp_path)] if command == "predict"
            else ["--data", labelled_set(tmp_path / "faces")])
    result = deepfake(outside, cli_env, command, *args, "--model", empty, "--out", "out.csv")
    assert_one_line_error(result, f"no model.pt in {empty}")
    assert list(outside.iterdir()) == []


def test_model_file_that_is_not_a_checkpoint_is_one_line(outside, tmp_path, cli_env):
    image = _save(synthetic_face(1, 2, 32), tmp_path)
    junk = tmp_path / "junk" / "model.pt"
    junk.parent.mkdir()
    junk.write_bytes(b"not a checkpoint")
    for model in (image, junk):  # an image given as the model; a model.pt that is not one
        assert_one_line_error(deepfake(outside, cli_env, "predict", image, "--model", model, "--out", "p.csv"),
                              "is not a checkpoint written by train")
    assert list(outside.iterdir()) == []


def test_predict_out_an_existing_folder_is_one_line(outside, model, tmp_path, cli_env):
    (outside / "results").mkdir()
    image = _save(synthetic_face(1, 2, 32), tmp_path)
    assert_one_line_error(deepfake(outside, cli_env, "predict", image, "--model", model, "--out", "results"),
                          "results is a folder")
    assert list((outside / "results").iterdir()) == []


def test_evaluate_data_an_image_file_is_one_line(outside, model, tmp_path, cli_env):
    image = _save(synthetic_face(1, 2, 32), tmp_path)
    assert_one_line_error(deepfake(outside, cli_env, "evaluate", "--data", image, "--model", model, "--out", "o"),
                          "is not a CSV")
    assert list(outside.iterdir()) == []


# --- 5. a non-zero exit when nothing was scored -----------------------------------------------------

def test_predict_of_a_missing_file_exits_non_zero(outside, model, tmp_path, cli_env):
    missing = tmp_path / "no-such-photo.jpg"
    assert_one_line_error(deepfake(outside, cli_env, "predict", missing, "--model", model, "--out", "p.csv"),
                          "none of the 1 images could be scored", str(missing))
    _, rows = read_rows(outside / "p.csv")  # the reasons are kept
    assert [(r["path"], r["p_fake"]) for r in rows] == [(str(missing), "")] and rows[0]["error"]


def test_predict_of_an_empty_folder_says_no_images_found(outside, model, tmp_path, cli_env):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(deepfake(outside, cli_env, "predict", tmp_path / "empty", "--model", model,
                                   "--out", "p.csv"), "no images found in")
    assert list(outside.iterdir()) == []  # nothing written


def test_predict_of_a_folder_where_nothing_decodes_exits_non_zero(outside, model, tmp_path, cli_env):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (folder / "b.png").write_bytes(b"just text")
    assert_one_line_error(deepfake(outside, cli_env, "predict", folder, "--model", model, "--out", "p.csv"),
                          "none of the 2 images could be scored")
    _, rows = read_rows(outside / "p.csv")
    assert len(rows) == 2 and all(r["error"] and r["p_fake"] == "" for r in rows)


# --- 6. files of other types are counted and named --------------------------------------------------

def test_folder_scan_counts_and_names_the_files_it_skips(outside, model, tmp_path, cli_env):
    folder = tmp_path / "phone"
    folder.mkdir()
    synthetic_face(0, 4, 32).save(folder / "face.png")
    (folder / "IMG_0001.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    Image.new("RGB", (16, 16)).save(folder / "favicon.ico")
    (folder / "notes.txt").write_text("not a picture")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")  # hidden: not counted
    result = deepfake(outside, cli_env, "predict", folder, "--model", model, "--out", "p.csv")
    assert result.returncode == 0, result.stderr
    assert "1 images: " in result.stdout and "3 skipped" in result.stdout
    _, rows = read_rows(outside / "p.csv")
    errors = {Path(r["path"]).name: r["error"] for r in rows}
    assert errors == {"face.png": "", "IMG_0001.heic": "skipped: .heic is not an image type read here",
                      "favicon.ico": "skipped: .ico is not an image type read here",
                      "notes.txt": "skipped: .txt is not an image type read here"}


def test_folder_of_only_other_types_names_them(outside, model, tmp_path, cli_env):
    folder = tmp_path / "phone"
    folder.mkdir()
    for i in range(2):
        (folder / f"IMG_{i}.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")
    assert_one_line_error(deepfake(outside, cli_env, "predict", folder, "--model", model, "--out", "p.csv"),
                          "no images found in", ".heic x2")
    assert list(outside.iterdir()) == []


# --- 7. the model folder carries its threshold ------------------------------------------------------

def test_model_folder_copied_alone_scores_at_its_own_threshold(outside, model, tmp_path, cli_env):
    Decision(threshold=0.3, rule="eer", min_source_size=16).write(model / "detector.json")
    alone = tmp_path / "usb-stick" / "my-model"
    alone.parent.mkdir()
    shutil.copytree(model, alone)  # no eval/ anywhere near it
    assert Detector.from_checkpoint(alone).threshold == 0.3
    image = _save(synthetic_face(1, 2, 32), tmp_path)
    result = deepfake(outside, cli_env, "predict", image, "--model", alone, "--out", "p.csv")
    assert result.returncode == 0, result.stderr
    assert "threshold 0.3000" in result.stdout and "no detector.json" not in result.stdout
    _, rows = read_rows(outside / "p.csv")
    assert rows[0]["predicted"] == ("fake" if float(rows[0]["p_fake"]) >= 0.3 else "real")


def test_evaluate_stage_keeps_the_decision_with_the_model(tmp_path, synthetic_processed, synthetic_model,
                                                          monkeypatch):
    from deepfake_detector.params import Params, with_overrides
    from deepfake_detector.stages import evaluate

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    p = with_overrides(Params(), ["mlflow.enabled=false", "evaluate.robustness.jpeg_quality=[90]",
                                  "evaluate.robustness.blur_sigma=[]", "evaluate.robustness.noise_sigma=[]",
                                  "evaluate.robustness.downscale=[]", "evaluate.mistakes=2"])
    workspace = tmp_path / "workspace"
    shutil.copytree(synthetic_model, workspace / "models")
    evaluate.run(p, synthetic_processed, workspace / "models", workspace / "eval")
    kept = workspace / "models" / "detector.json"
    assert kept.read_bytes() == (workspace / "eval" / "detector.json").read_bytes()
    decision = Decision.read(kept)
    assert decision.rule == p.evaluate.threshold_rule  # chosen on valid, not the 0.5 default
    alone = tmp_path / "copied" / "models"
    shutil.copytree(workspace / "models", alone)  # models/ alone, without eval/
    assert Detector.from_checkpoint(alone).decision == decision


def test_train_stage_drops_a_stale_decision_beside_the_model(tmp_path, synthetic_processed, monkeypatch):
    from deepfake_detector.params import Params, with_overrides
    from deepfake_detector.stages import train

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    Decision(threshold=0.9, rule="eer").write(tmp_path / "models" / "detector.json")  # the previous model's
    p = with_overrides(Params(), ["model.arch=cnn", "model.pretrained=none", "model.channels=[4]", "model.hidden=4",
                                  "train.epochs=1", "train.batch_size=16", "train.device=cpu", "mlflow.enabled=false"])
    train.run(p, synthetic_processed, tmp_path / "models")
    assert (tmp_path / "models" / "model.pt").is_file()
    assert not (tmp_path / "models" / "detector.json").exists()


# --- 8. the face-search outcome ---------------------------------------------------------------------

def test_predict_reports_the_face_search_outcome(outside, model, tmp_path, cli_env):
    folder = tmp_path / "pictures"
    plain_picture(folder / "landscape.png")  # 600x400, no face
    synthetic_face(0, 4, 32).save(folder / "small.png")  # a small square: a face crop already
    result = deepfake(outside, cli_env, "predict", folder, "--model", model, "--out", "p.csv")
    assert result.returncode == 0, result.stderr
    _, rows = read_rows(outside / "p.csv")
    found = {Path(r["path"]).name: (r["face"], r["face_box"]) for r in rows}
    assert found == {"landscape.png": ("not found", ""), "small.png": ("crop-sized", "")}
    result = deepfake(outside, cli_env, "predict", folder, "--model", model, "--out", "off.csv", "--no-face-crop")
    assert result.returncode == 0, result.stderr
    _, rows = read_rows(outside / "off.csv")
    assert {(r["face"], r["face_box"]) for r in rows} == {("off", "")}


@needs_faces
def test_predict_reports_the_box_of_a_face_found_in_a_photo(outside, model, tmp_path, cli_env):
    photo = Image.new("RGB", (1024, 768), (90, 120, 90))
    photo.paste(faces_mini_face(), (600, 300))
    path = _save(photo, tmp_path)
    result = deepfake(outside, cli_env, "predict", path, "--model", model, "--out", "p.csv")
    assert result.returncode == 0, result.stderr
    _, (row,) = read_rows(outside / "p.csv")
    assert row["face"] == "cropped"
    left, top, right, bottom = map(int, row["face_box"].split())
    assert left <= 650 and right >= 800 and top <= 350 and bottom >= 500  # around the pasted face


def test_app_says_when_no_face_was_found(monkeypatch, tmp_path, model):
    streamlit_testing = pytest.importorskip("streamlit.testing.v1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("DEEPFAKE_MODEL_PATH", str(model))
    monkeypatch.setenv("DEEPFAKE_SAMPLES", str(tmp_path / "no-samples"))
    # The app as copied elsewhere: it reads params.yaml beside its folder, and there is none there.
    (tmp_path / "app").mkdir()
    shutil.copy(ROOT / "app" / "streamlit_app.py", tmp_path / "app" / "streamlit_app.py")
    app = streamlit_testing.AppTest.from_file(str(tmp_path / "app" / "streamlit_app.py"), default_timeout=120)
    app.run()
    assert not app.exception, app.exception
    app.file_uploader[0].upload("small.png", png_bytes(synthetic_face(0, 4, 32)), "image/png").run()
    assert not app.exception and not app.warning  # a face crop: nothing to warn about
    landscape = plain_picture(tmp_path / "landscape.png").read_bytes()
    app.file_uploader[0].upload("landscape.png", landscape, "image/png").run()
    assert not app.exception, app.exception
    assert any("No face found" in w.value for w in app.warning), [w.value for w in app.warning]
    assert not (tmp_path / "mlflow.db").exists()  # the registry look-up created no store


# --- 9. consistency ---------------------------------------------------------------------------------

def test_a_file_given_alone_has_no_source(outside, model, tmp_path, cli_env):
    data = labelled_set(tmp_path / "faces")
    result = deepfake(outside, cli_env, "predict", data / "real" / "0.png", data / "fake", "--model", model,
                      "--out", "p.csv")
    assert result.returncode == 0, result.stderr
    _, rows = read_rows(outside / "p.csv")
    sources = {Path(r["path"]).relative_to(data).as_posix(): r["source"] for r in rows}
    # Not "real": a folder's name read as a label. A folder given names its images.
    assert sources == {"real/0.png": "", "fake/0.png": "fake", "fake/1.png": "fake", "fake/2.png": "fake"}


def test_evaluate_data_writes_predicts_per_image_schema(outside, model, tmp_path, cli_env):
    data = labelled_set(tmp_path / "other-faces")
    evaluated = deepfake(outside, cli_env, "evaluate", "--data", data, "--model", model, "--out", "scored")
    assert evaluated.returncode == 0, evaluated.stderr
    predicted = deepfake(outside, cli_env, "predict", data, "--model", model, "--out", "p.csv")
    assert predicted.returncode == 0, predicted.stderr
    eval_columns, eval_rows = read_rows(outside / "scored" / "plots" / "predictions.csv")
    predict_columns, predict_rows = read_rows(outside / "p.csv")
    assert eval_columns == predict_columns == list(PREDICTION_COLUMNS)
    by_path = {Path(r["path"]).resolve(): r for r in predict_rows}
    assert set(by_path) == {Path(r["path"]).resolve() for r in eval_rows}
    for row in eval_rows:
        twin = by_path[Path(row["path"]).resolve()]
        assert row["actual"] == Path(row["path"]).parent.name and twin["actual"] == ""
        assert row["source"] == twin["source"] == "other-faces"
        assert float(row["p_fake"]) == pytest.approx(float(twin["p_fake"]), abs=1e-5)
        assert row["predicted"] == twin["predicted"] in ("real", "fake")
        assert float(row["unfamiliarity"]) == pytest.approx(float(twin["unfamiliarity"]), rel=1e-4, abs=1e-6)
        assert row["familiar"] == twin["familiar"] in ("true", "false")
        assert (row["face"], row["face_box"], row["error"]) == (twin["face"], twin["face_box"], twin["error"])
        assert (row["face"], row["face_box"], row["error"]) == ("crop-sized", "", "")


def test_numeric_label_csv_scored_below_chance_gets_a_warning(outside, model, tmp_path, cli_env):
    data = labelled_set(tmp_path / "kaggle-like")
    with (data / "labels.csv").open("w", newline="") as f:  # Kaggle's numeric label: 1 = real
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        writer.writerows([f"{cls}/{i}.png", int(cls == "real")] for cls in ("real", "fake") for i in range(3))
    result = deepfake(outside, cli_env, "evaluate", "--data", data / "labels.csv", "--model", model, "--out", "o")
    assert result.returncode == 0, result.stderr
    assert json.loads((outside / "o" / "metrics.json").read_text())["roc_auc"] < 0.5
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning")]
    assert len(warning) == 1 and "below chance" in warning[0] and "label" in warning[0], result.stderr


@pytest.mark.parametrize("command,value", [("predict", "1.5"), ("evaluate", "-0.1"), ("predict", "nan")])
def test_threshold_outside_0_to_1_is_refused(outside, model, tmp_path, cli_env, command, value):
    image = _save(synthetic_face(1, 2, 32), tmp_path)
    args = [image] if command == "predict" else ["--data", labelled_set(tmp_path / "faces")]
    result = deepfake(outside, cli_env, command, *args, "--model", model, "--out", "out", f"--threshold={value}")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "--threshold" in result.stderr and "not a probability" in result.stderr
    assert list(outside.iterdir()) == []


def test_evaluate_data_accepts_a_set_of_reals_only(outside, model, tmp_path, cli_env):
    data = labelled_set(tmp_path / "my-photos", classes=("real",))
    result = deepfake(outside, cli_env, "evaluate", "--data", data, "--model", model, "--out", "o")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((outside / "o" / "metrics.json").read_text())
    assert (metrics["n_real"], metrics["n_fake"]) == (3, 0)
    _, rows = read_rows(outside / "o" / "plots" / "predictions.csv")
    assert {r["actual"] for r in rows} == {"real"} and len(rows) == 3
