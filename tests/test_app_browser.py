"""End to end: the Streamlit app in a real headless chromium, from upload to verdict.

Starts ``streamlit run app/streamlit_app.py`` on a loopback port with a freshly trained tiny model and
an empty MLflow store (so the app falls back to the local model folder), then drives it with Playwright.
Playwright uses Debian's chromium (``sudo make browser``) and never downloads a browser of its own.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FACES_MINI, ROOT, free_port, stop_server, synthetic_face, wait_http

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not CHROMIUM.exists(),
                                 reason=f"{CHROMIUM} missing: install Debian's chromium with `sudo make browser`")]
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (the `test` extra has it)")

APP = ROOT / "app" / "streamlit_app.py"
SCREENSHOT_ARTIFACT = Path("/tmp/deepfake-app-screenshot.png")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
START_TIMEOUT_S = 60  # streamlit up and answering its health check
RESULT_TIMEOUT_S = 60  # one upload classified and rendered (first one loads torch and the model)
VERDICT = re.compile(r"\b(FAKE|REAL)\b.*P\(fake\)")  # e.g. "**FAKE**: P(fake) 0.873 (threshold 0.537)"


def log_tail(log: Path, chars: int = 4000) -> str:
    """The end of the server log, without the colour codes of streamlit's tracebacks."""
    text = log.read_text(errors="replace") if log.exists() else "(no log)"
    return re.sub(r"\x1b\[[0-9;]*m", "", text)[-chars:]


@pytest.fixture(scope="module")
def server(synthetic_model: Path, tmp_path_factory):
    """The app served on a free loopback port; yields ``(url, log path)`` and always stops it."""
    work = tmp_path_factory.mktemp("app-server")
    log = work / "streamlit.log"
    port = free_port()
    env = dict(os.environ)
    env.update({
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",  # empty: no registered model
        "DEEPFAKE_MODEL_PATH": str(synthetic_model),
        "DEEPFAKE_SAMPLES": str(work / "no-samples"),  # no sample picker: the page shows only what we upload
        "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false",
        "STREAMLIT_SERVER_FILE_WATCHER_TYPE": "none",  # nothing changes under it; spares inotify
    })
    env.pop("DEEPFAKE_MODEL_URI", None)  # the default registry name, which the empty store lacks
    command = [str(Path(sys.executable).parent / "streamlit"), "run", str(APP), "--server.headless", "true",
               "--server.port", str(port), "--server.address", "127.0.0.1"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/_stcore/health", proc, log, START_TIMEOUT_S)
        yield url, log
    finally:
        stop_server(proc, grace=10)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, server):
    """A fresh tab on the app, once its uploader has rendered."""
    url, _ = server
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    tab = context.new_page()
    tab.goto(url)
    uploader = tab.get_by_test_id("stFileUploader").filter(has_text="Upload face images")
    text = wait_for(tab, server, uploader.or_(tab.get_by_test_id("stAlertContentError")), "file uploader")
    if not uploader.count():  # e.g. the app found no model
        pytest.fail(f"the app shows no file uploader:\n{text}\nserver log:\n{log_tail(server[1])}")
    yield tab
    context.close()


@pytest.fixture(scope="module")
def face_image(tmp_path_factory) -> Path:
    """The first fake face of faces-mini's test split; a synthetic fake where faces-mini is absent."""
    fakes = sorted((FACES_MINI / "real-vs-fake" / "test" / "fake").glob("*.jpg"))
    if fakes:
        return fakes[0]
    path = tmp_path_factory.mktemp("face") / "synthetic-fake.png"
    synthetic_face(1, 0, size=128).save(path)
    return path


def wait_for(page, server, target, what: str) -> str:
    """Wait for ``target`` (a locator), failing at once on an app exception; returns the page text."""
    exception = page.get_by_test_id("stException")
    try:
        target.or_(exception).first.wait_for(timeout=RESULT_TIMEOUT_S * 1000)
    except sync_api.TimeoutError:
        pytest.fail(f"no {what} within {RESULT_TIMEOUT_S}s; page:\n{page.inner_text('body')}\n"
                    f"server log:\n{log_tail(server[1])}")
    if exception.count():
        pytest.fail(f"the app raised instead of showing {what}:\n{exception.first.inner_text()}\n"
                    f"server log:\n{log_tail(server[1])}")
    return page.inner_text("body")


def wait_for_verdict(page, server) -> str:
    """Wait for a FAKE/REAL ``P(fake)`` verdict line; returns the page text."""
    return wait_for(page, server, page.get_by_text(VERDICT), "verdict")


def wait_idle(page, server) -> str:
    """Wait for the script run to finish (the page is complete); returns the page text."""
    idle = page.locator("[data-testid=stApp][data-test-script-state=notRunning]")
    return wait_for(page, server, idle, "end of the script run")


def assert_no_traceback(page) -> None:
    """The page shows no Python exception, neither streamlit's exception box nor a pasted traceback."""
    text = page.inner_text("body")
    assert "Traceback" not in text, text
    assert page.get_by_test_id("stException").count() == 0, text


def test_uploaded_face_gets_a_verdict(page, server, face_image: Path, tmp_path: Path) -> None:
    page.set_input_files("input[type=file]", face_image)
    wait_for_verdict(page, server)
    text = wait_idle(page, server)
    assert face_image.name in text, text
    assert "FAKE" in text or "REAL" in text, text
    assert "Model:" in text, text
    assert_no_traceback(page)

    shot = tmp_path / "app.png"
    page.screenshot(path=str(shot), full_page=True)
    shutil.copyfile(shot, SCREENSHOT_ARTIFACT)
    assert shot.stat().st_size > 0


def test_corrupt_upload_shows_an_error_next_to_good_verdicts(page, server, face_image: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    page.set_input_files("input[type=file]", [face_image, broken])

    error = page.get_by_test_id("stAlertContentError").filter(has_text="broken.jpg")
    wait_for(page, server, error, "error naming broken.jpg")
    wait_for_verdict(page, server)  # the good file in the same batch is still classified
    text = wait_idle(page, server)
    assert face_image.name in text, text
    assert "FAKE" in text or "REAL" in text, text
    assert_no_traceback(page)
