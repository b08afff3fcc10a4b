"""Shared fixtures: synthetic datasets for tests that always run, faces-mini for those that need real faces."""

from __future__ import annotations

import importlib.util
import io
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
FACES_MINI = ROOT.parent / "shared" / "data" / "faces-mini"
SPLITS = ("train", "valid", "test")


def _flips_only():
    from deepfake_detector.params import AugmentParams, BlurParams, JpegParams, NoiseParams

    return AugmentParams(hflip=0.5, crop_scale=(1.0, 1.0), blur=BlurParams(prob=0.0), noise=NoiseParams(prob=0.0),
                         jpeg=JpegParams(prob=0.0))


# The synthetic fakes' tell is a one-pixel checkerboard, which blur, noise, JPEG and resized crops
# erase: tests that need a model that learns it train with flips alone.
FLIPS_ONLY = _flips_only()


def benchmark_module(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` imported as a module (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def synthetic_face(label: int, index: int, size: int = 48) -> Image.Image:
    """A stand-in image: smooth gradients for real (0), the same plus a fine checkerboard for fake (1).

    The high-frequency pattern mimics the upsampling traces GANs leave, so a CNN can learn it.
    """
    rng = np.random.default_rng(index * 2 + label)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([yy, xx, (xx + yy) / 2], axis=-1) * rng.uniform(80, 200, 3) + rng.uniform(0, 40, 3)
    if label == 1:
        base += 25 * ((np.indices((size, size)).sum(0) % 2)[..., None] - 0.5)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def make_dataset(root: Path, per_class: int = 4, size: int = 48, nested: bool = True) -> Path:
    """A dataset in the 140k layout under ``root``; returns the folder holding the splits."""
    split_root = root / "real_vs_fake" / "real-vs-fake" if nested else root
    for s, split in enumerate(SPLITS):
        for label, cls in enumerate(("real", "fake")):
            folder = split_root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                synthetic_face(label, 1000 * s + i, size).save(folder / f"{i:04d}.jpg", quality=95)
    return split_root


def one_class_source(root: Path, label: int, per_split: int, first: int) -> Path:
    """A source of one class alone, ``{train,valid,test}/<real or fake>/``: synthetic faces from index ``first``."""
    for s, split in enumerate(SPLITS):
        folder = root / split / ("real", "fake")[label]
        folder.mkdir(parents=True)
        for i in range(per_split):
            synthetic_face(label, first + 1000 * s + i, 32).save(folder / f"{i:04d}.png")
    return root


# Overrides for a whole run in seconds: 32 px, a one-block CNN, one epoch on the CPU.
TINY_RUN = ["preprocess.image_size=32", "preprocess.min_source_size=16", "preprocess.blur.prob=0",
            "preprocess.noise.prob=0", "model.arch=cnn", "model.pretrained=none", "model.channels=[4]",
            "model.hidden=4", "model.convs_per_block=1", "train.epochs=1", "train.batch_size=8", "train.device=cpu"]
# Evaluate with one robustness row (JPEG q50) instead of nine.
ONE_ROBUSTNESS_ROW = ["evaluate.robustness.jpeg_quality=[50]", "evaluate.robustness.blur_sigma=[]",
                      "evaluate.robustness.noise_sigma=[]", "evaluate.robustness.downscale=[]"]


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """A small synthetic dataset; returns its root (the folder ``download`` would be pointed at)."""
    root = tmp_path / "dataset"
    make_dataset(root)
    return root


@pytest.fixture(scope="session")
def synthetic_processed(tmp_path_factory) -> Path:
    """Synthetic faces whose fakes carry a checkerboard trace, preprocessed at 32 px without degradation."""
    from deepfake_detector import preprocess
    from deepfake_detector.params import BlurParams, NoiseParams, PreprocessParams

    root = tmp_path_factory.mktemp("synthetic")
    make_dataset(root / "raw", per_class=24, size=32)
    clean = PreprocessParams(image_size=32, min_source_size=16, blur=BlurParams(prob=0.0), noise=NoiseParams(prob=0.0))
    preprocess.run(root / "raw", root / "processed", clean, seed=0, workers=1, progress=False)
    return root / "processed"


@pytest.fixture(scope="session")
def synthetic_model(tmp_path_factory, synthetic_processed) -> Path:
    """A folder with a small model.pt trained on the synthetic faces (it separates them well)."""
    import torch

    from deepfake_detector.params import ModelParams, TrainParams
    from deepfake_detector.train import fit

    out = tmp_path_factory.mktemp("synthetic-model")
    model = ModelParams(arch="cnn", pretrained="none", channels=(8, 16), convs_per_block=1, hidden=16)
    fit(synthetic_processed, out, model,
        TrainParams(epochs=8, batch_size=16, lr=3e-3, augment=FLIPS_ONLY), torch.device("cpu"), seed=0, progress=False)
    return out


def model_copy(model: Path, to: Path, flagging_distance: float | None) -> Path:
    """A copy of the model folder ``model`` at ``to`` whose familiarity head flags an image at
    ``flagging_distance`` (tiny: every image is flagged; inf: none is), or, with None, a model without
    the head (``model.familiarity: none``, as every model trained before it). It is the head's own
    ``scale``: the unfamiliarity is the largest of the parts' relative distances over it, whatever
    the parts."""
    import shutil

    import torch

    shutil.copytree(model, to)
    checkpoint = torch.load(to / "model.pt", weights_only=True)
    if flagging_distance is None:
        checkpoint["config"]["familiarity"] = "none"
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if not k.startswith("heads.familiarity.")}
    else:
        checkpoint["state_dict"]["heads.familiarity.scale"] = torch.tensor(flagging_distance)
    torch.save(checkpoint, to / "model.pt")
    return to


def free_port() -> int:
    """A loopback port nothing listens on (right now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Poll ``url`` until it answers 200; fail with the log's end if ``proc`` dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    pytest.fail(f"{url} did not answer within {timeout}s:\n{log.read_text(errors='replace')[-4000:]}")


def stop_server(proc: subprocess.Popen, group: bool = False, grace: float = 30) -> None:
    """Ask ``proc`` (its whole process group with ``group``) to stop, and kill it if it has not within
    ``grace`` seconds: an mlflow or uvicorn server on a busy CPU can take longer than that to drain."""
    def send(sig: int) -> None:
        try:
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
        except ProcessLookupError:  # already gone
            pass

    send(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait()


@pytest.fixture
def faces_mini() -> Path:
    if not (FACES_MINI / "real-vs-fake").is_dir():
        pytest.skip(f"real faces not available at {FACES_MINI}")
    return FACES_MINI


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    """Environment for running the ``deepfake``, ``dvc`` and ``git`` commands of this venv."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    env["CI"] = "true"  # keeps progress bars out of captured output
    env.pop("MLFLOW_TRACKING_URI", None)
    for key, value in (("GIT_AUTHOR_NAME", "test"), ("GIT_AUTHOR_EMAIL", "test@example.com"),
                       ("GIT_COMMITTER_NAME", "test"), ("GIT_COMMITTER_EMAIL", "test@example.com")):
        env.setdefault(key, value)
    return env


def pytest_collection_modifyitems(config, items):
    """Every e2e test (a whole pipeline run) is slow too: `pytest -m "not slow"` (`make test-fast`) skips it."""
    for item in items:
        if item.get_closest_marker("e2e") and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)
