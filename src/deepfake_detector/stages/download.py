"""The download stage: ``data.source`` into ``data/raw``."""

from __future__ import annotations

from pathlib import Path

from deepfake_detector import data
from deepfake_detector.params import Params


def run(p: Params, out: Path) -> dict:
    """Fetch ``data.source`` into ``out``; returns the source info and file counts."""
    return data.download(p.data.source, Path(out), p.data.sha256, p.download.timeout_s, p.download.retries,
                         limits=p.download)
