"""Fetch the raw dataset (Kaggle, an archive URL or a local copy) and find its splits.

The 140k Real and Fake Faces layout is ``real_vs_fake/real-vs-fake/{train,valid,test}/{real,fake}``;
copies that drop the outer folders are accepted too, since :func:`find_data_root` looks for the
folder that holds the splits; a source with only ``real/`` and/or ``fake/`` is accepted as well, and
split by :mod:`sources`. Also here: reading a labelled folder or CSV (``evaluate --data``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import stat
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import numpy as np
import yaml

from deepfake_detector.atomic import replace_dir
from deepfake_detector.errors import UserError
from deepfake_detector.params import DownloadParams, resolve

SPLITS = ("train", "valid", "test")
CLASSES = ("real", "fake")  # index = label: 0 real, 1 fake (the positive class we detect)
INFO_FILE = "download.json"
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tgz", ".tar.gz", ".tbz2", ".tar.bz2", ".txz", ".tar.xz")


class DataError(UserError):
    """The dataset cannot be fetched, unpacked or recognised."""


def download(source: str, out_dir: Path, sha256: str = "", timeout_s: float = 60.0,
             retries: int = 3, limits: DownloadParams = DownloadParams()) -> dict:
    """Put the dataset named by ``source`` into ``out_dir`` and return what was fetched.

    ``source`` is ``kaggle:OWNER/NAME``, an ``http(s)://`` URL of a zip or tar archive, a local
    folder or archive, or ``dvc:REPO[@REV]``: the ``data/raw`` that this project's pipeline
    versioned in git repository REPO at revision REV, fetched from that repository's DVC remote.
    ``out_dir`` is replaced only once the new copy is complete. An archive is unpacked within
    ``limits``' max_bytes, max_entries and max_ratio (see :func:`extract_archive`).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    skipped_links: list[str] = []
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as tmp:
        staging = Path(tmp) / "dataset"
        if source.startswith("kaggle:"):
            kind = "kaggle"
            skipped_links = _copy_tree(_kaggle_download(source.removeprefix("kaggle:")), staging)
        elif source.startswith("dvc:"):
            kind = "dvc"
            dvc_info = _dvc_get(source.removeprefix("dvc:"), staging)
        elif source.startswith(("http://", "https://")):
            kind = "url"
            archive = Path(tmp) / _archive_name(source)
            _fetch_url(source, archive, timeout_s, retries)
            _check_sha256(archive, sha256)
            extract_archive(archive, staging, limits)
        else:
            local = Path(resolve(str(Path(source).expanduser())))  # relative: against the project
            if not local.exists():
                raise DataError(f"data.source {source!r} is not a kaggle: slug, an http(s) URL or an "
                                "existing path")
            if out_dir.resolve().is_relative_to(local.resolve()):
                raise DataError(f"--out {out_dir} is inside data.source {source}: it would copy into itself")
            kind = "archive" if local.is_file() else "folder"
            if local.is_file():
                _check_sha256(local, sha256)
                extract_archive(local, staging, limits)
            else:
                skipped_links = _copy_tree(local, staging)
        data_root, is_split = find_data_root(staging)
        counts = {split: {cls: sum(1 for _ in iter_files(folder / cls)) for cls in CLASSES if (folder / cls).is_dir()}
                  for split, folder in ([(s, data_root / s) for s in SPLITS if (data_root / s).is_dir()]
                                        if is_split else [("unsplit", data_root)])}
        info = {"source": source, "kind": kind, "split_root": data_root.relative_to(staging).as_posix(),
                "files": counts, **({"dvc": dvc_info} if kind == "dvc" else {}),
                **({"skipped_links": skipped_links} if skipped_links else {})}
        (staging / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        replace_dir(staging, out_dir)
    return info


def pinned(source: str, sha256: str = "") -> bool:
    """Whether ``source`` names fixed bytes: a URL or archive checked against ``sha256``, or
    ``dvc:REPO@REV`` (REV taken to be a tag or commit). A Kaggle dataset or a local folder can change."""
    if source.startswith("dvc:"):
        return bool(_dvc_spec(source.removeprefix("dvc:"))[1])
    if source.startswith("kaggle:"):
        return False
    if source.startswith(("http://", "https://")):
        return bool(sha256)
    # A local path: only an archive is checked against sha256, and it is not on this machine to
    # look at (a Kubeflow step reads it in its container), so go by its name.
    return bool(sha256) and source.lower().endswith(ARCHIVE_SUFFIXES)


def find_data_root(root: Path, max_depth: int = 4) -> tuple[Path, bool]:
    """The shallowest folder under ``root`` with split folders (returns it, True: the 140k layout, or
    copies that drop its outer folders) or else class folders (it, False: an unsplit source). A split
    or class may be missing: a fakes-only source is one of several (see :mod:`sources`)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    level = [root]
    for _ in range(max_depth + 1):
        for folder in level:
            for names, split in ((SPLITS, True), (CLASSES, False)):
                if any((folder / n).is_dir() for n in names):
                    return folder, split
        level = sorted(d for f in level for d in f.iterdir() if d.is_dir() and not d.is_symlink())
    raise DataError(f"no {{{','.join(SPLITS)}}}/ or {{{','.join(CLASSES)}}}/ folders found under {root}")


def iter_files(folder: Path) -> Iterator[Path]:
    """Files directly in ``folder``, sorted by name so every run sees the same order."""
    return (p for p in sorted(Path(folder).iterdir(), key=lambda p: p.name) if p.is_file())


def labelled_files(path: Path, root: Path | None = None) -> tuple[list[Path], np.ndarray]:
    """Image paths and labels (0 real, 1 fake) of a folder with ``real/`` and/or ``fake/``, or a CSV.

    The CSV needs a ``path`` column and a label: ``label_str`` (real/fake, as in the Kaggle CSVs) or
    ``label`` as real/fake or 0 (real)/1 (fake). Note the Kaggle CSVs' numeric ``label`` is the other
    way round; they also carry ``label_str``. Relative paths are under ``root`` if given, else under
    the first of :data:`CSV_ROOTS` where they are found.
    """
    path = Path(path)
    if path.is_dir():
        if root is not None:
            raise DataError(f"--root is for a CSV, and {path} is a folder")
        if not any((path / c).is_dir() for c in CLASSES):
            raise DataError(f"{path} needs a real/ or fake/ subfolder (or both)")
        pairs = [(p, label) for label, cls in enumerate(CLASSES) if (path / cls).is_dir()
                 for p in iter_files(path / cls)]
    elif path.is_file():
        rows, columns = _read_csv(path)
        key = _label_column(columns)
        if "path" not in columns or key not in columns:
            raise DataError(f"{path}: a CSV needs 'path' and 'label' (or 'label_str') columns")
        names = {"real": 0, "fake": 1, "0": 0, "1": 1}
        bad = [r[key] for r in rows if (r[key] or "").strip().lower() not in names]
        if bad:
            raise DataError(f"{path}: labels must be real/fake or 0/1, got {bad[0]!r}")
        base = _csv_root(path, [r["path"] for r in rows], root)
        pairs = [(base / r["path"], names[r[key].strip().lower()]) for r in rows]
    else:
        raise DataError(f"{path} is neither a folder with real/ and fake/ nor a CSV file")
    if not pairs:
        raise DataError(f"{path} has no images")
    return [p for p, _ in pairs], np.array([label for _, label in pairs], dtype=np.int64)


def _read_csv(path: Path) -> tuple[list[dict], list[str]]:
    """A CSV's rows and columns; DataError for a file that is not one (an image given as --data)."""
    if path.suffix.lower() != ".csv":
        raise DataError(f"{path} is not a CSV: give a folder with real/ and/or fake/, or a CSV with path and "
                        "label columns")
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            return list(reader), list(reader.fieldnames or [])
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path} cannot be read as a CSV: {exc}") from None


def _label_column(columns: list[str]) -> str:
    return "label_str" if "label_str" in columns else "label"


def numeric_labels(data_path: str | Path) -> bool:
    """Whether ``data_path`` is a CSV whose labels come from a ``label`` column of 0 and 1 (which
    Kaggle's CSVs fill the other way round), not from ``label_str`` or real/fake words."""
    path = Path(str(data_path))
    if not path.is_file():
        return False
    rows, columns = _read_csv(path)
    key = _label_column(columns)
    return key == "label" and all((r.get(key) or "").strip() in ("0", "1") for r in rows)


# Where a CSV's relative paths may be, from its folder: its own files; faces-mini (CSVs beside
# real-vs-fake/); Kaggle's 140k download (CSVs beside real_vs_fake/real-vs-fake/). The Kaggle
# CSVs' paths (train/real/x.jpg) are relative to real-vs-fake/.
CSV_ROOTS = (".", "real-vs-fake", "real_vs_fake/real-vs-fake")


def _csv_root(csv_file: Path, paths: list[str], root: Path | None) -> Path:
    """The folder ``paths`` of ``csv_file`` are relative to: ``root`` if given, else the first of
    :data:`CSV_ROOTS` under which any of the first paths exists (a few missing files do not matter;
    they are reported as unreadable)."""
    candidates = [Path(root)] if root is not None else [csv_file.parent / c for c in CSV_ROOTS]
    sample = paths[:50]
    found = next((c for c in candidates if any((c / p).is_file() for p in sample)), None)
    if found is None and sample:
        tried = ", ".join(f"{c}/" for c in candidates)
        raise DataError(f"{csv_file}: its paths (such as {sample[0]}) are not under {tried}; "
                        + ("is --root right?" if root is not None else "pass --root, the folder they are relative to"))
    return found or candidates[0]


def extract_archive(archive: Path, dest: Path, limits: DownloadParams = DownloadParams()) -> None:
    """Unpack a zip or tar into ``dest``, refusing links, entries that escape it and archive bombs.

    Every entry is checked before anything is written, from the zip's central directory or the
    tar's headers: no links, nothing outside ``dest``, and in all at most ``limits.max_entries``
    entries, ``limits.max_bytes`` uncompressed bytes and ``limits.max_ratio`` times the archive's size.
    """
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, dest, limits)
        elif tarfile.is_tarfile(archive):
            _extract_tar(archive, dest, limits)
        else:
            raise DataError(f"{archive.name} is not a zip or tar archive")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"cannot unpack {archive.name}: {exc}") from None


def _safe_target(dest: Path, member: str, archive: Path) -> Path:
    target = (dest / member).resolve()
    if os.path.isabs(member) or not target.is_relative_to(dest.resolve()):
        raise DataError(f"refusing to unpack {archive.name}: entry {member!r} escapes the target folder")
    return target


class _Tally:
    """The entries and uncompressed bytes of an archive so far, refused once past ``limits``."""

    def __init__(self, archive: Path, limits: DownloadParams) -> None:
        self.archive, self.limits, self.packed = archive, limits, archive.stat().st_size
        self.entries = self.bytes = 0

    def add(self, size: int) -> None:
        """Count one entry of ``size`` uncompressed bytes."""
        self.entries += 1
        self.bytes += size
        limits = self.limits
        if self.entries > limits.max_entries:
            self._refuse(f"more than {limits.max_entries:,} entries", "max_entries", f"{limits.max_entries:,}")
        if self.bytes > limits.max_bytes:
            self._refuse(f"at least {_size(self.bytes)} uncompressed", "max_bytes", _size(limits.max_bytes))
        # The total only grows: checked as it does, a bomb is refused at its first entries, and an
        # archive whose whole is within the ratio never is.
        if self.bytes > limits.max_ratio * self.packed:
            self._refuse(f"at least {_size(self.bytes)} from a {_size(self.packed)} archive (ratio "
                         f"{self.bytes / max(self.packed, 1):,.0f})", "max_ratio", f"{limits.max_ratio:g}")

    def _refuse(self, what: str, key: str, limit: str) -> NoReturn:
        raise DataError(f"refusing to unpack {self.archive.name}: {what} exceeds download.{key} ({limit}); "
                        "raise it in params.yaml if this archive is trusted")


def _size(n: float) -> str:
    """A byte count for people: 10.5 GB, 50.0 MB, 0.3 kB."""
    unit, scale = next((u, s) for u, s in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)) if n >= s or u == "kB")
    return f"{n / scale:.1f} {unit}"


def _extract_zip(archive: Path, dest: Path, limits: DownloadParams) -> None:
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        tally = _Tally(archive, limits)
        for info in members:  # the central directory: check everything before writing anything
            _safe_target(dest, info.filename, archive)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise DataError(f"refusing to unpack {archive.name}: entry {info.filename!r} is a link")
            tally.add(info.file_size)
        # A header may lie, but zipfile stops each entry at its declared file_size (and then fails
        # its CRC), so what is written stays within the sizes just checked.
        zf.extractall(dest, members)


def _extract_tar(archive: Path, dest: Path, limits: DownloadParams) -> None:
    # Streamed, and stopped at max_entries rather than listed whole (a bomb may hold millions of
    # entries): the first pass checks every header before anything is written; the second writes,
    # checking again in case the file changed. A size cannot lie: the next header starts where it says.
    for write in (False, True):
        tally = _Tally(archive, limits)
        with tarfile.open(archive, "r|*") as tf:
            for member in tf:
                _safe_target(dest, member.name, archive)
                if not (member.isfile() or member.isdir()):
                    raise DataError(f"refusing to unpack {archive.name}: entry {member.name!r} is a link "
                                    "or special file")
                tally.add(member.size)
                if write:
                    tf.extract(member, dest, filter="data")


def _archive_name(url: str) -> str:
    return Path(urllib.parse.urlparse(url).path).name or "dataset.archive"


def _fetch_url(url: str, target: Path, timeout_s: float, retries: int) -> None:
    last: Exception | None = None
    for attempt in range(1, retries + 2):
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response, target.open("wb") as out:
                shutil.copyfileobj(response, out, length=1 << 20)
            return
        except urllib.error.HTTPError as exc:
            if exc.code < 500:  # 4xx will not get better by retrying
                raise DataError(f"cannot download {url}: HTTP {exc.code} {exc.reason}") from None
            last = exc
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            last = exc
        if attempt <= retries:
            time.sleep(min(2 ** (attempt - 1), 10))
    reason = getattr(last, "reason", last)
    raise DataError(f"cannot download {url} after {retries + 1} attempts: {reason}. Check the network, "
                    "or set data.source to a local folder or archive") from None


def _check_sha256(path: Path, expected: str) -> None:
    if not expected:
        return
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected.lower():
        raise DataError(f"sha256 mismatch for {path.name}: expected {expected}, got {digest.hexdigest()}")


def _copy_tree(src: Path, dst: Path) -> list[str]:
    """Copy the folder ``src`` to ``dst``; returns the links skipped (relative paths).

    A link to a file inside ``src`` is copied as that file. A link that leads out of ``src`` (it
    could pull any file of this machine into data/raw, and `dvc push` would ship it) and a link to
    a folder (a loop, or the same files twice) are skipped and reported.
    """
    root, skipped = src.resolve(), []
    # Plain copies, not copytree: sources may be read-only (a shared mount) and their modes must not
    # follow the files into data/raw, or DVC could not replace them later.
    for folder, dirs, files in os.walk(src):  # never descends into a linked folder
        dirs.sort()
        here = Path(folder)
        skipped += [(here / d).relative_to(src).as_posix() for d in dirs if (here / d).is_symlink()]
        target = dst / here.relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        for name in files:
            path = here / name
            if path.is_symlink() and not path.resolve().is_relative_to(root):
                skipped.append(path.relative_to(src).as_posix())
            elif name != INFO_FILE and path.is_file():
                shutil.copyfile(path, target / name)
    return sorted(skipped)


DVC_DATA_PATH = "data/raw"


def _dvc_get(spec: str, dest: Path) -> dict:
    """``dvc get`` of ``data/raw`` from ``REPO[@REV]``; returns the repo, rev and DVC hash used."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    url, rev = _dvc_spec(spec)
    try:
        Repo.get(url, DVC_DATA_PATH, out=str(dest), rev=rev or None)
    except (DvcException, OSError) as exc:
        raise DataError(f"cannot get {DVC_DATA_PATH} from DVC repo {url}"
                        f"{f' at {rev}' if rev else ''}: {exc}") from None
    return {"repo": url, "rev": rev or "HEAD", "md5": _dvc_md5(url, rev or None)}


def _dvc_spec(spec: str) -> tuple[str, str]:
    """``REPO[@REV]`` as (repo, rev); rev is "" when none is given."""
    url, _, rev = spec.rpartition("@")
    if not url or ":" in rev:  # no @REV, or the @ belongs to the URL (git@host:org/repo)
        return spec, ""
    return url, rev


def _dvc_md5(url: str, rev: str | None) -> str | None:
    """The DVC hash of ``data/raw`` at ``rev``: from dvc.lock (a pipeline output) or data/raw.dvc."""
    import dvc.api
    from dvc.exceptions import DvcException

    for path, name in (("dvc.lock", DVC_DATA_PATH), (f"{DVC_DATA_PATH}.dvc", Path(DVC_DATA_PATH).name)):
        try:
            doc = yaml.safe_load(dvc.api.read(path, repo=url, rev=rev)) or {}
        except (DvcException, OSError):
            continue
        outs = doc.get("outs", []) + [o for st in doc.get("stages", {}).values() for o in st.get("outs", [])]
        md5 = next((o.get("md5") for o in outs if o.get("path") == name), None)
        if md5:
            return md5
    return None


def _kaggle_download(slug: str) -> Path:
    try:
        import kagglehub  # optional: only this source needs it
    except ImportError:
        raise DataError("data.source is a Kaggle dataset but kagglehub is not installed: "
                        "pip install kagglehub") from None
    try:
        return Path(kagglehub.dataset_download(slug))
    except Exception as exc:  # kagglehub raises many types (HTTP, auth, network); all mean the same here
        raise DataError(
            f"cannot download Kaggle dataset {slug!r}: {exc}. Set KAGGLE_USERNAME and KAGGLE_KEY (or put "
            "kaggle.json in ~/.kaggle/) from https://www.kaggle.com/settings, or set data.source to a local "
            "copy, in params.yaml or for one run: "
            "source .venv/bin/activate && dvc exp run -S data.source=/path/to/140k-real-and-fake-faces") from None
