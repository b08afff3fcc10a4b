"""Score image files with a trained model, preprocessed exactly as training data was."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from deepfake_detector.evaluate import predict_proba
from deepfake_detector.preprocess import load_image


def predict_files(model: torch.nn.Module, paths: list[Path], image_size: int, batch_size: int = 64,
                  device: torch.device | None = None) -> tuple[np.ndarray, dict[Path, str], list[int]]:
    """P(fake) for each readable file, the reason for each file skipped, and the readable indices.

    Decoding, RGB conversion and resizing are :func:`preprocess.load_image`, the code that built
    the training arrays; no blur or noise is applied, as for the valid and test splits.
    """
    device = device or torch.device("cpu")
    images, errors, kept = [], {}, []
    for i, path in enumerate(paths):
        try:
            images.append(load_image(Path(path), image_size, min_source_size=1)[0])
            kept.append(i)
        except ValueError as exc:
            errors[Path(path)] = str(exc)
    batch = np.stack(images) if images else np.zeros((0, image_size, image_size, 3), np.uint8)
    return predict_proba(model.to(device), batch, batch_size, device), errors, kept
