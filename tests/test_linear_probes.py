"""benchmarks/linear_probes.py on tiny synthetic sources whose answers are known."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, make_dataset, synthetic_face

pytestmark = pytest.mark.slow  # runs the benchmark end to end (about 30 s on 2 busy cores)

SIZE = 64


def weak_fakes(root: Path, splits: tuple[str, ...], per_split: int) -> None:
    """Fakes-only source: real-like faces with the fakes' checkerboard at 2/5 of its amplitude."""
    checker = (np.indices((SIZE, SIZE)).sum(0) % 2)[..., None] - 0.5
    for s, split in enumerate(splits):
        (root / split / "fake").mkdir(parents=True)
        for i in range(per_split):
            face = np.asarray(synthetic_face(0, 5000 + 1000 * s + i, SIZE), dtype=np.float64) + 10 * checker
            # JPEG as make_dataset saves: a file format of its own would be a tell of its own.
            Image.fromarray(np.clip(face, 0, 255).astype(np.uint8)).save(root / split / "fake" / f"{i}.jpg",
                                                                         quality=95)


def test_linear_probes_find_a_trace_and_carry_it_to_the_source_left_out(tmp_path):
    # gan: reals and fakes with a one-pixel checkerboard; weak: fakes only, the checkerboard fainter;
    # late: train fakes only, so it is fit on but has nothing to score.
    gan = make_dataset(tmp_path / "gan", per_class=16, size=SIZE, nested=False)
    weak_fakes(tmp_path / "weak", ("train", "valid"), 16)
    weak_fakes(tmp_path / "late", ("train",), 4)
    sources = f"{{gan: {gan}, weak: {tmp_path / 'weak'}, late: {tmp_path / 'late'}}}"
    result = subprocess.run([sys.executable, "benchmarks/linear_probes.py", "--sources", sources,
                             "--image-size", "32", "--C", "0.1", "1", "--batch-size", "16", "--threads", "2",
                             "--json", str(tmp_path / "probes.json")],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads((tmp_path / "probes.json").read_text())
    # Test images are never read: 16 per class and split in train and valid only.
    assert figures["images"] == {"train": {"real": 16, "gan": 16, "weak": 16, "late": 4},
                                 "valid": {"real": 16, "gan": 16, "weak": 16, "late": 0}}
    assert figures["notes"] == ["late: no valid fakes, not scored (its train fakes are still fit on)"]
    rows = {(r["features"], r["C"]): r for r in figures["rows"]}
    quarters = ["blocks0-3", "blocks4-7", "blocks8-11", "blocks12-15"]  # Lite0 has 16 blocks
    names = [f"{mode}-{g}" for mode in ("rgb", "residual") for g in ("all", "last", *quarters)]
    assert set(rows) == {(n, c) for n in [*names, "spectrum", "spectrum-high", "phase", "spectrum+phase"]
                         for c in (0.1, 1.0)}
    assert rows["rgb-last", 0.1]["dims"] == 1280 and rows["phase", 0.1]["dims"] == 64
    for r in rows.values():
        assert set(r["both"]) == set(r["held_out"]) == {"gan", "weak"}
        assert r["held_out_mean"] == pytest.approx(np.mean(list(r["held_out"].values())))
    for c in (0.1, 1.0):
        spectrum = rows["spectrum", c]
        # Both checkerboards show in the spectrum (at 256 px, upsampled from 64): seen in training, each is found.
        assert min(spectrum["both"].values()) >= 0.9, spectrum
        # Fit on the faint checkerboard alone, the strong one (never seen) lies further along the same direction.
        assert spectrum["held_out"]["gan"] >= 0.9, spectrum
    assert "| spectrum | 182 | 0.1 |" in result.stdout and "note: late: no valid fakes" in result.stdout
