"""The twins stage: autoencoder twins of the real faces in ``data/raw`` into ``data/twins``, which
preprocess takes as one more fake source, ``twins`` (``twins.enabled``; else a marker alone)."""

from __future__ import annotations

import time
from pathlib import Path

from deepfake_detector import twins
from deepfake_detector.device import resolve_device
from deepfake_detector.params import Params


def run(p: Params, raw: Path, out: Path) -> dict:
    """Fit the autoencoder on ``raw``'s train reals and write every real's twin into ``out`` (when
    ``twins.enabled``); returns the record written to ``out/twins.json``, plus ``seconds``."""
    start = time.perf_counter()
    device = resolve_device(p.twins.device, key="twins.device")
    record = twins.run(Path(raw), Path(out), p.twins, p.preprocess.split_ratios, p.seed, device,
                       on_epoch=lambda epoch, l1: print(f"twins epoch {epoch}/{p.twins.epochs}: L1 {l1:.2f} (0-255)",
                                                        flush=True))
    return {**record, "seconds": round(time.perf_counter() - start, 1)}
