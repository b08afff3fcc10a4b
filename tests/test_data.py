"""Tests for ``deepfake_detector.data``: fetching the raw dataset from folders, archives, URLs and Kaggle.

Everything is real: tiny JPEGs written with PIL, archives built with ``zipfile``/``tarfile``, a
loopback HTTP server and the ``deepfake download`` command run as a subprocess.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from conftest import free_port
from deepfake_detector.data import INFO_FILE, DataError, download, extract_archive

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
SPLITS = ("train", "valid", "test")
CLASSES = ("real", "fake")
NESTED = Path("real_vs_fake") / "real-vs-fake"
PER_CLASS = 2
EXPECTED_COUNTS = {split: {cls: PER_CLASS for cls in CLASSES} for split in SPLITS}
PROXY_VARS = ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy")


# --- helpers -------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def jpeg_bytes(cls: str) -> bytes:
    """An 8x8 JPEG, one colour per class."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 40, 40) if cls == "fake" else (40, 200, 40)).save(buf, "JPEG")
    return buf.getvalue()


def make_dataset(root: Path, nested: bool = False, splits=SPLITS, classes=CLASSES) -> Path:
    """Write ``PER_CLASS`` JPEGs per split/class under ``root`` (optionally under real_vs_fake/real-vs-fake/).

    Returns the folder that holds the splits.
    """
    split_root = root / NESTED if nested else root
    split_root.mkdir(parents=True, exist_ok=True)
    for split in splits:
        for cls in classes:
            folder = split_root / split / cls
            folder.mkdir(parents=True)
            for i in range(PER_CLASS):
                (folder / f"{i}.jpg").write_bytes(jpeg_bytes(cls))
    return split_root


def make_archive(src: Path, archive: Path) -> Path:
    """Pack the contents of ``src`` into a .zip or .tar.gz named ``archive``."""
    fmt = "zip" if archive.name.endswith(".zip") else "gztar"
    base = str(archive).removesuffix(".zip").removesuffix(".tar.gz")
    return Path(shutil.make_archive(base, fmt, root_dir=src))


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def relative_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def tar_member(name: str, type_: bytes = tarfile.REGTYPE, linkname: str = "",
               data: bytes = b"") -> tuple[tarfile.TarInfo, io.BytesIO | None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = type_, linkname, len(data) if type_ == tarfile.REGTYPE else 0
    return info, io.BytesIO(data) if type_ == tarfile.REGTYPE else None


def write_tar(path: Path, *members: tuple[tarfile.TarInfo, io.BytesIO | None]) -> Path:
    with tarfile.open(path, "w") as tf:
        for info, data in members:
            tf.addfile(info, data)
    return path


def write_zip(path: Path, *entries: tuple[str | zipfile.ZipInfo, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return path


def zip_symlink(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.external_attr = 0o120777 << 16  # S_IFLNK | 0777, as `zip --symlinks` writes it
    return info, target.encode()


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path, timeout: float = 60):
    return subprocess.run([sys.executable, "-m", "deepfake_detector.cli", "download", "--params", str(PARAMS),
                           *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


# --- fixtures ------------------------------------------------------------------------------------

@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    """Where ``download`` puts the data; its parent holds nothing else, so stray temp folders show."""
    return tmp_path / "raw" / "out"


@pytest.fixture
def read_only_source(tmp_path: Path) -> Iterator[Path]:
    """A dataset folder whose files are 0o444 and folders 0o555; write access is restored afterwards."""
    root = tmp_path / "ro-source"
    make_dataset(root, nested=True)
    paths = sorted(root.rglob("*"), reverse=True) + [root]  # children before their folder
    for p in paths:
        p.chmod(0o555 if p.is_dir() else 0o444)
    yield root
    for p in reversed(paths):
        p.chmod(0o755 if p.is_dir() else 0o644)


@pytest.fixture
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep any proxy of the environment away from loopback requests."""
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 - signature of the base class
        pass


@pytest.fixture
def http_server(tmp_path: Path, no_proxy: None) -> Iterator[tuple[str, Path]]:
    """A loopback HTTP server in a thread; yields (base URL, folder it serves)."""
    served = tmp_path / "www"
    served.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(QuietHandler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", served
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


# --- 1. local folders ----------------------------------------------------------------------------

@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
def test_local_folder_is_copied_with_counts(tmp_path: Path, out_dir: Path, nested: bool) -> None:
    """A local folder is copied, counted per split/class and described in download.json."""
    source = tmp_path / "source"
    split_root = make_dataset(source, nested=nested)

    info = download(str(source), out_dir)

    assert info == {"source": str(source), "kind": "folder", "split_root": NESTED.as_posix() if nested else ".",
                    "files": EXPECTED_COUNTS}
    assert json.loads((out_dir / INFO_FILE).read_text()) == info
    copied = out_dir / info["split_root"]
    assert relative_files(copied) - {INFO_FILE} == relative_files(split_root)
    assert (copied / "train/fake/0.jpg").read_bytes() == jpeg_bytes("fake")
    assert INFO_FILE not in {p.name for p in source.rglob("*")}, "the source must be left alone"
    assert os.listdir(out_dir.parent) == [out_dir.name]


def test_links_out_of_a_local_source_are_skipped_and_loops_impossible(tmp_path: Path, out_dir: Path) -> None:
    """A link to a file outside the source (a secret of this machine) is never copied into data/raw,
    a linked folder (here a loop to its parent) is not followed; both are reported. A link to a file
    inside the source is copied as that file."""
    source = tmp_path / "source"
    make_dataset(source)
    secret = tmp_path / "secret.txt"
    secret.write_text("password")
    (source / "train" / "real" / "link.jpg").symlink_to(secret)
    (source / "train" / "fake" / "loop").symlink_to(source / "train", target_is_directory=True)
    (source / "valid" / "real" / "again.jpg").symlink_to(source / "valid" / "real" / "0.jpg")

    info = download(str(source), out_dir)

    assert info["skipped_links"] == ["train/fake/loop", "train/real/link.jpg"]
    assert not any("password" in p.read_text(errors="ignore") for p in out_dir.rglob("*") if p.is_file())
    assert not (out_dir / "train" / "fake" / "loop").exists()
    assert (out_dir / "valid" / "real" / "again.jpg").read_bytes() == (source / "valid" / "real" / "0.jpg").read_bytes()
    assert json.loads((out_dir / INFO_FILE).read_text())["skipped_links"] == info["skipped_links"]


def test_read_only_source_gives_writable_copies(read_only_source: Path, out_dir: Path) -> None:
    """Read-only source files and folders come out writable, so the copy can be replaced later."""
    download(str(read_only_source), out_dir)

    for path in [out_dir, *out_dir.rglob("*")]:
        assert path.stat().st_mode & stat.S_IWUSR, f"{path} is not writable"
    assert download(str(read_only_source), out_dir)["files"] == EXPECTED_COUNTS  # replacing works


def test_existing_out_dir_is_replaced(tmp_path: Path, out_dir: Path) -> None:
    """A successful download replaces the old out_dir wholesale and leaves no temp folders."""
    (out_dir / "stale").mkdir(parents=True)
    (out_dir / "stale" / "old.jpg").write_bytes(b"old")
    make_dataset(tmp_path / "source")

    download(str(tmp_path / "source"), out_dir)

    assert not (out_dir / "stale").exists()
    assert (out_dir / "valid/real/1.jpg").is_file()
    assert os.listdir(out_dir.parent) == [out_dir.name]


def test_out_dir_inside_local_source(tmp_path: Path) -> None:
    """``-S data.source=data --out data/raw`` is refused clearly instead of copying into itself."""
    source = tmp_path / "data"
    make_dataset(source)
    with pytest.raises(DataError, match="inside data.source"):
        download(str(source), source / "raw")
    assert not (source / "raw").exists()


# --- 2. local archives ---------------------------------------------------------------------------

@pytest.fixture(params=["data.zip", "data.tar.gz"])
def archive(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A zip or tar.gz of a nested dataset."""
    make_dataset(tmp_path / "packed", nested=True)
    return make_archive(tmp_path / "packed", tmp_path / request.param)


@pytest.mark.parametrize("checksum", ["none", "lower", "upper"])
def test_local_archive_is_extracted(archive: Path, out_dir: Path, checksum: str) -> None:
    """Zip and tar.gz archives are unpacked, with or without a (case-insensitive) sha256."""
    sha = {"none": "", "lower": sha256_of(archive), "upper": sha256_of(archive).upper()}[checksum]

    info = download(str(archive), out_dir, sha256=sha)

    assert info["kind"] == "archive"
    assert info["split_root"] == NESTED.as_posix()
    assert info["files"] == EXPECTED_COUNTS
    assert (out_dir / NESTED / "test/real/0.jpg").read_bytes() == jpeg_bytes("real")


def test_local_archive_sha256_mismatch(archive: Path, out_dir: Path) -> None:
    """A wrong sha256 is refused before anything is unpacked."""
    with pytest.raises(DataError, match="sha256 mismatch"):
        download(str(archive), out_dir, sha256="0" * 64)
    assert not out_dir.exists()


# --- 3. unsafe archives --------------------------------------------------------------------------

UNSAFE_ARCHIVES = {
    "zip-dotdot": (lambda d: write_zip(d / "a.zip", ("ok.txt", b"ok"), ("../evil.txt", b"evil")), "escapes"),
    "zip-absolute": (lambda d: write_zip(d / "a.zip", (str(d / "evil.txt"), b"evil")), "escapes"),
    "zip-symlink": (lambda d: write_zip(d / "a.zip", ("ok.txt", b"ok"), zip_symlink("link", "../evil.txt")),
                    "link"),
    "tar-dotdot": (lambda d: write_tar(d / "a.tar", tar_member("ok.txt", data=b"ok"),
                                       tar_member("../evil.txt", data=b"evil")), "escapes"),
    "tar-absolute": (lambda d: write_tar(d / "a.tar", tar_member(str(d / "evil.txt"), data=b"evil")),
                     "escapes"),
    "tar-symlink": (lambda d: write_tar(d / "a.tar", tar_member("ok.txt", data=b"ok"),
                                        tar_member("link", tarfile.SYMTYPE, "../evil.txt")), "link"),
    "tar-hardlink": (lambda d: write_tar(d / "a.tar", tar_member("ok.txt", data=b"ok"),
                                         tar_member("hard", tarfile.LNKTYPE, "ok.txt")), "link"),
}


@pytest.mark.parametrize("case", UNSAFE_ARCHIVES)
def test_unsafe_archive_is_refused(tmp_path: Path, case: str) -> None:
    """Entries that escape the target, and links of any kind, are refused before anything is written."""
    build, message = UNSAFE_ARCHIVES[case]
    work = tmp_path / "work"
    work.mkdir()
    archive = build(work)
    dest = work / "dest"

    with pytest.raises(DataError, match=message):
        extract_archive(archive, dest)

    assert sorted(os.listdir(work)) == sorted([archive.name, "dest"]), "nothing may land outside dest"
    assert list(dest.iterdir()) == [], "nothing is unpacked when any entry is unsafe"


def test_download_of_zip_slip_archive_writes_nothing(tmp_path: Path, out_dir: Path) -> None:
    """Through ``download`` too, a zip-slip archive fails and leaves no trace next to out_dir."""
    archive = write_zip(tmp_path / "slip.zip", ("../../evil.txt", b"evil"))
    with pytest.raises(DataError, match="escapes"):
        download(str(archive), out_dir)
    assert sorted(os.listdir(tmp_path)) == ["raw", "slip.zip"]
    assert os.listdir(out_dir.parent) == []


# --- 4. http sources -----------------------------------------------------------------------------

def test_http_archive_is_downloaded(http_server: tuple[str, Path], tmp_path: Path, out_dir: Path) -> None:
    """A zip served over HTTP is fetched, checked against its sha256 and unpacked."""
    base, served = http_server
    make_dataset(tmp_path / "packed", nested=True)
    archive = make_archive(tmp_path / "packed", served / "data.zip")

    info = download(f"{base}/data.zip", out_dir, sha256=sha256_of(archive), timeout_s=10, retries=0)

    assert info["kind"] == "url"
    assert info["files"] == EXPECTED_COUNTS
    assert (out_dir / NESTED / "train/real/0.jpg").is_file()
    assert os.listdir(out_dir.parent) == [out_dir.name]


def test_http_archive_sha256_mismatch(http_server: tuple[str, Path], tmp_path: Path, out_dir: Path) -> None:
    """A downloaded archive with the wrong sha256 is refused."""
    base, served = http_server
    make_dataset(tmp_path / "packed")
    make_archive(tmp_path / "packed", served / "data.tar.gz")
    with pytest.raises(DataError, match="sha256 mismatch for data.tar.gz"):
        download(f"{base}/data.tar.gz", out_dir, sha256="f" * 64, timeout_s=10, retries=0)
    assert not out_dir.exists()


def test_http_404_fails_fast(http_server: tuple[str, Path], out_dir: Path) -> None:
    """A 4xx is reported at once, without the retries that only help 5xx and network errors."""
    base, _ = http_server
    start = time.monotonic()
    with pytest.raises(DataError, match="HTTP 404"):
        download(f"{base}/missing.zip", out_dir, timeout_s=10, retries=3)
    assert time.monotonic() - start < 5
    assert os.listdir(out_dir.parent) == []


def test_http_connection_refused(no_proxy: None, out_dir: Path) -> None:
    """A URL nobody listens on gives a clear 'cannot download' error within seconds."""
    url = f"http://127.0.0.1:{free_port()}/data.zip"
    start = time.monotonic()
    with pytest.raises(DataError, match="cannot download .* after 1 attempts"):
        download(url, out_dir, timeout_s=5, retries=0)
    assert time.monotonic() - start < 5
    assert os.listdir(out_dir.parent) == []


# --- 5. unrecognised datasets --------------------------------------------------------------------

def _without_fake_in_train(root: Path) -> None:
    make_dataset(root)
    shutil.rmtree(root / "train" / "fake")


def test_dataset_without_splits_or_classes_is_refused(tmp_path: Path, out_dir: Path) -> None:
    """A folder with neither split nor class folders fails, naming what it looked for, and leaves nothing."""
    source = tmp_path / "source"
    make_dataset(source / "images", splits=(), classes=())
    (source / "stray.jpg").write_bytes(jpeg_bytes("real"))
    with pytest.raises(DataError, match=r"no \{train,valid,test\}/ or \{real,fake\}/ folders found under"):
        download(str(source), out_dir)
    assert not out_dir.exists()
    assert os.listdir(out_dir.parent) == []


@pytest.mark.parametrize("build, message", [
    (lambda root: make_dataset(root, splits=("train", "test")),
     r"split valid has no real images, split valid has no fake"),
    (_without_fake_in_train, r"split train has no fake images across source source:"),
], ids=["no-valid", "no-train-fake"])
def test_incomplete_dataset_downloads_but_preprocess_names_the_split(tmp_path: Path, out_dir: Path, build,
                                                                      message: str) -> None:
    """A partial source is one of several (a fakes-only generator): download counts what is there, and
    preprocess refuses a run whose splits lack a class overall, naming the split, before decoding anything."""
    from deepfake_detector import preprocess
    from deepfake_detector.params import PreprocessParams

    source = tmp_path / "source"
    build(source)
    info = download(str(source), out_dir)
    assert "valid" not in info["files"] if "valid" in message else info["files"]["train"] == {"real": 2}
    with pytest.raises(DataError, match=message):
        preprocess.run(out_dir, tmp_path / "processed", PreprocessParams(image_size=32), seed=0, workers=1,
                       progress=False)
    assert not (tmp_path / "processed").exists()


def test_nonexistent_local_source(tmp_path: Path, out_dir: Path) -> None:
    """A source that is neither a slug, a URL nor an existing path is named in the error."""
    missing = tmp_path / "no-such-dataset"
    with pytest.raises(DataError, match="is not a kaggle: slug, an http.s. URL or an existing path") as exc:
        download(str(missing), out_dir)
    assert str(missing) in str(exc.value)


# --- 6. out_dir is only replaced by a complete copy ----------------------------------------------

@pytest.mark.parametrize("bad", ["garbage.zip", "slip.zip", "no-splits.tar.gz"])
def test_failed_download_keeps_existing_out_dir(tmp_path: Path, out_dir: Path, bad: str) -> None:
    """A failing download leaves the previous out_dir as it was and no temp folders beside it."""
    make_dataset(out_dir)
    (out_dir / INFO_FILE).write_text('{"previous": true}\n')
    before = {p: p.read_bytes() for p in out_dir.rglob("*") if p.is_file()}
    source = tmp_path / bad
    if bad == "garbage.zip":
        source.write_bytes(b"this is not an archive")
    elif bad == "slip.zip":
        write_zip(source, ("../escaped.txt", b"evil"))
    else:
        (tmp_path / "empty" / "images").mkdir(parents=True)
        make_archive(tmp_path / "empty", source)

    with pytest.raises(DataError):
        download(str(source), out_dir)

    assert {p: p.read_bytes() for p in out_dir.rglob("*") if p.is_file()} == before
    assert os.listdir(out_dir.parent) == [out_dir.name]


# --- 7. the CLI ----------------------------------------------------------------------------------

def test_cli_downloads_local_folder(tmp_path: Path) -> None:
    """`deepfake download` with a local folder exits 0 and reports the counts."""
    make_dataset(tmp_path / "source", nested=True)
    result = run_cli("--out", str(tmp_path / "raw"), "-S", f"data.source={tmp_path / 'source'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("downloaded folder source")
    assert json.loads((tmp_path / "raw" / INFO_FILE).read_text())["files"] == EXPECTED_COUNTS


def test_cli_missing_source_exits_2(tmp_path: Path) -> None:
    """A nonexistent data.source is a one-line error with exit status 2, not a traceback."""
    result = run_cli("--out", str(tmp_path / "raw"), "-S", f"data.source={tmp_path / 'nope'}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("deepfake download: error:")
    assert "not a kaggle: slug" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "raw").exists()


def test_cli_kaggle_without_network_or_credentials(tmp_path: Path) -> None:
    """The default Kaggle source, offline and without credentials, says how to fix it and exits 2."""
    dead_proxy = f"http://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k not in ("KAGGLE_USERNAME", "KAGGLE_KEY")}
    env.update(dict.fromkeys(PROXY_VARS, dead_proxy))
    env.update(KAGGLEHUB_CACHE=str(tmp_path / "kagglehub"), KAGGLE_CONFIG_DIR=str(tmp_path / "kaggle-config"),
               NO_PROXY="", no_proxy="", CI="true")

    start = time.monotonic()
    result = run_cli("--out", str(tmp_path / "raw"), env=env, cwd=tmp_path, timeout=60)

    assert time.monotonic() - start < 60
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("deepfake download: error: cannot download Kaggle dataset")
    assert "KAGGLE_USERNAME" in result.stderr
    assert "data.source" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "raw").exists()
