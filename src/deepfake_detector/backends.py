"""Inference backends: how a :class:`~deepfake_detector.detector.Detector` turns prepared images into P(fake).

Both take a uint8 NHWC batch, as preprocess stores images and predict prepares them, and return
P(fake) per image:
- ``torch``: the trained network as an inference graph: batch norm folded into the convolution
  before it, ``channels_last``, ``torch.inference_mode``, autocast on CUDA.
- ``onnxruntime``: ``model.onnx``, exported beside ``model.pt`` by the train stage (scaling, the
  network and the softmax in one graph), run by ONNX Runtime (the ``onnx`` extra).
``auto`` is ONNX Runtime on a CPU where it is installed and the model has its ONNX file, else torch.
Training never goes through here.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from deepfake_detector.atomic import replacing_file
from deepfake_detector.errors import UserError
from deepfake_detector.model import to_input

ONNX_FILE = "model.onnx"  # beside model.pt
TOLERANCE = 1e-4  # largest P(fake) difference an export may show against PyTorch


class Scorer(nn.Module):
    """uint8 NHWC images to P(fake): what both backends run (and what is exported to ONNX)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(to_input(images)).float(), dim=1)[:, 1]


def fold_batch_norm(model: nn.Module, image_size: int) -> nn.Module:
    """A copy of the eval-mode ``model`` in which every BatchNorm2d that reads a convolution's output
    directly has been folded into that convolution's weight and bias (and replaced by Identity).

    The pairs are found by running one batch and matching tensors (the BN's input *is* the conv's
    output), so it holds for any arch without knowing its layout.
    """
    model = copy.deepcopy(model).eval()
    last: dict[str, tuple[nn.Module, torch.Tensor]] = {}
    pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d]] = []

    def conv_hook(module, inputs, output):
        last["conv"] = (module, output)

    def bn_hook(module, inputs, output):
        conv = last.get("conv")
        if conv is not None and inputs[0] is conv[1] and module.track_running_stats:
            pairs.append((conv[0], module))

    handles = [m.register_forward_hook(conv_hook if isinstance(m, nn.Conv2d) else bn_hook)
               for m in model.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    with torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device))
    for handle in handles:
        handle.remove()
    parents = {id(child): (parent, name) for parent in model.modules() for name, child in parent.named_children()}
    for conv, bn in pairs:
        conv.weight, conv.bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var,
                                                      bn.eps, bn.weight, bn.bias)
        parent, name = parents[id(bn)]
        setattr(parent, name, nn.Identity())
    return model


class TorchBackend:
    name = "torch"

    def __init__(self, model: nn.Module, image_size: int, device: torch.device, fold: bool = True,
                 channels_last: bool = True) -> None:
        graph = fold_batch_norm(model, image_size) if fold else model
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.device, self.scorer = device, Scorer(graph).to(device, memory_format=fmt).eval()

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        # NHWC uint8 permuted to NCHW is already channels_last in memory: no copy on the way in.
        with torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
            return self.scorer(torch.from_numpy(images).to(self.device)).cpu().numpy()


class OnnxBackend:
    name = "onnxruntime"

    def __init__(self, path: Path, device: torch.device, threads: int | None = None) -> None:
        ort = import_onnxruntime()
        options = ort.SessionOptions()
        # ONNX Runtime's own default (one thread per core) is right except under a CPU quota: follow torch.
        options.intra_op_num_threads = threads or torch.get_num_threads()
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.input = self.session.get_inputs()[0].name

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: np.ascontiguousarray(images)})[0]


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


def choose(backend: str, onnx_path: Path | None, device: torch.device) -> str:
    """``torch`` or ``onnxruntime`` for ``backend`` (``auto``: ONNX Runtime on a CPU where it is installed
    and the model has ``onnx_path``); the environment variable DEEPFAKE_BACKEND overrides ``auto``."""
    backend = os.environ.get("DEEPFAKE_BACKEND", backend) if backend == "auto" else backend
    has_onnx = onnx_path is not None and onnx_path.is_file()
    if backend == "auto":
        return "onnxruntime" if device.type == "cpu" and has_onnx and onnxruntime_installed() else "torch"
    if backend not in ("torch", "onnxruntime"):
        raise UserError(f"backend must be one of auto, torch, onnxruntime, got {backend!r}")
    if backend == "onnxruntime":
        import_onnxruntime()
        if not has_onnx:
            raise UserError(f"{onnx_path or ONNX_FILE} not found: models trained before the ONNX export have none; "
                            "train again or use the torch backend")
    return backend


def export_onnx(model: nn.Module, path: Path, images: np.ndarray | None = None) -> dict:
    """Write ``model`` as ONNX to ``path`` (uint8 NHWC images in, P(fake) out, any batch size),
    atomically; where ONNX Runtime is installed, check it against PyTorch on ``images`` (uint8 NHWC)
    and refuse an export whose P(fake) differs by more than :data:`TOLERANCE`.

    Returns ``{"checked": n images, "max_abs_diff": float or None}``.
    """
    size = model.image_size
    scorer = Scorer(copy.deepcopy(model).cpu().float().eval())
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1)
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter's progress chatter
        program = torch.onnx.export(scorer, (example,), dynamo=True, input_names=["images"], output_names=["p_fake"],
                                    dynamic_shapes=({0: batch},))
    with replacing_file(Path(path), "wb") as f:
        f.write(program.model_proto.SerializeToString())
    if images is None or len(images) == 0 or not onnxruntime_installed():
        return {"checked": 0, "max_abs_diff": None}
    with torch.inference_mode():
        expected = scorer(torch.from_numpy(np.ascontiguousarray(images))).numpy()
    got = OnnxBackend(Path(path), torch.device("cpu"))(images)
    diff = float(np.abs(got - expected).max())
    if diff > TOLERANCE:
        Path(path).unlink()
        raise RuntimeError(f"the ONNX export of the model gives P(fake) up to {diff:.2e} away from PyTorch "
                           f"(allowed {TOLERANCE}): not kept")
    return {"checked": len(images), "max_abs_diff": diff}
