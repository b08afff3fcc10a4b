"""Archive bombs are refused before anything is written (``download.max_bytes``, ``max_entries``, ``max_ratio``).

The bombs are real archives made on the fly from streamed zeros: 100 MB that pack into ~100 kB, against
limits lowered to 10 MB, so the tests stay small on disk and refusal is what keeps them so.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from conftest import make_dataset
from deepfake_detector.data import DataError, download, extract_archive
from deepfake_detector.params import DownloadParams, Params, ParamsError, to_dict, with_overrides

MB = 1_000_000
BOMB_BYTES = 100 * MB
SMALL = DownloadParams(max_bytes=10 * MB, max_entries=100)
CHUNK = bytes(MB)


class Zeros:
    """A file of endless zero bytes: a bomb streamed into an archive is never held in memory."""

    def read(self, size: int = -1) -> bytes:
        return bytes(size)


def zip_bomb(path: Path, size: int = BOMB_BYTES) -> Path:
    """A deflated zip: a small file, then ``size`` bytes of zeros streamed in."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ok.txt", b"ok")
        with zf.open("zeros.bin", "w") as out:
            for _ in range(size // len(CHUNK)):
                out.write(CHUNK)
    return path


def tar_gz_bomb(path: Path, size: int = BOMB_BYTES) -> Path:
    """A gzip-compressed tar: a small file, then ``size`` bytes of zeros streamed in."""
    with tarfile.open(path, "w:gz") as tf:
        ok = tarfile.TarInfo("ok.txt")
        ok.size = 2
        tf.addfile(ok, Zeros())
        zeros = tarfile.TarInfo("zeros.bin")
        zeros.size = size
        tf.addfile(zeros, Zeros())
    return path


def many_entries(path: Path, count: int) -> Path:
    """A zip or plain tar of ``count`` one-byte files."""
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w") as zf:
            for i in range(count):
                zf.writestr(f"f{i:05d}", b"x")
    else:
        with tarfile.open(path, "w") as tf:
            for i in range(count):
                info = tarfile.TarInfo(f"f{i:05d}")
                info.size = 1
                tf.addfile(info, Zeros())
    return path


def totals(archive: Path) -> tuple[int, int]:
    """(entries, uncompressed bytes) of a zip or tar, as its index declares them."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            return len(infos), sum(i.file_size for i in infos)
    with tarfile.open(archive) as tf:
        members = tf.getmembers()
        return len(members), sum(m.size for m in members)


@pytest.fixture(scope="module")
def bombs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A zip and a tar.gz bomb, each 100 MB of zeros packed into about 100 kB."""
    root = tmp_path_factory.mktemp("bombs")
    return {"zip": zip_bomb(root / "bomb.zip"), "tar.gz": tar_gz_bomb(root / "bomb.tar.gz")}


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    return tmp_path / "dest"


# --- refused on the index, before writing ---------------------------------------------------------

@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_bomb_over_max_bytes_is_refused_before_writing(bombs: dict[str, Path], dest: Path, kind: str) -> None:
    """Past max_bytes (ratio allowed), the bomb is refused and not even its small first file is written."""
    bomb = bombs[kind]
    with pytest.raises(DataError) as refused:
        extract_archive(bomb, dest, replace(SMALL, max_ratio=1e6))
    assert str(refused.value) == (f"refusing to unpack {bomb.name}: at least 100.0 MB uncompressed exceeds "
                                  "download.max_bytes (10.0 MB); raise it in params.yaml if this archive is trusted")
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_default_max_ratio_refuses_a_bomb_under_max_bytes(bombs: dict[str, Path], dest: Path, kind: str) -> None:
    """100 MB is far under the default 20 GB, but from ~100 kB it is a bomb: the default ratio of 100 refuses it."""
    bomb = bombs[kind]
    with pytest.raises(DataError, match=rf"^refusing to unpack {bomb.name}: at least 100\.0 MB from a .* archive "
                                        r"\(ratio \d[\d,]*\) exceeds download\.max_ratio \(100\); raise it"):
        extract_archive(bomb, dest, DownloadParams())
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize("name", ["many.zip", "many.tar"])
def test_too_many_entries_are_refused(tmp_path: Path, dest: Path, name: str) -> None:
    """1000 entries against max_entries 100 are refused, nothing written."""
    archive = many_entries(tmp_path / name, 1000)
    with pytest.raises(DataError, match=rf"^refusing to unpack {name}: more than 100 entries exceeds "
                                        r"download\.max_entries \(100\); raise it in params\.yaml"):
        extract_archive(archive, dest, SMALL)
    assert list(dest.iterdir()) == []


def test_tar_is_read_only_up_to_max_entries(tmp_path: Path, dest: Path) -> None:
    """A tar is streamed and left at the entry limit: a truncated tail past it is never read (listing every
    member first would fail on it instead)."""
    archive = many_entries(tmp_path / "many.tar", 1000)
    with archive.open("r+b") as f:
        f.truncate(500 * 1024 + 700)  # each entry is a 512-byte header and a 512-byte block: cut in entry 500
    with pytest.raises(DataError, match="cannot unpack many.tar"):
        extract_archive(archive, tmp_path / "unlimited", replace(SMALL, max_entries=10_000))
    with pytest.raises(DataError, match=r"more than 100 entries exceeds download\.max_entries"):
        extract_archive(archive, dest, SMALL)
    assert list(dest.iterdir()) == []


def test_zip_entry_larger_than_its_header_writes_no_more_than_declared(tmp_path: Path, dest: Path) -> None:
    """A zip whose headers understate an entry (10 bytes declared, 1 MB inside) passes the index check,
    but no more than the declared 10 bytes are written and the entry is refused."""
    archive = tmp_path / "lie.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.bin", CHUNK)
    data = bytearray(archive.read_bytes())
    struct.pack_into("<I", data, 22, 10)  # the local header's uncompressed size
    struct.pack_into("<I", data, data.rindex(b"PK\x01\x02") + 24, 10)  # the central directory's
    archive.write_bytes(bytes(data))

    with pytest.raises(DataError, match="cannot unpack lie.zip"):
        extract_archive(archive, dest, replace(SMALL, max_bytes=1000))
    assert all(p.stat().st_size <= 10 for p in dest.rglob("*") if p.is_file())


# --- within the limits ----------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["zip", "gztar"])
def test_dataset_archive_exactly_at_the_limits_is_unpacked(tmp_path: Path, fmt: str) -> None:
    """A real archive of JPEG faces unpacks with max_entries and max_bytes set to exactly its totals,
    and is refused one below either."""
    make_dataset(tmp_path / "packed", per_class=3, size=32)
    archive = Path(shutil.make_archive(str(tmp_path / "faces"), fmt, root_dir=tmp_path / "packed"))
    entries, size = totals(archive)
    exact = DownloadParams(max_bytes=size, max_entries=entries)

    info = download(str(archive), tmp_path / "raw", limits=exact)

    assert info["files"] == {split: {"real": 3, "fake": 3} for split in ("train", "valid", "test")}
    for tight in (replace(exact, max_entries=entries - 1), replace(exact, max_bytes=size - 1)):
        with pytest.raises(DataError, match="refusing to unpack"):
            extract_archive(archive, tmp_path / "tight", tight)
        assert list((tmp_path / "tight").iterdir()) == []


# --- through download and the CLI -----------------------------------------------------------------

@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_download_refusal_keeps_the_old_copy_and_leaves_no_trace(bombs: dict[str, Path], tmp_path: Path,
                                                                  kind: str) -> None:
    """A refused archive leaves the existing data/raw as it was and nothing beside it."""
    out_dir = tmp_path / "raw" / "out"
    out_dir.mkdir(parents=True)
    (out_dir / "keep.txt").write_text("old copy")

    with pytest.raises(DataError, match=r"download\.max_bytes"):
        download(str(bombs[kind]), out_dir, limits=SMALL)

    assert os.listdir(out_dir.parent) == ["out"]
    assert os.listdir(out_dir) == ["keep.txt"] and (out_dir / "keep.txt").read_text() == "old copy"


def test_cli_refuses_a_bomb_in_one_line(bombs: dict[str, Path], tmp_path: Path) -> None:
    """`deepfake download` with the limits from a params file: exit 2, one line naming the param, no traceback."""
    raw = to_dict(Params())
    raw["data"]["source"] = str(bombs["zip"])
    raw["download"].update(max_bytes=10 * MB, max_entries=100)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))

    result = subprocess.run([sys.executable, "-m", "deepfake_detector.cli", "download", "--params", str(params),
                             "--out", str(tmp_path / "raw")], capture_output=True, text=True, cwd=tmp_path,
                            timeout=300)

    assert result.returncode == 2, result.stderr
    assert result.stderr == ("deepfake download: error: refusing to unpack bomb.zip: at least 100.0 MB uncompressed "
                             "exceeds download.max_bytes (10.0 MB); raise it in params.yaml if this archive is "
                             "trusted\n")
    assert sorted(os.listdir(tmp_path)) == ["params.yaml"]


@pytest.mark.parametrize("key", ["max_bytes", "max_entries", "max_ratio"])
def test_limits_must_be_positive(key: str) -> None:
    with pytest.raises(ParamsError, match=rf"download\.{key} must be more than 0, got 0"):
        with_overrides(Params(), [f"download.{key}=0"])
