"""Which device a stage runs on: one small decision that training, evaluation and scoring share."""

from __future__ import annotations

import torch

from deepfake_detector.distributed import SINGLE, World
from deepfake_detector.errors import UserError


def resolve_device(name: str, world: World = SINGLE, key: str = "train.device") -> torch.device:
    """``auto`` picks CUDA when present (this rank's GPU under torchrun), else CPU; an explicit
    CUDA request without CUDA is an error naming the param ``key``."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", world.local_rank)
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{key} is {name!r} but CUDA is not available; use 'auto' or 'cpu'")
    if device.type == "cuda" and world.distributed:
        return torch.device("cuda", world.local_rank)
    return device


def auto_processes(name: str) -> int:
    """How many training processes ``train.device`` asks for: every GPU for ``auto``, else one."""
    return torch.cuda.device_count() if name == "auto" and torch.cuda.is_available() else 1
