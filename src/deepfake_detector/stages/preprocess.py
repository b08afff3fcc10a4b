"""The preprocess stage: ``data/raw`` (and the twins stage's ``data/twins``) into memory-mappable splits
in ``data/processed``."""

from __future__ import annotations

from pathlib import Path

from deepfake_detector import preprocess
from deepfake_detector.params import Params


def run(p: Params, raw: Path, out: Path, workers: int | None = None, progress: bool = False,
        twins: Path | None = None) -> dict:
    """Validate, resize and degrade ``raw`` into ``out``, with the twins in ``twins`` as the fake source
    ``twins`` when that stage made them; returns the report written to ``meta.json``."""
    return preprocess.run(Path(raw), Path(out), p.preprocess, p.seed, workers, progress, twins)
