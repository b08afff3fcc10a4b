"""The Streamlit app through Streamlit's AppTest: real faces, bad files, a missing model."""

from __future__ import annotations

import io

import pytest

from conftest import FACES_MINI, ROOT, synthetic_face

streamlit_testing = pytest.importorskip("streamlit.testing.v1")
APP = str(ROOT / "app" / "streamlit_app.py")


@pytest.fixture
def app(monkeypatch, tmp_path, synthetic_model):
    """The app with an empty registry, so it falls back to the local model."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("DEEPFAKE_MODEL_PATH", str(synthetic_model))
    monkeypatch.setenv("DEEPFAKE_SAMPLES", str(tmp_path / "no-samples"))
    at = streamlit_testing.AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


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
