"""Several datasets in data.source: naming them, listing their images, hash-splitting unsplit ones."""

from __future__ import annotations

import hashlib
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, make_dataset
from PIL import Image

from deepfake_detector.data import DataError
from deepfake_detector.sources import (
    Entry,
    check_classes,
    count_classes,
    list_images,
    parse_sources,
    source_name,
    split_for,
)

RATIOS = (0.7, 0.15, 0.15)
SHARED = ROOT.parent / "shared" / "data"


def noise_jpeg(path: Path, seed: int, size: int = 8) -> Path:
    """A tiny JPEG whose bytes differ for every seed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path


def splits_by_digest(entries: list[Entry]) -> dict[str, str]:
    return {hashlib.sha256(e.path.read_bytes()).hexdigest(): e.split for e in entries}


# --- parse_sources ---------------------------------------------------------------------------------

@pytest.mark.parametrize("location, name", [
    ("kaggle:xhlulu/140k-real-and-fake-faces", "140k-real-and-fake-faces"),
    ("kaggle:owner/faces/versions/3", "faces"),
    ("../shared/data/faces-mini", "faces-mini"),
    ("/data/Faces SD/", "faces-sd"),
    ("/data/archives/Faces_v2.tar.gz", "faces_v2"),
    ("data/faces.zip", "faces"),
    ("https://example.org/files/stylegan3.tgz?dl=1", "stylegan3"),
    ("dvc:https://github.com/org/face-data.git@v1.0", "face-data"),
    ("dvc:git@github.com:org/other-faces.git", "other-faces"),
    ("dvc:../sibling-project", "sibling-project"),
])
def test_one_location_is_named_and_kept_as_given(location, name):
    assert source_name(location) == name
    assert parse_sources(location) == {name: location}


def test_one_location_without_a_name_still_works():
    assert parse_sources(".") == {"default": "."}
    with pytest.raises(DataError, match="cannot derive a name.*'.'"):
        parse_sources([".", "faces"])


def test_list_and_mapping_keep_their_order():
    assert parse_sources(["../x/faces-mini", "kaggle:o/sd.faces"]) == {
        "faces-mini": "../x/faces-mini", "sd-faces": "kaggle:o/sd.faces"}
    mapping = {"sd": "b", "stylegan": "a"}
    assert list(parse_sources(mapping).items()) == [("sd", "b"), ("stylegan", "a")]


@pytest.mark.parametrize("text, expected", [
    ("{stylegan: ../shared/data/faces-mini, sd: ../shared/data/faces-sd}",
     {"stylegan": "../shared/data/faces-mini", "sd": "../shared/data/faces-sd"}),
    ("[a, b.zip]", {"a": "a", "b": "b.zip"}),
    ('{"x": "kaggle:o/n"}', {"x": "kaggle:o/n"}),
    ('["https://h/a.zip", "dvc:../b@main"]', {"a": "https://h/a.zip", "b": "dvc:../b@main"}),
    ("  [ data/raw ]", {"raw": "data/raw"}),
])
def test_text_forms_from_the_command_line(text, expected):
    assert parse_sources(text) == expected


@pytest.mark.parametrize("value, message", [
    ("", "non-empty"),
    ("   ", "non-empty"),
    (None, "not NoneType"),
    ([], "empty list"),
    ({}, "empty list or mapping"),
    ("[]", "empty list"),
    (["a", ""], "entry 2 must be a non-empty"),
    (["a", 3], "entry 2 must be a non-empty location string, got 3"),
    ({"a": None}, "entry 'a' must be"),
    ("{a: }", "entry 'a' must be"),
    ({"Faces": "x"}, "name 'Faces' must match"),
    ({"-x": "x"}, "name '-x' must match"),
    ({"a.b": "x"}, "name 'a.b' must match"),
    ("{1: x}", "name 1 must match"),
    ("{a: x, a: y}", "names 'a' twice"),
    (["one/faces", "two/faces.zip"], r"entries 1 \('one/faces'\) and 2 \('two/faces.zip'\) are both named 'faces'"),
    ({"a": "x", "b": "x"}, "entries 'a' and 'b' are the same location 'x'"),
    (["a/x", "b", "a/x"], r"entries 1 \('a/x'\) and 3 \('a/x'\) are the same location"),
    ("[a, b", "'\\[a, b' is neither a location nor a valid YAML list"),
    ("[[a]]", r"entry 1 must be a non-empty location string, got \['a'\]"),
])
def test_bad_entries_are_named(value, message):
    with pytest.raises(DataError, match=message):
        parse_sources(value)


# --- hash split ------------------------------------------------------------------------------------

def test_split_for_follows_the_ratios_and_checks_them():
    assert split_for(bytes(32), RATIOS) == "train"
    assert split_for(b"\xff" * 32, RATIOS) == "test"
    assert split_for((int(0.8 * 2 ** 64)).to_bytes(8, "big"), RATIOS) == "valid"
    assert split_for(bytes(32), (0.0, 0.0, 1.0)) == "test"
    for bad in ((0.5, 0.5, 0.5), (1.2, -0.1, -0.1), (0.5, 0.5)):
        with pytest.raises(DataError, match="split ratios"):
            split_for(bytes(32), bad)


def test_ratios_roughly_respected(tmp_path):
    for i in range(200):
        noise_jpeg(tmp_path / "src" / ("real", "fake")[i % 2] / f"{i:03d}.jpg", i)
    shares = Counter(e.split for e in list_images(tmp_path / "src", RATIOS))
    assert sum(shares.values()) == 200
    assert 115 <= shares["train"] <= 165 and 12 <= shares["valid"] <= 50 and 12 <= shares["test"] <= 50
    everything = Counter(e.split for e in list_images(tmp_path / "src", (0.0, 1.0, 0.0)))
    assert everything == {"valid": 200}


def test_hash_split_stable_under_renames_and_new_files(tmp_path):
    src = tmp_path / "src"
    for i in range(40):
        noise_jpeg(src / "real" / f"r{i}.jpg", i)
        noise_jpeg(src / "fake" / f"f{i}.jpg", 1000 + i)
    before = splits_by_digest(list_images(src, RATIOS))
    assert len(set(before.values())) == 3
    for path in sorted((src / "real").iterdir()):  # renamed
        path.rename(path.with_name(f"renamed-{path.name}"))
    for i in range(40):  # and new files added, which sort among the old ones
        noise_jpeg(src / "fake" / f"a{i}.jpg", 5000 + i)
    after = splits_by_digest(list_images(src, RATIOS))
    assert len(after) == 120
    assert {d: after[d] for d in before} == before
    assert list_images(src, RATIOS) == list_images(src, RATIOS)


def test_copies_of_one_image_land_in_the_same_split(tmp_path):
    src = tmp_path / "src"
    for i in range(30):
        image = noise_jpeg(src / "fake" / f"{i}.jpg", i)
        shutil.copyfile(image, src / "fake" / f"copy-of-{i}.jpg")
    entries = list_images(src, RATIOS)
    assert len(entries) == 60
    by_digest: dict[str, set[str]] = {}
    for e in entries:
        by_digest.setdefault(hashlib.sha256(e.path.read_bytes()).hexdigest(), set()).add(e.split)
    assert len(by_digest) == 30 and all(len(splits) == 1 for splits in by_digest.values())


# --- list_images -----------------------------------------------------------------------------------

def test_split_source_keeps_its_splits(tmp_path):
    split_root = make_dataset(tmp_path / "ds", per_class=2)
    (split_root / "train" / "real" / "notes.txt").write_text("not an image")  # listed: preprocess quarantines it
    (tmp_path / "ds" / "download.json").write_text("{}")
    entries = list_images(tmp_path / "ds", RATIOS)
    assert [(e.split, e.label, e.rel) for e in entries][:4] == [
        ("train", 0, "train/real/0000.jpg"), ("train", 0, "train/real/0001.jpg"), ("train", 0, "train/real/notes.txt"),
        ("train", 1, "train/fake/0000.jpg")]
    entries = [e for e in entries if e.path.suffix == ".jpg"]
    assert count_classes(entries) == {s: {"real": 2, "fake": 2} for s in ("train", "valid", "test")}
    assert entries[0].path == split_root / "train" / "real" / "0000.jpg"
    check_classes(count_classes(entries), ["ds"])


def test_one_class_sources(tmp_path):
    for seed, split in enumerate(("train", "test")):  # no valid/ at all, and no real/ anywhere
        noise_jpeg(tmp_path / "sd" / "wrap" / split / "fake" / "a.JPG", seed)
    entries = list_images(tmp_path / "sd", RATIOS)
    assert [(e.split, e.label, e.rel) for e in entries] == [("train", 1, "train/fake/a.JPG"),
                                                            ("test", 1, "test/fake/a.JPG")]
    for i in range(10):
        noise_jpeg(tmp_path / "gan" / "fake" / f"{i}.png", i)
    unsplit = list_images(tmp_path / "gan", RATIOS)
    assert len(unsplit) == 10 and {e.label for e in unsplit} == {1}
    assert [e.rel for e in unsplit if e.split == "train"] == sorted(e.rel for e in unsplit if e.split == "train")


def test_sources_without_images_or_layout_are_refused(tmp_path):
    (tmp_path / "empty" / "train" / "real").mkdir(parents=True)
    with pytest.raises(DataError, match="no files in the class folders"):
        list_images(tmp_path / "empty", RATIOS)
    noise_jpeg(tmp_path / "flat" / "a.jpg", 0)
    with pytest.raises(DataError, match="no .*folders found under"):
        list_images(tmp_path / "flat", RATIOS)
    with pytest.raises(DataError, match="not found"):
        list_images(tmp_path / "missing", RATIOS)
    noise_jpeg(tmp_path / "unsplit" / "real" / "a.jpg", 0)
    with pytest.raises(DataError, match="split ratios"):
        list_images(tmp_path / "unsplit", (1.0, 1.0, 1.0))


# --- check_classes ---------------------------------------------------------------------------------

def test_a_split_missing_a_class_across_sources_is_named():
    counts = {"train": {"real": 5, "fake": 5}, "valid": {"real": 0, "fake": 3}, "test": {"real": 2, "fake": 2}}
    with pytest.raises(DataError, match="split valid has no real images across sources stylegan, sd") as exc:
        check_classes(counts, ["stylegan", "sd"])
    assert "train" not in str(exc.value) and "test" not in str(exc.value)
    with pytest.raises(DataError, match="split test has no fake images"):
        check_classes({**counts, "valid": {"real": 1, "fake": 1}, "test": {"real": 2}})
    with pytest.raises(DataError, match="split train has no real.*split train has no fake.*split valid has no real"):
        check_classes({"valid": {"fake": 1}, "test": {"real": 1, "fake": 1}}, ["x"])
    check_classes({s: {"real": 1, "fake": 1} for s in ("train", "valid", "test")})


# --- the real faces, where present ---------------------------------------------------------------------

def test_faces_mini_and_faces_sd_together():
    mini, sd = SHARED / "faces-mini", SHARED / "faces-sd"
    if not (mini / "real-vs-fake").is_dir() or not sd.is_dir():
        pytest.skip(f"faces-mini and faces-sd not both available under {SHARED}")
    sources = parse_sources(f"{{stylegan: {mini}, sd: {sd}}}")
    listed = {name: list_images(Path(location), RATIOS) for name, location in sources.items()}
    assert count_classes(listed["stylegan"]) == {"train": {"real": 680, "fake": 680},
                                                "valid": {"real": 100, "fake": 100},
                                                "test": {"real": 100, "fake": 100}}
    assert count_classes(listed["sd"]) == {"train": {"real": 0, "fake": 340}, "valid": {"real": 0, "fake": 80},
                                          "test": {"real": 0, "fake": 80}}
    assert listed["stylegan"][0].rel.startswith("train/real/")  # the split root's paths, as preprocess uses
    with pytest.raises(DataError, match="split train has no real images, split valid has no real images, "
                       "split test has no real images across source sd: every split needs"):
        check_classes(count_classes(listed["sd"]), ["sd"])
    total = count_classes(e for entries in listed.values() for e in entries)
    check_classes(total, list(sources))
    assert total["valid"] == {"real": 100, "fake": 180}
