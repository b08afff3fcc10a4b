"""The Streamlit app through Streamlit's AppTest: real faces, bad files, a missing model, unfamiliar faces."""

from __future__ import annotations

import io

import pytest

from conftest import FACES_MINI, ROOT, model_copy, png_bytes, synthetic_face

streamlit_testing = pytest.importorskip("streamlit.testing.v1")
APP = str(ROOT / "app" / "streamlit_app.py")


def started(monkeypatch, tmp_path, model):
    """The app with an empty registry, so it falls back to the local ``model`` folder."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("DEEPFAKE_MODEL_PATH", str(model))
    monkeypatch.setenv("DEEPFAKE_SAMPLES", str(tmp_path / "no-samples"))
    at = streamlit_testing.AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


@pytest.fixture
def app(monkeypatch, tmp_path, synthetic_model):
    return started(monkeypatch, tmp_path, synthetic_model)


def page_text(at) -> str:
    return "\n".join(e.value for e in [*at.markdown, *at.caption, *at.error, *at.subheader])


@pytest.mark.skipif(not (FACES_MINI / "real-vs-fake").is_dir(), reason="faces-mini not available")
def test_real_face_gets_a_verdict_and_a_heatmap(app):
    face = sorted((FACES_MINI / "real-vs-fake" / "test" / "fake").glob("*.jpg"))[0]
    app.file_uploader[0].upload(face.name, face.read_bytes(), "image/jpeg").run()
    assert not app.exception, app.exception
    text = page_text(app)
    assert face.name in text and "P(fake)" in text and ("**FAKE**" in text or "**REAL**" in text)
    assert "threshold 0.500" in text and "Model: local" in text
    assert len(app.get("image")) == 2  # the image scored and its Grad-CAM overlay


def test_corrupt_and_non_image_files_get_a_message_not_a_traceback(app):
    jpeg = io.BytesIO()
    synthetic_face(1, 0, 64).save(jpeg, format="JPEG")
    app.file_uploader[0].upload("broken.jpg", jpeg.getvalue()[:300], "image/jpeg").run()  # truncated
    assert not app.exception
    assert any("broken.jpg" in e.value and "corrupt" in e.value for e in app.error), [e.value for e in app.error]
    app.file_uploader[0].upload("notes.png", b"just text", "image/png").run()
    assert any("notes.png" in e.value and "not an image" in e.value for e in app.error)


def test_no_model_is_a_clear_message(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("DEEPFAKE_MODEL_PATH", str(tmp_path / "nothing-here"))
    at = streamlit_testing.AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception
    assert any("No model to answer with" in e.value for e in at.error)


def test_hostile_uploads_are_refused_or_scored_like_everywhere_else(monkeypatch, tmp_path, synthetic_model):
    """EPS (never parsed), an image under the model's min_source_size, and a 16-bit PNG: the app
    answers as the Detector does for predict, serving and evaluate --data."""
    import shutil

    import numpy as np
    from PIL import Image

    from deepfake_detector.detector import Decision, Detector

    model = tmp_path / "model"
    shutil.copytree(synthetic_model, model)
    Decision(min_source_size=16).write(model / "detector.json")  # as evaluate records preprocess's rule
    app = started(monkeypatch, tmp_path, model)

    eps = io.BytesIO()
    synthetic_face(1, 0, 64).save(eps, format="EPS")
    for name, data, reason in [("drawing.png", eps.getvalue(), "unsupported format: EPS"),  # the suffix lies
                               ("tiny.png", png_bytes(synthetic_face(1, 1, 8)), "too small: 8x8")]:
        app.file_uploader[0].upload(name, data, "image/png").run()
        assert not app.exception, app.exception
        assert any(name in e.value and reason in e.value for e in app.error), [e.value for e in app.error]
    grey16 = np.linspace(0, 65535, 48 * 48).reshape(48, 48).astype(np.uint16)
    app.file_uploader[0].upload("deep.png", png_bytes(Image.fromarray(grey16)), "image/png").run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    detector = Detector.load(str(model))
    grey8 = np.rint(grey16.astype(np.float64) * 255 / 65535).astype(np.uint8)
    expected = float(detector.predict(detector.prepare(png_bytes(Image.fromarray(grey8))).array[None])[0])
    assert f"P(fake) {expected:.3f}" in page_text(app)


UNFAMILIAR = "Unlike the faces this model was trained on: its answer is unreliable."


@pytest.mark.parametrize("distance,warned", [(1e-30, True), (float("inf"), False), (None, False)],
                         ids=["flags-everything", "flags-nothing", "no-head"])
def test_a_face_the_familiarity_head_flags_gets_a_warning(monkeypatch, tmp_path, synthetic_model, distance, warned):
    """A head whose flagging distance every face reaches warns beside P(fake) and Grad-CAM; one that
    flags nothing, and a model without the head (no verdict), add nothing."""
    app = started(monkeypatch, tmp_path, model_copy(synthetic_model, tmp_path / "model", distance))
    app.file_uploader[0].upload("face.png", png_bytes(synthetic_face(1, 3, 32)), "image/png").run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    assert "P(fake)" in page_text(app) and len(app.get("image")) == 2  # still answered, with its heatmap
    assert [w.value for w in app.warning] == ([UNFAMILIAR] if warned else [])
