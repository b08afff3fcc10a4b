"""The twins stage: every real face of every source gets an autoencoder twin at its own size, in its
own split, that preprocess takes as the fake source ``twins``; seeded, byte-identical reruns on the
CPU; and under DVC, rerun only when its params or data change, with its outputs cached."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, make_dataset, synthetic_face
from deepfake_detector.data import SPLITS, DataError
from deepfake_detector.params import Params, with_overrides
from deepfake_detector.sources import list_images
from deepfake_detector.stages import download, preprocess, twins
from deepfake_detector.twins import _batches

RATIOS = "[0.5, 0.25, 0.25]"  # not preprocess's default: the twins must follow the param, not a copy of it
TINY = ["twins.enabled=true", "twins.epochs=120", "twins.lr=0.03", "twins.crop=16", "twins.device=cpu",
        f"preprocess.split_ratios={RATIOS}", "preprocess.image_size=32", "preprocess.min_source_size=16"]


def make_sources(root: Path) -> dict[str, Path]:
    """Three sources as data.source names them: ``split`` (the 140k layout, 32 px), ``unsplit`` (reals
    alone, 31 x 27 px: no multiple of 2^stages, one file that is no image) and ``fakes`` (fakes alone)."""
    unsplit, fakes = root / "unsplit" / "real", root / "fakes" / "fake"
    unsplit.mkdir(parents=True)
    fakes.mkdir(parents=True)
    for i in range(12):
        synthetic_face(0, 500 + i, 31).crop((0, 0, 31, 27)).save(unsplit / f"{i:02d}.png")
    (unsplit / "broken.jpg").write_text("not an image")
    for i in range(3):
        synthetic_face(1, 700 + i, 32).save(fakes / f"{i}.png")
    return {"split": make_dataset(root / "split", per_class=3, size=32, nested=False), "unsplit": unsplit.parent,
            "fakes": fakes.parent}


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """The three sources as the download stage lands them in data/raw."""
    root = tmp_path_factory.mktemp("twins")
    sources = make_sources(root / "sources")
    mapping = "{" + ", ".join(f"{name}: {path}" for name, path in sources.items()) + "}"
    download.run(with_overrides(Params(), [f"data.source={mapping}"]), root / "raw")
    return root / "raw"


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_every_real_gets_a_twin_in_its_own_split_at_its_own_size(raw, tmp_path):
    p = with_overrides(Params(), TINY)
    record = twins.run(p, raw, tmp_path / "twins")
    ratios = p.preprocess.split_ratios
    reals = {name: [e for e in list_images(raw / name, ratios) if e.label == 0 and e.path.name != "broken.jpg"]
             for name in ("split", "unsplit")}
    assert record["twins"] == {name: {split: sum(e.split == split for e in entries) for split in SPLITS}
                               for name, entries in reals.items()}  # the fakes-only source has no reals
    assert record["unreadable"] == 1 and set(record["l1_per_split"]) == set(SPLITS)
    made = list_images(tmp_path / "twins", ratios)
    assert all(e.label == 1 for e in made) and len(made) == sum(len(e) for e in reals.values())
    for name, entries in reals.items():
        for split in SPLITS:
            mine = [e for e in entries if e.split == split]  # split as preprocess splits it (the hash, at RATIOS)
            real = np.stack([np.asarray(Image.open(e.path).convert("RGB"), dtype=np.float64) for e in mine])
            fake = np.stack([np.asarray(Image.open(tmp_path / "twins" / split / "fake" / f"{name}.{e.path.name}.jpg"),
                                        dtype=np.float64) for e in mine])
            assert fake.shape == real.shape  # each at its real's own size: 32 x 32, and 31 x 27
            # A reconstruction of its own face: nearer to it than to any other real of the split.
            distance = np.abs(fake[:, None] - real[None]).mean((2, 3, 4))
            assert (distance.argmin(1) == np.arange(len(mine))).all(), distance
            assert not np.array_equal(fake, real)

    # Preprocess takes them as the fake source `twins`, each twin in the split of its real.
    meta = preprocess.run(p, raw, tmp_path / "processed", workers=1, twins=tmp_path / "twins")
    assert meta["sources"] == ["split", "unsplit", "fakes", "twins"]
    assert meta["twins"] == {k: v for k, v in record.items() if k != "seconds"}
    for split in SPLITS:
        with (tmp_path / "processed" / split / "index.csv").open() as f:
            rows = list(csv.DictReader(f))
        twin_rows = [r for r in rows if r["source"] == "twins"]
        assert all(r["label"] == "1" for r in twin_rows)
        assert {tuple(Path(r["path"]).name.removesuffix(".jpg").split(".", 1)) for r in twin_rows} == {
            (r["source"], Path(r["path"]).name) for r in rows if r["source"] in reals and r["label"] == "0"}


def test_twins_are_seeded_and_rerun_byte_identical_on_the_cpu(raw, tmp_path):
    """Whole images (crop 0) of two sizes, so batches of one shape each: the same bytes twice, and
    other bytes for another seed."""
    p = with_overrides(Params(), [*TINY, "twins.crop=0", "twins.epochs=3"])
    for name, params in (("a", p), ("b", p), ("seed1", with_overrides(p, ["seed=1"]))):
        twins.run(params, raw, tmp_path / name)
    first = files(tmp_path / "a")
    assert first == files(tmp_path / "b")
    other = files(tmp_path / "seed1")
    assert other.keys() == first.keys() and other != first


def test_disabled_writes_a_marker_alone_and_preprocess_adds_no_source(raw, tmp_path):
    p = with_overrides(Params(), [f"preprocess.split_ratios={RATIOS}", "preprocess.image_size=32",
                                  "preprocess.min_source_size=16"])
    assert twins.run(p, raw, tmp_path / "twins")["enabled"] is False
    assert files(tmp_path / "twins") == {"twins.json": b'{\n  "enabled": false\n}\n'}
    meta = preprocess.run(p, raw, tmp_path / "processed", workers=1, twins=tmp_path / "twins")
    assert meta["sources"] == ["split", "unsplit", "fakes"] and "twins" not in meta


def test_a_source_named_twins_is_refused_when_twins_are_made(raw, tmp_path):
    twins.run(with_overrides(Params(), TINY + ["twins.epochs=1"]), raw, tmp_path / "twins")
    renamed = tmp_path / "raw"
    shutil.copytree(raw, renamed)
    (renamed / "split").rename(renamed / "twins")
    listing = json.loads((renamed / "sources.json").read_text())
    (renamed / "sources.json").write_text(json.dumps({("twins" if k == "split" else k): v for k, v in listing.items()}))
    with pytest.raises(DataError, match="a source named 'twins'"):
        preprocess.run(with_overrides(Params(), TINY), renamed, tmp_path / "processed", workers=1,
                       twins=tmp_path / "twins")


def test_batches_hold_one_shape_each_and_cover_every_image_once():
    shapes = [(32, 32)] * 21 + [(27, 31)] * 9
    batches = list(_batches(shapes, 8, torch.Generator().manual_seed(0)))
    assert sorted(i for b in batches for i in b) == list(range(30))
    assert all(len({shapes[i] for i in b}) == 1 and len(b) <= 8 for b in batches)
    # One shape: the permutation cut in order, as benchmarks/resynth.py drew them: twins.crop=0 makes its twins.
    assert list(_batches([(4, 4)] * 20, 8, torch.Generator().manual_seed(0))) == [
        chunk.tolist() for chunk in torch.randperm(20, generator=torch.Generator().manual_seed(0)).split(8)]


# --- under DVC ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_dvc_reruns_twins_only_when_its_params_or_data_change_and_caches_it(tmp_path):
    from test_kubeflow import git_env
    from test_pipeline import PROJECT_FILES, ran_stages, set_params, sh

    env, repo = git_env(), tmp_path / "project"
    for name in PROJECT_FILES:
        src, dst = ROOT / name, repo / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__")) if src.is_dir()
         else shutil.copy(src, dst))
    source = make_dataset(tmp_path / "faces", per_class=3, size=32)
    set_params(repo, {("data", "source"): str(source), ("twins", "enabled"): True, ("twins", "epochs"): 2,
                      ("twins", "crop"): 16, ("twins", "device"): "cpu", ("preprocess", "image_size"): 32,
                      ("preprocess", "min_source_size"): 16})
    sh(["git", "init", "-q", "-b", "main"], repo, env)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "project"], repo, env)
    repro = lambda: sh(["dvc", "repro", "preprocess"], repo, env).stdout  # noqa: E731  (no training)

    assert ran_stages(repro()) == ["download", "twins", "preprocess"]
    meta = json.loads((repo / "data" / "processed" / "meta.json").read_text())
    assert meta["sources"] == ["real-vs-fake", "twins"] and meta["splits"]["train"]["fake"] == 6
    made = files(repo / "data" / "twins")
    assert ran_stages(repro()) == []
    set_params(repo, {("train", "epochs"): 3})  # another stage's param
    assert ran_stages(repro()) == []
    set_params(repo, {("preprocess", "image_size"): 24})  # a param of preprocess alone
    assert ran_stages(repro()) == ["preprocess"]
    set_params(repo, {("twins", "quality"): 50})
    assert ran_stages(repro()) == ["twins", "preprocess"] and files(repo / "data" / "twins") != made
    # Back to quality 75: both outputs come from DVC's run cache, nothing runs.
    set_params(repo, {("twins", "quality"): 75})
    out = repro()
    assert ran_stages(out) == [] and "Stage 'twins' is cached" in out and files(repo / "data" / "twins") == made
    # Rerun by force, the stage writes the same bytes: preprocess stays up to date.
    assert ran_stages(sh(["dvc", "repro", "-f", "-s", "twins"], repo, env).stdout) == ["twins"]
    assert "up to date" in sh(["dvc", "status", "preprocess"], repo, env).stdout
    # New data: one more real face reruns download (forced: a folder source is not a DVC dependency), then twins.
    synthetic_face(0, 99, 32).save(source / "train" / "real" / "new.jpg")
    sh(["dvc", "repro", "-f", "-s", "download"], repo, env)
    assert ran_stages(repro()) == ["twins", "preprocess"]
    assert json.loads((repo / "data" / "twins" / "twins.json").read_text())["twins"]["real-vs-fake"]["train"] == 4
