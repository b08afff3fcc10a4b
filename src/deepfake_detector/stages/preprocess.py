"""The preprocess stage: ``data/raw`` into memory-mappable splits in ``data/processed``."""

from __future__ import annotations

from pathlib import Path

from deepfake_detector import preprocess
from deepfake_detector.params import Params


def run(p: Params, raw: Path, out: Path, workers: int | None = None, progress: bool = False) -> dict:
    """Validate, resize and degrade ``raw`` into ``out``; returns the report written to ``meta.json``."""
    return preprocess.run(Path(raw), Path(out), p.preprocess, p.seed, workers, progress)
