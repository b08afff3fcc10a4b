"""benchmarks/resynth.py: each real face gets one re-synthesised twin, in its own split, usable as a source."""

from __future__ import annotations

import json
import sys

import numpy as np
from PIL import Image

from conftest import benchmark_module, make_dataset
from deepfake_detector.data import SPLITS
from deepfake_detector.sources import list_images

SIZE = 48


def test_every_real_gets_a_twin_in_its_own_split(tmp_path, monkeypatch):
    source = make_dataset(tmp_path / "faces", per_class=4, size=SIZE, nested=False)
    out = tmp_path / "resynth"
    monkeypatch.setattr(sys, "argv", ["resynth.py", "--source", str(source), "--out", str(out), "--size", str(SIZE),
                                      "--stages", "1", "--latent", "32", "--epochs", "150", "--lr", "3e-3",
                                      "--upsample", "bilinear"])
    benchmark_module("resynth").main()

    twins = list_images(out, (0.8, 0.1, 0.1))
    assert all(e.label == 1 for e in twins)  # a fakes-only source, split as the reals were
    for split in SPLITS:
        reals = sorted((source / split / "real").iterdir())
        mine = sorted(e.path for e in twins if e.split == split)
        assert [p.name for p in mine] == [p.name for p in reals]
        real = np.stack([np.asarray(Image.open(p), dtype=np.float64) for p in reals])
        fake = np.stack([np.asarray(Image.open(p), dtype=np.float64) for p in mine])
        assert fake.shape == real.shape == (4, SIZE, SIZE, 3)
        # A reconstruction of its own face: nearer to it than to any other real of the split.
        distance = np.abs(fake[:, None] - real[None]).mean((2, 3, 4))
        assert (distance.argmin(1) == np.arange(4)).all(), distance
        assert not np.array_equal(fake, real)
    recipe = json.loads((out / "resynth.json").read_text())
    assert recipe["upsample"] == "bilinear" and set(recipe["l1_per_split"]) == set(SPLITS)
