"""Inference backends: how a :class:`~deepfake_detector.detector.Detector` turns prepared images into P(fake).

Both take a uint8 NHWC batch, as preprocess stores images and predict prepares them, and return
P(fake) per image and, for a model with a familiarity head, its unfamiliarity (else None):
- ``torch``: the trained network as an inference graph (:mod:`~deepfake_detector.torch_backend`).
- ``onnxruntime``: ``model.onnx``, exported beside ``model.pt`` by the train stage (scaling, the
  network and the softmax in one graph), run by ONNX Runtime (the ``onnx`` extra).
``auto`` is ONNX Runtime on a CPU where it is installed and the model has its ONNX file, else torch.

This module does not import torch: importing it takes longer (1.2 s on 2 cores) than scoring an
image, and the ONNX file carries what scoring needs besides the graph (:data:`METADATA`), so a
``deepfake predict`` on ONNX Runtime never loads it.
"""

from __future__ import annotations

import glob
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from deepfake_detector.errors import UserError

ONNX_FILE = "model.onnx"  # beside model.pt
DECISION_FILE = "detector.json"  # the decision settings (threshold, ...) the evaluate stage chose for a model
# What model.pt records for scoring besides the weights, also written into model.onnx's metadata.
METADATA: dict[str, type] = {"image_size": int, "fit": str, "min_source_size": int}
OUTPUTS = ("p_fake", "unfamiliarity")  # the ONNX graph's outputs: the second only with a familiarity head
Outputs = tuple[np.ndarray, "np.ndarray | None"]  # P(fake) and unfamiliarity (None without the head) per image


def scoring_metadata(image_size: int, checkpoint: dict) -> dict[str, Any]:
    """:data:`METADATA` of a model of ``image_size`` saved as ``checkpoint`` (model.pt's extras; models
    saved before ``fit`` and ``min_source_size`` were recorded get what they were trained with)."""
    return {"image_size": image_size, "fit": checkpoint.get("fit", "resize"),
            "min_source_size": checkpoint.get("min_source_size", 1)}


class OnnxBackend:
    name = "onnxruntime"

    def __init__(self, path: Path, cuda: bool = False, threads: int | None = None) -> None:
        ort = import_onnxruntime()
        options = ort.SessionOptions()
        # ONNX Runtime's default, a thread per physical core of the machine, oversubscribes a process
        # pinned to fewer (a container's cpuset): then one per core it may use.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
        options.intra_op_num_threads = threads or (cores if cores < (os.cpu_count() or 0) else 0)
        providers = ["CPUExecutionProvider"]
        if cuda and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.input = self.session.get_inputs()[0].name
        found = self.session.get_modelmeta().custom_metadata_map
        # Exports made before the metadata have none: the Detector then reads model.pt.
        self.metadata: dict[str, Any] = {k: kind(found[k]) for k, kind in METADATA.items() if k in found}

    def __call__(self, images: np.ndarray) -> Outputs:
        p_fake, *rest = self.session.run(None, {self.input: np.ascontiguousarray(images)})
        return p_fake, rest[0] if rest else None


def import_onnxruntime():
    try:
        import onnxruntime
    except ModuleNotFoundError:
        raise UserError("the onnxruntime backend needs the onnxruntime package: "
                        "pip install 'deepfake-detector[onnx]' (or use the torch backend)") from None
    return onnxruntime


def onnxruntime_installed() -> bool:
    try:
        import_onnxruntime()
    except UserError:
        return False
    return True


def cuda_present() -> bool:
    """Whether CUDA is available, asking torch only where an NVIDIA device node exists: on Linux the
    driver exposes /dev/nvidia0.. (WSL2: /dev/dxg), and without one torch finds no CUDA either."""
    if sys.platform == "linux" and not (glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/dxg")):
        return False
    import torch

    return torch.cuda.is_available()


def open_onnx(backend: str, onnx_path: Path | None, device: Any = None) -> OnnxBackend | None:
    """ONNX Runtime's session of ``onnx_path`` when ``backend`` picks it, else None (torch scores).

    ``auto`` picks it on a CPU (``device``, a ``torch.device``; None: the CPU unless CUDA is
    present) where ONNX Runtime is installed and the model has ``onnx_path``; the environment
    variable DEEPFAKE_BACKEND overrides ``auto``."""
    backend = os.environ.get("DEEPFAKE_BACKEND", backend) if backend == "auto" else backend
    has_onnx = onnx_path is not None and Path(onnx_path).is_file()
    if backend not in ("auto", "torch", "onnxruntime"):
        raise UserError(f"backend must be one of auto, torch, onnxruntime, got {backend!r}")
    if backend == "torch" or backend == "auto" and not (has_onnx and onnxruntime_installed()):
        return None
    cuda = device.type == "cuda" if device is not None else cuda_present()
    if backend == "auto" and cuda:
        return None
    import_onnxruntime()
    if not has_onnx:
        raise UserError(f"{onnx_path or ONNX_FILE} not found: models trained before the ONNX export have none; "
                        "train again or use the torch backend")
    return OnnxBackend(Path(onnx_path), cuda)
