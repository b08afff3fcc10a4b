"""Inference backends: batch norm folded for any arch, the ONNX export and its check, the backend
choice in predict, evaluate and serving, and the error when ONNX Runtime is missing."""

from __future__ import annotations

import csv
import shutil
import sys

import numpy as np
import pytest
import torch

from conftest import synthetic_face
from deepfake_detector.backends import ONNX_FILE, OnnxBackend
from deepfake_detector.detector import Decision, Detector
from deepfake_detector.errors import UserError
from deepfake_detector.heads import load_checkpoint
from deepfake_detector.model import build_model
from deepfake_detector.params import ARCHS, ModelParams, Params, with_overrides
from deepfake_detector.preprocess import load_split
from deepfake_detector.scoring import predict_paths
from deepfake_detector.torch_backend import (
    TOLERANCE,
    UNFAMILIARITY_TOLERANCE,
    TorchBackend,
    export_onnx,
    fold_batch_norm,
    unfamiliarity_difference,
)

FOLD_CASES = [a if a in ("cnn", "resnet18") else pytest.param(a, marks=pytest.mark.slow) for a in ARCHS]


@pytest.mark.parametrize("arch", FOLD_CASES)
def test_batch_norm_folds_into_the_convolutions_of_every_arch(arch):
    torch.manual_seed(0)
    model = build_model(ModelParams(arch=arch, pretrained="none", channels=(8, 16), hidden=8), 64)
    for m in model.modules():  # statistics away from the identity, so a missed or wrong fold shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0), m.weight.data.uniform_(0.5, 1.5)
    model.eval()
    folded = fold_batch_norm(model, 64)
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-4)
    left = [m for m in folded.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    # Every BN of these archs follows a convolution directly; convnext has none (LayerNorm).
    assert left == [] and any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == (arch != "convnext_tiny")


@pytest.mark.filterwarnings("error:The given NumPy array is not writable")
def test_onnx_export_round_trips_any_batch_size_within_tolerance(tmp_path, synthetic_model, synthetic_processed):
    model, _ = load_checkpoint(synthetic_model / "model.pt")
    images = load_split(synthetic_processed, "valid")[0]  # read-only memmap, as the train stage passes it
    report = export_onnx(model, tmp_path / ONNX_FILE, images)
    assert report["checked"] == len(images) and report["max_abs_diff"] <= TOLERANCE
    onnx, eager = OnnxBackend(tmp_path / ONNX_FILE), TorchBackend(model, 32, torch.device("cpu"))
    for n in (1, 5):
        batch = np.array(images[:n])  # the Detector's batches are copies
        (p_onnx, u_onnx), (p_eager, u_eager) = onnx(batch), eager(batch)
        assert p_onnx.shape == u_onnx.shape == (n,)  # the model's familiarity head: a second output
        assert np.abs(p_onnx - p_eager).max() <= TOLERANCE
        assert unfamiliarity_difference(u_onnx, u_eager) <= UNFAMILIARITY_TOLERANCE
    assert not list(tmp_path.glob(".*tmp"))  # written atomically: no temporary file left


def test_backend_choice_and_the_missing_onnxruntime_error(tmp_path, synthetic_model, monkeypatch):
    model_dir = tmp_path / "model"
    shutil.copytree(synthetic_model, model_dir)
    monkeypatch.delenv("DEEPFAKE_BACKEND", raising=False)
    quiet = {"notice": lambda _: None}
    # No model.onnx: auto is torch, and asking for onnxruntime says what is missing.
    assert Detector.from_checkpoint(model_dir, **quiet).backend.name == "torch"
    with pytest.raises(UserError, match="model.onnx not found: models trained before the ONNX export"):
        Detector.from_checkpoint(model_dir, backend="onnxruntime", **quiet)
    export_onnx(load_checkpoint(model_dir / "model.pt")[0], model_dir / ONNX_FILE)
    assert Detector.from_checkpoint(model_dir, **quiet).backend.name == "onnxruntime"  # auto, on a CPU
    assert Detector.from_checkpoint(model_dir, backend="torch", **quiet).backend.name == "torch"
    monkeypatch.setenv("DEEPFAKE_BACKEND", "torch")  # what serving and the app read
    assert Detector.from_checkpoint(model_dir, **quiet).backend.name == "torch"
    monkeypatch.delenv("DEEPFAKE_BACKEND")
    # ONNX Runtime not installed (the import system finds no such module): auto falls back, a request fails clearly.
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert Detector.from_checkpoint(model_dir, **quiet).backend.name == "torch"
    with pytest.raises(UserError, match=r"needs the onnxruntime package: pip install 'deepfake-detector\[onnx\]'"):
        Detector.from_checkpoint(model_dir, backend="onnxruntime", **quiet)


def test_predict_and_evaluate_give_the_same_answers_on_both_backends(tmp_path, synthetic_model, synthetic_processed):
    from deepfake_detector import evaluate

    model_dir = tmp_path / "model"
    shutil.copytree(synthetic_model, model_dir)
    export_onnx(load_checkpoint(model_dir / "model.pt")[0], model_dir / ONNX_FILE)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(6):
        synthetic_face(i % 2, 300 + i, 32).save(photos / f"{i}.png")
    rows, metrics = {}, {}
    for backend in ("torch", "onnxruntime"):
        p = with_overrides(Params(), [f"evaluate.backend={backend}", "preprocess.image_size=32"])
        predict_paths(p, [photos], str(model_dir), tmp_path / f"{backend}.csv")
        rows[backend] = list(csv.DictReader((tmp_path / f"{backend}.csv").open()))
        metrics[backend] = evaluate.run(synthetic_processed, model_dir / "model.pt", tmp_path / f"eval-{backend}",
                                        p.evaluate, torch.device("cpu"), seed=0)
    assert [r["predicted"] for r in rows["torch"]] == [r["predicted"] for r in rows["onnxruntime"]]
    assert max(abs(float(a["p_fake"]) - float(b["p_fake"])) for a, b in zip(*rows.values())) <= 1e-4
    for key in ("roc_auc", "accuracy", "threshold", "eer"):
        assert metrics["torch"][key] == pytest.approx(metrics["onnxruntime"][key], abs=1e-4)


@pytest.mark.slow
def test_served_model_scores_with_onnxruntime_when_logged_with_its_export(tmp_path, synthetic_model, monkeypatch):
    """A model logged with its model.onnx, loaded back as the pyfunc MLflow serves: ONNX Runtime scores it."""
    import base64
    import io

    import mlflow
    import pandas as pd

    from deepfake_detector.params import MlflowParams
    from deepfake_detector.tracking import Tracker

    model_dir = tmp_path / "model"
    shutil.copytree(synthetic_model, model_dir)
    export_onnx(load_checkpoint(model_dir / "model.pt")[0], model_dir / ONNX_FILE)
    Decision(threshold=0.5).write(model_dir / "detector.json")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.delenv("DEEPFAKE_BACKEND", raising=False)
    monkeypatch.chdir(tmp_path)
    tracker = Tracker.start(MlflowParams(tracking_uri=uri, experiment="onnx"), "onnx", {}, {})
    buffer = io.BytesIO()
    synthetic_face(1, 5, 32).save(buffer, format="PNG")
    with tracker.running():
        model_uri = tracker.log_model(model_dir / "model.pt", model_dir / "detector.json", buffer.getvalue())
    served = mlflow.pyfunc.load_model(model_uri)
    assert served.unwrap_python_model().detector.backend.name == "onnxruntime"
    out = served.predict(pd.DataFrame({"image": [base64.b64encode(buffer.getvalue()).decode(), "not base64!"]}))
    local = Detector.from_checkpoint(model_dir, backend="torch")
    expected = local.predict(local.prepare(buffer.getvalue()).array[None])[0]
    assert out["p_fake"][0] == pytest.approx(expected, abs=1e-4) and out["error"][1] and out["p_fake"][1] is None


PREDICT_ONE = """
import sys
from deepfake_detector.params import Params
from deepfake_detector.scoring import predict_paths
summary = predict_paths(Params(), [sys.argv[2]], sys.argv[1], sys.argv[3])
print(summary["images"], summary["unreadable"], "torch" in sys.modules)
"""


def test_onnx_runtime_scores_without_importing_torch(tmp_path, synthetic_model, monkeypatch):
    """model.onnx carries the input size, fit and minimum source size: `deepfake predict` on ONNX Runtime
    never imports torch (1.2 s of a one-image run), and gives torch's answer; Grad-CAM loads model.pt then."""
    import subprocess

    model_dir = tmp_path / "model"
    shutil.copytree(synthetic_model, model_dir)
    model, ckpt = load_checkpoint(model_dir / "model.pt")
    export_onnx(model, model_dir / ONNX_FILE, checkpoint={**ckpt, "min_source_size": 7})
    assert OnnxBackend(model_dir / ONNX_FILE).metadata == {"image_size": 32, "fit": ckpt["fit"], "min_source_size": 7}
    synthetic_face(1, 3, 32).save(tmp_path / "face.png")
    monkeypatch.delenv("DEEPFAKE_BACKEND", raising=False)
    out = tmp_path / "preds.csv"
    result = subprocess.run([sys.executable, "-c", PREDICT_ONE, str(model_dir), str(tmp_path / "face.png"), str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-3:] == ["1", "0", "False"]  # scored, and torch never imported
    (row,) = csv.DictReader(out.open())
    torch_detector = Detector.from_checkpoint(model_dir, backend="torch", notice=lambda _: None)
    expected = torch_detector.predict(torch_detector.prepare((tmp_path / "face.png").read_bytes()).array[None])[0]
    assert float(row["p_fake"]) == pytest.approx(float(expected), abs=1e-4)
    # The Decision without detector.json takes the minimum source size from the metadata: a 6 px image is refused.
    onnx_detector = Detector.from_checkpoint(model_dir, notice=lambda _: None)
    assert onnx_detector.backend.name == "onnxruntime" and onnx_detector.decision.min_source_size == 7
    synthetic_face(1, 3, 6).save(tmp_path / "tiny.png")
    with pytest.raises(ValueError, match="too small"):
        onnx_detector.prepare((tmp_path / "tiny.png").read_bytes())
    image = onnx_detector.prepare((tmp_path / "face.png").read_bytes()).array
    assert np.allclose(onnx_detector.explain(image), torch_detector.explain(image), atol=1e-5)
