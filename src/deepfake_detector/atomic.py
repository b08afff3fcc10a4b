"""Outputs that are never seen half written: a file or a stage's folder is written beside its
target and renamed over it once complete, so a crash leaves the previous version or the new one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from deepfake_detector.errors import UserError


@contextmanager
def replacing_file(path: Path, mode: str) -> Iterator[IO]:
    """A temporary file beside ``path`` to write; once written, synced and renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes the file private (0600); the result is an ordinary file
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    with replacing_file(path, "w") as f:
        f.write(text)


@contextmanager
def replacing_dir(out: Path, outputs: Collection[str]) -> Iterator[Path]:
    """A new folder ``<out>.tmp-<pid>`` beside ``out`` for a stage to write into; it replaces ``out``
    once the block succeeds, so a crash leaves the previous complete outputs (or none), never a mix.

    ``outputs`` are the names the stage writes: an ``out`` holding anything else (a user's folder)
    is refused, not replaced. Siblings left by a killed run are removed first.
    """
    out = Path(out).resolve()  # `.` has no name; and a link's target is what gets replaced
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is not a folder")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in outputs) if out.is_dir() else []
    if foreign:
        raise UserError(f"{out} holds files this stage does not write ({', '.join(foreign[:5])}), and it "
                        "replaces the folder as a whole: choose a new or empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    prefix = f"{out.name}.tmp-"
    for stale in out.parent.iterdir():  # a live pid's folder is a concurrent run's, not ours to delete
        pid = stale.name.removeprefix(prefix).removesuffix(".old")
        if stale.name.startswith(prefix) and pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    staging = out.with_name(f"{prefix}{os.getpid()}")
    staging.mkdir()
    try:
        yield staging
        replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def replace_dir(new: Path, target: Path) -> None:
    """Rename the complete folder ``new`` to ``target`` (on the same file system); a previous
    ``target`` is moved aside first and deleted only once ``new`` is in place."""
    if target.exists():
        old = new.with_name(f"{new.name}.old")
        target.rename(old)
        new.rename(target)
        shutil.rmtree(old)
    else:
        new.rename(target)


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process's own leftover: it is not writing there now
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True
