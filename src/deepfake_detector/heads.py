"""Post-training heads: the network's answer refined or annotated by modules fit after training.

A head is an ``nn.Module`` whose ``forward(x, out)`` maps the input and the outputs so far
(``logits``, ``embedding``, ``stages``, and the heads' before it) to outputs of its own: the spectrum
branch (:mod:`~deepfake_detector.spectrum`) a new ``logits``, the familiarity head
(:mod:`~deepfake_detector.familiarity`) an ``unfamiliarity``. :class:`~deepfake_detector.model.DeepfakeNet`
runs whatever sits in its ``heads`` after the CNN, knowing none of them; the heads know nothing of
the network. This module puts the two together: :func:`build` and :func:`load_checkpoint` attach
the heads a config asks for, :func:`fit_heads` fits them on the best epoch's network. Because they
live in the network, ``model.pt``, the ONNX graph and every scorer carry them.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from deepfake_detector import familiarity, spectrum
from deepfake_detector.errors import UserError
from deepfake_detector.model import DeepfakeNet, build_model, to_input
from deepfake_detector.params import ModelParams

Split = tuple[np.ndarray, np.ndarray, list[str]]  # uint8 NHWC images, labels, source of each


def attach(model: DeepfakeNet) -> DeepfakeNet:
    """``model`` with the (unfitted) heads its config asks for."""
    config = model.config
    if config.spectrum:
        model.heads["spectrum"] = spectrum.SpectrumBranch(model.image_size)
    if config.familiarity != "none":
        model.heads["familiarity"] = familiarity.FamiliarityHead(config.familiarity, config.familiar_features)
    model.heads.to(model.mean.device)  # train attaches them to the network where it trained (CUDA)
    return model


def build(config: ModelParams, image_size: int, pretrained: str | None = None) -> DeepfakeNet:
    """:func:`~deepfake_detector.model.build_model` with the heads of ``config``."""
    return attach(build_model(config, image_size, pretrained))


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> tuple[DeepfakeNet, dict]:
    """Rebuild a model saved by :func:`~deepfake_detector.model.save_checkpoint`, heads included
    (never downloading weights); returns it in eval mode and the checkpoint."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        cfg = dict(ckpt["config"])
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, TypeError, ValueError, zipfile.BadZipFile) as exc:
        why = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path} is not a checkpoint written by train ({type(exc).__name__}: {why})") from None
    cfg.setdefault("arch", "cnn")  # checkpoints from before model.arch existed
    cfg.setdefault("pretrained", "none")
    cfg.setdefault("familiarity", "none")  # models from before the familiarity head have none: no verdict
    cfg.setdefault("familiar_features", "embedding")  # and from before its parts: one density, of the embedding
    state = {("heads." + k if k.startswith("spectrum.") else k): v  # the branch's keys before heads existed
             for k, v in ckpt["state_dict"].items()}
    if "heads.familiarity.means" in state:  # a head of one density, from before its parts
        old = {k: state.pop(k) for k in list(state) if k.startswith("heads.familiarity.")}
        state["heads.familiarity.scale"] = old["heads.familiarity.scale"]  # unfitted: no part, every image familiar
        if old["heads.familiarity.means"].numel() or old["heads.familiarity.bank"].numel():  # fitted: the one part
            state |= {k.replace("heads.familiarity.", "heads.familiarity.parts.0."): v for k, v in old.items()}
            state["heads.familiarity.scale"] = torch.ones_like(old["heads.familiarity.scale"])
    model = build(ModelParams(**{**cfg, "channels": tuple(cfg["channels"])}), ckpt["image_size"], pretrained="none")
    model.load_state_dict(state)
    return model.to(device).eval(), ckpt


@torch.inference_mode()
def batched(fn: Callable[[torch.Tensor], torch.Tensor], images: np.ndarray, device: torch.device,
            batch_size: int) -> np.ndarray:
    """``fn`` of the model input of the uint8 NHWC ``images``, ``batch_size`` at a time, as one float64 array."""
    out = [fn(to_input(torch.from_numpy(np.array(images[i:i + batch_size]))).to(device)).double().cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy()


def fit_heads(model: DeepfakeNet, train: Split, valid: Split, device: torch.device, batch_size: int = 128,
              seed: int = 0) -> dict[str, dict[str, float]]:
    """Fit each head of ``model`` (in eval mode, its best epoch's weights) on the ``train`` split and
    calibrate it on ``valid``; returns each head's figures."""
    from sklearn.metrics import roc_auc_score

    model.eval()
    figures: dict[str, dict[str, float]] = {}
    (x, y, sources), (vx, vy, _) = train, valid
    y, vy = np.asarray(y), np.asarray(vy)
    branch = model.heads["spectrum"] if "spectrum" in model.heads else None
    if branch is not None:
        train_auc = spectrum.fit(branch, batched(branch.features, x, device, batch_size), y)
        score = batched(lambda images: branch.score(images)[0], vx, device, batch_size)

        def cnn_odds(images: torch.Tensor) -> torch.Tensor:
            logits = model.forward_features(images)[0].float()
            return logits[:, 1] - logits[:, 0]

        real = np.flatnonzero(vy == 0)
        spectrum.align(branch, batched(cnn_odds, vx[real], device, batch_size), score[real])
        figures["spectrum"] = {"train_auc": train_auc,
                               "valid_auc": float(roc_auc_score(vy, score)) if len(set(vy)) > 1 else float("nan")}
    head = model.heads["familiarity"] if "familiarity" in model.heads else None
    if head is not None:
        groups = (np.char.add(np.asarray(sources, dtype=str), y.astype(str))
                  if model.config.familiar_groups == "source" else y)
        familiarity.fit(head, vectors(model, head, x, device, batch_size), groups, seed)
        valid = familiarity.calibrate(head, vectors(model, head, vx, device, batch_size),
                                      model.config.unfamiliar_share)
        figures["familiarity"] = {"scale": float(head.scale), "valid_flagged": float(np.mean(valid >= 1))}
    return figures


@torch.inference_mode()
def vectors(model: DeepfakeNet, head: familiarity.FamiliarityHead, images: np.ndarray, device: torch.device,
            batch_size: int) -> list[np.ndarray]:
    """The feature vectors ``head`` measures, of each of the uint8 NHWC ``images``, ``batch_size`` at a time."""
    batches = [[v.double().cpu() for v in head.vectors(model.outputs(
        to_input(torch.from_numpy(np.array(images[i:i + batch_size]))).to(device)))]
        for i in range(0, len(images), batch_size)]
    return [torch.cat(column).numpy() for column in zip(*batches)]
