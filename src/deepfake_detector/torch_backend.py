"""The torch side of inference (:mod:`~deepfake_detector.backends`): the trained network as an
inference graph (batch norm folded into the convolution before it, ``channels_last``,
``torch.inference_mode``, autocast on CUDA), and its ONNX export. Training never goes through here.
"""

from __future__ import annotations

import contextlib
import copy
import io
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from deepfake_detector.atomic import replacing_file
from deepfake_detector.backends import OUTPUTS, OnnxBackend, Outputs, onnxruntime_installed, scoring_metadata
from deepfake_detector.model import to_input

TOLERANCE = 1e-4  # largest P(fake) difference an export may show against PyTorch
# and unfamiliarity difference: a thousandth of the flagging distance (a distance near the train
# embeddings is a difference of close numbers: float32 rounding is magnified there), or of the value
# itself beyond it (float32 keeps about 7 digits: a far image's 1,332 differs in the third decimal)
UNFAMILIARITY_TOLERANCE = 1e-3


def p_fake_difference(got: np.ndarray, expected: np.ndarray) -> float:
    """The largest difference between two backends' P(fake), to hold to :data:`TOLERANCE`."""
    return float(np.abs(got - expected).max())


def unfamiliarity_difference(got: np.ndarray, expected: np.ndarray) -> float:
    """The largest difference between two backends' unfamiliarity, to hold to
    :data:`UNFAMILIARITY_TOLERANCE`: as is up to the flagging distance (1), relative beyond it."""
    return float((np.abs(got - expected) / np.maximum(np.abs(expected), 1)).max())


class Scorer(nn.Module):
    """uint8 NHWC images to P(fake) and, with a familiarity head, the unfamiliarity: what both backends
    run (and what is exported to ONNX, as its outputs :data:`~deepfake_detector.backends.OUTPUTS`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.familiarity = "familiarity" in model.heads

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        out = self.model.outputs(to_input(images))
        p_fake = torch.softmax(out["logits"].float(), dim=1)[:, 1]
        return (p_fake, out["unfamiliarity"].float()) if self.familiarity else p_fake


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
    def __call__(self, images: np.ndarray) -> Outputs:
        # NHWC uint8 permuted to NCHW is already channels_last in memory: no copy on the way in.
        with torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
            return outputs(self.scorer(torch.from_numpy(images).to(self.device)))


def outputs(scored: torch.Tensor | tuple[torch.Tensor, ...]) -> Outputs:
    """A :class:`Scorer`'s answer as the backends' (P(fake), unfamiliarity or None)."""
    p_fake, *rest = scored if isinstance(scored, tuple) else (scored,)
    return p_fake.cpu().numpy(), rest[0].cpu().numpy() if rest else None


def export_onnx(model: nn.Module, path: Path, images: np.ndarray | None = None, checkpoint: dict | None = None
                ) -> dict:
    """Write ``model`` as ONNX to ``path`` (uint8 NHWC images in, P(fake) out and, with a familiarity
    head, the unfamiliarity; any batch size), with
    its :func:`~deepfake_detector.backends.scoring_metadata` (from ``checkpoint``, model.pt's extras),
    atomically; where ONNX Runtime is installed, check it against PyTorch on ``images`` (uint8 NHWC)
    and refuse an export whose outputs differ by more than :data:`TOLERANCE`.

    Returns ``{"checked": n images, "max_abs_diff": float or None}``.
    """
    import onnx  # the export's, not the scoring path's: serving needs no onnx package

    size = model.image_size
    scorer = Scorer(copy.deepcopy(model).cpu().float()).eval()
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1)
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter's progress chatter
        program = torch.onnx.export(scorer, (example,), dynamo=True, input_names=["images"],
                                    output_names=list(OUTPUTS[:2 if scorer.familiarity else 1]),
                                    dynamic_shapes=({0: batch},))
    proto = program.model_proto
    proto.metadata_props.extend(onnx.StringStringEntryProto(key=k, value=str(v))
                                for k, v in scoring_metadata(size, checkpoint or {}).items())
    with replacing_file(Path(path), "wb") as f:
        f.write(proto.SerializeToString())
    if images is None or len(images) == 0 or not onnxruntime_installed():
        return {"checked": 0, "max_abs_diff": None}
    with torch.inference_mode():
        # A copy: the train stage passes a read-only memmap, which torch.from_numpy warns about.
        expected = outputs(scorer(torch.from_numpy(np.array(images))))
    got = OnnxBackend(Path(path))(images)
    diffs = [difference(g, e) if e is not None and g is not None else (0.0 if g is e else np.inf)
             for difference, g, e in zip((p_fake_difference, unfamiliarity_difference), got, expected)]
    for name, diff, allowed in zip(OUTPUTS, diffs, (TOLERANCE, UNFAMILIARITY_TOLERANCE)):
        if diff > allowed:
            Path(path).unlink()
            raise RuntimeError(f"the ONNX export of the model gives {name} up to {diff:.2e} away from PyTorch "
                               f"(allowed {allowed}{', of the value beyond 1' if name != OUTPUTS[0] else ''}):"
                               " not kept")
    return {"checked": len(images), "max_abs_diff": diffs[0]}
