"""Preprocessing: seeded blur and noise, byte-identical reruns, bad files quarantined and counted."""

from __future__ import annotations

import csv
import hashlib
import json
import resource
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, make_dataset, synthetic_face
from deepfake_detector import preprocess
from deepfake_detector.data import SPLITS, DataError
from deepfake_detector.params import BlurParams, NoiseParams, PreprocessParams

PARAMS = PreprocessParams(image_size=32, min_source_size=16)


def digest_tree(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_degrade_is_seeded_and_changes_pixels():
    image = np.asarray(synthetic_face(1, 0, 64))
    always = PreprocessParams(blur=BlurParams(1.0, (1.0, 1.0)), noise=NoiseParams(1.0, (5.0, 5.0)))
    a, blur, noise = preprocess.degrade(image, always, seed=1, key="train/fake/0001.jpg")
    b, *_ = preprocess.degrade(image, always, seed=1, key="train/fake/0001.jpg")
    c, *_ = preprocess.degrade(image, always, seed=2, key="train/fake/0001.jpg")
    d, *_ = preprocess.degrade(image, always, seed=1, key="train/fake/0002.jpg")
    assert (blur, noise) == (1.0, 5.0)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, d)
    assert a.dtype == np.uint8 and a.shape == image.shape


def test_blur_and_noise_do_what_they_say():
    image = np.asarray(synthetic_face(1, 0, 64))  # has a pixel-level checkerboard
    blur_only = PreprocessParams(blur=BlurParams(1.0, (2.0, 2.0)), noise=NoiseParams(0.0, (5.0, 5.0)))
    noise_only = PreprocessParams(blur=BlurParams(0.0, (2.0, 2.0)), noise=NoiseParams(1.0, (10.0, 10.0)))
    neither = PreprocessParams(blur=BlurParams(0.0, (2.0, 2.0)), noise=NoiseParams(0.0, (5.0, 5.0)))
    blurred, sigma, _ = preprocess.degrade(image, blur_only, 0, "k")
    hf = lambda x: np.abs(np.diff(x.astype(float), axis=1)).mean()  # noqa: E731  high-frequency energy
    assert sigma == 2.0 and hf(blurred) < 0.5 * hf(image)
    noisy, _, sigma = preprocess.degrade(image, noise_only, 0, "k")
    residual = noisy.astype(float) - image
    assert sigma == 10.0 and abs(residual.mean()) < 1.0 and 8.0 < residual.std() < 11.0
    untouched, b, n = preprocess.degrade(image, neither, 0, "k")
    assert np.array_equal(untouched, image) and b == n == 0.0


@pytest.mark.slow
def test_rerun_is_byte_identical_and_only_train_is_degraded(tmp_path, dataset):
    params = PreprocessParams(image_size=32, min_source_size=16, blur=BlurParams(1.0, (0.5, 1.0)),
                              noise=NoiseParams(0.5, (1.0, 8.0)))
    preprocess.run(dataset, tmp_path / "a", params, seed=7, workers=2, progress=False)
    preprocess.run(dataset, tmp_path / "b", params, seed=7, workers=1, progress=False)
    assert digest_tree(tmp_path / "a") == digest_tree(tmp_path / "b")
    for split, degraded in (("train", True), ("valid", False), ("test", False)):
        with (tmp_path / "a" / split / "index.csv").open() as f:
            blurs = [float(r["blur_sigma"]) for r in csv.DictReader(f)]
        assert len(blurs) == 8 and all((b > 0) == degraded for b in blurs), split


def test_output_is_a_loadable_uint8_array_with_labels(tmp_path, dataset):
    meta = preprocess.run(dataset, tmp_path / "out", PARAMS, seed=0, workers=1, progress=False)
    images, labels = preprocess.load_split(tmp_path / "out", "valid")
    assert images.shape == (8, 32, 32, 3) and images.dtype == np.uint8
    assert labels.tolist() == [0] * 4 + [1] * 4  # real first, then fake
    assert meta["splits"]["valid"] == {"images": 8, "real": 4, "fake": 4, "quarantined": 0,
                                       "quarantine_reasons": {}, "source_modes": {"RGB": 8},
                                       "sources": {"default": {"real": 4, "fake": 4}}}  # no download.json: unnamed
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["params"]["image_size"] == 32


def test_limit_per_class_takes_the_first_files(tmp_path, dataset):
    params = PreprocessParams(image_size=32, min_source_size=16, limit_per_class=2)
    meta = preprocess.run(dataset, tmp_path / "out", params, seed=0, workers=1, progress=False)
    assert all(s["images"] == 4 for s in meta["splits"].values())
    with (tmp_path / "out" / "train" / "index.csv").open() as f:
        names = [r["path"].rsplit("/", 1)[1] for r in csv.DictReader(f)]
    assert names == ["0000.jpg", "0001.jpg"] * 2


def add_bad_files(folder):
    """The bad inputs a real scrape contains, next to good images."""
    good = folder / "0000.jpg"
    (folder / "truncated.jpg").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is not a picture\n")
    Image.new("RGB", (8, 8)).save(folder / "tiny.jpg")
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    rgba.paste((0, 255, 0, 255), (0, 0, 20, 40))
    rgba.save(folder / "alpha.png")
    synthetic_face(0, 5).convert("L").save(folder / "grey.jpg")


@pytest.mark.slow
def test_bad_files_are_quarantined_and_counted(tmp_path, dataset):
    add_bad_files(dataset / "real_vs_fake" / "real-vs-fake" / "train" / "real")
    meta = preprocess.run(dataset, tmp_path / "out", PARAMS, seed=0, workers=2, progress=False)
    train = meta["splits"]["train"]
    assert train["quarantined"] == 4 and meta["quarantined"] == 4
    assert train["quarantine_reasons"] == {"corrupt image": 1, "empty file": 1, "not an image": 1, "too small": 1}
    # Alpha PNG and greyscale JPEG are usable: converted to RGB and kept.
    assert train["images"] == 10 and train["source_modes"] == {"RGB": 8, "RGBA": 1, "L": 1}
    with (tmp_path / "out" / "quarantine.csv").open() as f:
        rows = {r["path"].rsplit("/", 1)[1]: r["reason"] for r in csv.DictReader(f)}
    assert set(rows) == {"truncated.jpg", "empty.jpg", "notes.jpg", "tiny.jpg"}
    images, _ = preprocess.load_split(tmp_path / "out", "train")
    with (tmp_path / "out" / "train" / "index.csv").open() as f:
        order = [r["path"].rsplit("/", 1)[1] for r in csv.DictReader(f)]
    alpha = images[order.index("alpha.png")]
    # Transparent area flattened to black, opaque green kept: (left half green, right half black).
    assert alpha[16, 4].tolist() == [0, 255, 0] and alpha[16, 28].tolist() == [0, 0, 0]
    grey = images[order.index("grey.jpg")]
    assert grey.shape == (32, 32, 3) and np.array_equal(grey[..., 0], grey[..., 1])


def test_missing_split_folder_is_a_clear_error(tmp_path):
    root = tmp_path / "ds"
    make_dataset(root, per_class=1)
    shutil.rmtree(root / "real_vs_fake" / "real-vs-fake" / "test")
    with pytest.raises(DataError, match="split test has no real images"):
        preprocess.run(root, tmp_path / "out", PARAMS, seed=0, workers=1, progress=False)


def test_cli_reports_quarantine_without_failing(tmp_path, dataset, cli_env):
    add_bad_files(dataset / "real_vs_fake" / "real-vs-fake" / "test" / "fake")
    result = subprocess.run(
        [sys.executable, "-m", "deepfake_detector.cli", "preprocess", "--params", str(ROOT / "params.yaml"),
         "--raw", str(dataset), "--out", str(tmp_path / "out"), "-S", "preprocess.image_size=32",
         "-S", "preprocess.min_source_size=16", "--workers", "1"],
        capture_output=True, text=True, env=cli_env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "test: 10 images (4 real, 6 fake), 4 quarantined" in result.stdout
    assert "quarantined 4 files" in result.stdout


def test_cli_missing_split_exits_2_without_traceback(tmp_path, cli_env):
    root = tmp_path / "ds"
    make_dataset(root, per_class=1)
    shutil.rmtree(root / "real_vs_fake" / "real-vs-fake" / "valid")
    result = subprocess.run(
        [sys.executable, "-m", "deepfake_detector.cli", "preprocess", "--params", str(ROOT / "params.yaml"),
         "--raw", str(root), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=cli_env, timeout=120)
    assert result.returncode == 2
    assert "split valid has no real images" in result.stderr and "Traceback" not in result.stderr


# `deepfake` with SIGXFSZ at its default action, which kills the process outright (no cleanup, as
# SIGKILL or a power cut would) when a file it writes outgrows RLIMIT_FSIZE; Python otherwise
# ignores the signal and raises an OSError instead.
KILLABLE_CLI = ("import signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_DFL); "
                "from deepfake_detector.cli import main; sys.exit(main(sys.argv[1:]))")


def test_a_run_killed_midway_leaves_the_previous_outputs_and_the_next_run_tidies_up(tmp_path, cli_env):
    split_root = make_dataset(tmp_path / "raw", per_class=2)
    for label, cls in enumerate(("real", "fake")):  # the test split, written last, gets the biggest images.npy
        for i in range(2, 8):
            synthetic_face(label, 9000 + i, 48).save(split_root / "test" / cls / f"{i:04d}.jpg", quality=95)
    out = tmp_path / "processed"
    command = [sys.executable, "-c", KILLABLE_CLI, "preprocess", "--params", str(ROOT / "params.yaml"),
               "--raw", str(tmp_path / "raw"), "--out", str(out), "-S", "preprocess.image_size=32",
               "-S", "preprocess.min_source_size=16", "--workers", "1"]
    first = subprocess.run(command, capture_output=True, text=True, env=cli_env, timeout=300)
    assert first.returncode == 0, first.stderr
    before = digest_tree(out)
    sizes = {split: (out / split / "images.npy").stat().st_size for split in ("train", "valid", "test")}
    limit = (max(sizes["train"], sizes["valid"]) + sizes["test"]) // 2  # only test/images.npy outgrows it

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file from the kill

    rerun = [*command, "-S", "seed=1"]  # other train pixels: a rerun writing in place would show in the hashes
    killed = subprocess.run(rerun, capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size,
                            env={**cli_env, "PYTHONDONTWRITEBYTECODE": "1"})  # a big .pyc must not be what dies
    assert killed.returncode == -signal.SIGXFSZ, killed.stderr
    assert digest_tree(out) == before  # meta.json and every split's files: the first run's, byte for byte
    (leftover,) = [p for p in tmp_path.iterdir() if p.name.startswith("processed.tmp-")]
    assert (leftover / "valid" / "index.csv").is_file()  # it was killed mid-way, with two splits written

    again = subprocess.run(rerun, capture_output=True, text=True, env=cli_env, timeout=300)
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["processed", "raw"]  # the leftover is gone
    assert json.loads((out / "meta.json").read_text())["seed"] == 1 and digest_tree(out) != before


@pytest.mark.slow
def test_several_sources_keep_their_names_and_unsplit_ones_are_split_by_hash(tmp_path):
    """Two sources, one split (real + fake) and one unsplit fakes-only: every row of index.csv names its
    source, the unsplit one is spread over the splits by file hash, and a file keeps its split when renamed."""
    from deepfake_detector.params import Params, with_overrides
    from deepfake_detector.stages import download
    from deepfake_detector.stages import preprocess as stage

    make_dataset(tmp_path / "gan", per_class=4, size=32)
    (tmp_path / "diffusion" / "fake").mkdir(parents=True)
    for i in range(30):
        png = synthetic_face(1, 100 + i, size=32)
        png.save(tmp_path / "diffusion" / "fake" / f"{i:03d}.png")
    p = with_overrides(Params(), [f"data.source={{gan: {tmp_path / 'gan'}, diffusion: {tmp_path / 'diffusion'}}}",
                                  "preprocess.image_size=32", "preprocess.min_source_size=16",
                                  "preprocess.split_ratios=[0.5, 0.25, 0.25]"])
    download.run(p, tmp_path / "raw")
    meta = stage.run(p, tmp_path / "raw", tmp_path / "processed", workers=1)
    assert meta["sources"] == ["gan", "diffusion"]
    rows = {split: list(csv.DictReader((tmp_path / "processed" / split / "index.csv").open())) for split in SPLITS}
    diffusion = {r["path"]: split for split in SPLITS for r in rows[split] if r["source"] == "diffusion"}
    assert len(diffusion) == 30 and set(diffusion.values()) == set(SPLITS)  # 30 files: every split gets some
    assert all(r["source"] == "gan" for split in SPLITS for r in rows[split] if r["label"] == "0")
    assert all(path.startswith("diffusion/fake/") for path in diffusion)  # several sources: keys carry the name
    assert meta["splits"]["train"]["sources"]["diffusion"]["fake"] == sum(s == "train" for s in diffusion.values())
    # Renamed, a file keeps its split: the hash is of its bytes.
    (tmp_path / "diffusion" / "fake" / "000.png").rename(tmp_path / "diffusion" / "fake" / "zzz.png")
    download.run(p, tmp_path / "raw")
    stage.run(p, tmp_path / "raw", tmp_path / "processed", workers=1)
    moved = {r["path"]: split for split in SPLITS
             for r in csv.DictReader((tmp_path / "processed" / split / "index.csv").open())
             if r["source"] == "diffusion"}
    assert moved["diffusion/fake/zzz.png"] == diffusion["diffusion/fake/000.png"]


def test_fit_crop_keeps_source_pixels_and_travels_with_the_model_to_every_scorer(tmp_path, dataset):
    import torch

    from deepfake_detector.detector import Detector
    from deepfake_detector.params import ModelParams, TrainParams
    from deepfake_detector.train import fit, prepared_as

    meta = preprocess.run(dataset, tmp_path / "data", PreprocessParams(image_size=32, min_source_size=16, fit="crop"),
                          seed=0, workers=1, progress=False)
    images, _ = preprocess.load_split(tmp_path / "data", "valid")
    _, rows = preprocess.read_index(tmp_path / "data", "valid")
    source = dataset / "real_vs_fake" / "real-vs-fake" / "valid" / rows[0]["path"].split("valid/")[-1]
    pixels = np.asarray(Image.open(source).convert("RGB"))  # 48 x 48: the centre 32 x 32, not resampled
    assert np.array_equal(images[0], pixels[8:40, 8:40])
    # Smaller than image_size: resized up, as resize does.
    small = Image.fromarray(pixels[:24, :24])
    assert np.array_equal(preprocess.fit_image(small, 32, 16, "crop"), preprocess.fit_image(small, 32, 16, "resize"))
    fit(tmp_path / "data", tmp_path / "model", ModelParams(arch="cnn", pretrained="none", channels=(8,), hidden=8),
        TrainParams(epochs=1, batch_size=16, device="cpu"), torch.device("cpu"), seed=0, progress=False,
        **prepared_as(meta))
    detector = Detector.from_checkpoint(tmp_path / "model", notice=lambda _: None)
    assert detector.fit == "crop"
    assert np.array_equal(detector.prepare(source.read_bytes(), crop_faces=False).array, images[0])
