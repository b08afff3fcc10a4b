"""The detector: a plain CNN of conv blocks, pooling, dropout and a fully connected head.

Input is a float batch (N, 3, S, S) in [0, 1]; normalisation lives inside the model so that
prediction code only has to resize and scale. Output is two logits (real, fake); softmax of
them is the class probability.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from deepfake_detector.checkpoint import atomic_save
from deepfake_detector.params import ModelParams


class DeepfakeCNN(nn.Module):
    def __init__(self, config: ModelParams, image_size: int) -> None:
        super().__init__()
        self.config, self.image_size = config, image_size
        # Fixed scaling to roughly zero mean, unit spread; buffers move with .to(device) and are saved.
        self.register_buffer("mean", torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.25, 0.25, 0.25]).view(1, 3, 1, 1))
        layers: list[nn.Module] = []
        in_ch = 3
        for out_ch in config.channels:
            for _ in range(config.convs_per_block):
                layers.append(nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=not config.batch_norm))
                if config.batch_norm:
                    layers.append(nn.BatchNorm2d(out_ch))
                layers.append(nn.ReLU(inplace=True))
                in_ch = out_ch
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        # Global average pooling keeps the head's size independent of the input resolution.
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(config.dropout),
            nn.Linear(in_ch, config.hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden, 2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features((x - self.mean) / self.std)))


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC batch (as stored by preprocess) to the model's float NCHW input in [0, 1]."""
    return images.permute(0, 3, 1, 2).float().div_(255.0)


def save_checkpoint(model: DeepfakeCNN, path: Path, state_dict: dict | None = None, **extra: object) -> None:
    """Weights (``state_dict``, else the model's own) plus everything needed to rebuild the model,
    without pickling code; written atomically, so a reader never sees half a file."""
    atomic_save({"config": asdict(model.config), "image_size": model.image_size,
                 "state_dict": model.state_dict() if state_dict is None else state_dict, **extra}, path)


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> tuple[DeepfakeCNN, dict]:
    """Rebuild a model saved by :func:`save_checkpoint`; returns it in eval mode and the checkpoint."""
    ckpt = torch.load(path, map_location=device, weights_only=True)
    cfg = ckpt["config"]
    model = DeepfakeCNN(ModelParams(**{**cfg, "channels": tuple(cfg["channels"])}), ckpt["image_size"])
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval(), ckpt
