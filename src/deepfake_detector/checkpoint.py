"""Resumable training checkpoints.

A checkpoint holds everything a run needs to go on as if never stopped: model, optimizer,
scheduler and scaler state, position (epoch, and the step inside it when stopped by a signal),
history, the best epoch's weights and every RNG state. It is written to a temporary file, flushed
and renamed, so a crash leaves the previous checkpoint or the new one, never half of one; the two
newest are kept, so a file damaged some other way (a full disk, a truncated copy) falls back to
the one before it. The folder lives outside the stage's DVC outputs (which DVC deletes before a
rerun), and each checkpoint carries a key (a hash of the train params and the input data): one
made for other params or data is ignored with a message.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch

from deepfake_detector.atomic import replacing_file

NAME = re.compile(r"^epoch-(\d+)(?:-step-(\d+))?\.pt$")
KEEP = 2


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` so that ``path`` holds the previous content or the new one, never half of it."""
    with replacing_file(path, "wb") as f:
        torch.save(obj, f)


def data_fingerprint(processed_dir: Path, splits: tuple[str, ...] = ("train", "valid")) -> dict[str, str]:
    """What identifies the training data without reading gigabytes: the preprocess report, each
    split's index (paths, labels and applied degradations) and array size."""
    processed_dir = Path(processed_dir)
    out = {"meta.json": _sha256(processed_dir / "meta.json")}
    for split in splits:
        out[f"{split}/index.csv"] = _sha256(processed_dir / split / "index.csv")
        out[f"{split}/images.npy"] = str((processed_dir / split / "images.npy").stat().st_size)
    return out


def run_key(config: dict[str, Any]) -> str:
    """A short stable hash of a JSON-able config (train params and data fingerprint)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


class CheckpointStore:
    """The checkpoints of one training run, in ``folder``, valid only for ``key``."""

    def __init__(self, folder: Path, key: str) -> None:
        self.folder, self.key = Path(folder), key

    def files(self) -> list[Path]:
        """Checkpoint files, newest first (by epoch, then step; a finished epoch after its steps)."""
        if not self.folder.is_dir():
            return []
        found = []
        for path in self.folder.iterdir():
            m = NAME.match(path.name)
            if m:
                step = int(m.group(2)) if m.group(2) else float("inf")
                found.append(((int(m.group(1)), step), path))
        return [p for _, p in sorted(found, reverse=True)]

    def latest(self, log=print) -> dict[str, Any] | None:
        """The newest readable checkpoint made for this key, or None; says why others are skipped."""
        for path in self.files():
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # a truncated or corrupt file: torch raises several kinds
                log(f"checkpoint {path} is unreadable ({type(exc).__name__}): using the one before it")
                continue
            if state.get("key") != self.key:
                log(f"checkpoint {path} was made for other train params or data "
                    f"(key {state.get('key')} != {self.key}): starting afresh")
                return None
            log(f"resuming from {path}")
            return state
        return None

    def save(self, state: dict[str, Any], epoch: int, step: int | None = None) -> Path:
        """Write ``state`` for ``epoch`` (and ``step`` inside it, when stopped mid-epoch); prune."""
        name = f"epoch-{epoch:04d}" + (f"-step-{step:06d}" if step is not None else "") + ".pt"
        path = self.folder / name
        atomic_save({**state, "key": self.key}, path)
        for old in self.files()[KEEP:]:
            old.unlink(missing_ok=True)
        return path

    def clear(self) -> None:
        """Remove this run's checkpoints (once the stage has succeeded)."""
        for path in self.files():
            path.unlink(missing_ok=True)
        try:
            self.folder.rmdir()
        except OSError:
            pass  # not empty (other files) or already gone


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
