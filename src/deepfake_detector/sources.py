"""Several datasets as one: name the sources of ``data.source``, list their images, split the unsplit.

``data.source`` is one location (as before), a list of locations, or a mapping ``{name: location}``;
text forms of the last two (YAML or JSON, as passed on a command line) are accepted too. A source
is split (``{train,valid,test}/{real,fake}/``, a split or class folder may be missing, so a
fakes-only source counts) or unsplit (``real/`` and/or ``fake/``): the files of an unsplit source
go to a split by the sha256 of their bytes, so a file keeps its split whatever its name, copies of
one image never straddle two splits, and new files never move old ones.
"""

from __future__ import annotations

import hashlib
import json
import re
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from deepfake_detector.data import ARCHIVE_SUFFIXES, CLASSES, SPLITS, DataError, _dvc_spec, find_data_root, iter_files
from deepfake_detector.data import pinned as data_pinned

NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")  # names become MLflow metric keys and folder names
DEFAULT_NAME = "default"  # a lone location whose name cannot be derived (".")
SOURCES_FILE = "sources.json"  # in data/raw when there are several sources: what each one was
# The twins stage's output is one more fake source under this name when its record says it is enabled.
TWINS_SOURCE, TWINS_FILE = "twins", "twins.json"


def twin_name(source: str, name: str) -> str:
    """The file name of the twin of ``source``'s real image ``name``: ``<source>.<name>.jpg`` (a source's
    name has no dot, and a file's name is unique in its folder: no two twins collide)."""
    return f"{source}.{name}.jpg"


def twin_origin(path: str) -> str:
    """The source whose real image the twin at ``path`` was made from (see :func:`twin_name`)."""
    return Path(path).name.split(".", 1)[0]


@dataclass(frozen=True)
class Entry:
    path: Path
    rel: str  # posix path under the source's data root (the folder of the splits, or of real/ fake/)
    label: int  # index in CLASSES: 0 real, 1 fake
    split: str


def parse_sources(value: object) -> dict[str, str]:
    """``data.source`` as an ordered ``{name: location}``; raises DataError naming a bad entry.

    A string is one location, or a YAML/JSON list or mapping when it starts with ``[`` or ``{``.
    Locations are kept as given; a list's names are derived by :func:`source_name`.
    """
    if isinstance(value, str) and value.strip().startswith(("[", "{")):
        try:
            value = yaml.load(value, _UniqueKeyLoader)  # a SafeLoader
        except yaml.YAMLError as exc:
            raise DataError(f"data.source {value!r} is neither a location nor a valid YAML list or mapping: "
                            f"{str(exc).splitlines()[0]}") from None
    if isinstance(value, str):
        _check_location(value, "data.source")
        return {source_name(value, strict=False): value}
    if isinstance(value, Mapping):
        pairs = list(value.items())
        for key, location in pairs:
            if not (isinstance(key, str) and NAME.fullmatch(key)):
                raise DataError(f"data.source name {key!r} must match {NAME.pattern} (lower case: it names "
                                "metrics and folders)")
            _check_location(location, f"data.source entry {key!r}")
    elif isinstance(value, (list, tuple)):
        for i, location in enumerate(value, 1):
            _check_location(location, f"data.source entry {i}")
        pairs = [(source_name(location), location) for location in value]
    else:
        raise DataError(f"data.source must be a location, a list or a mapping, not {type(value).__name__}")
    if not pairs:
        raise DataError("data.source is an empty list or mapping: name at least one dataset")
    for i, (name, location) in enumerate(pairs):
        for j, (other, earlier) in enumerate(pairs[:i]):
            if name == other or location == earlier:  # a list's entries go by position, a mapping's by name
                a, b = (repr(other), repr(name)) if isinstance(value, Mapping) else \
                    (f"{j + 1} ({earlier!r})", f"{i + 1} ({location!r})")
                why = f"are the same location {location!r}: its images would count twice" if location == earlier \
                    else f"are both named {name!r}: name them with {{name: location, ...}}"
                raise DataError(f"data.source entries {a} and {b} {why}")
    return dict(pairs)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that repeats a key (safe_load keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        keys = [self.construct_object(key, deep=True) for key, _ in node.value]
        repeated = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
        if repeated is not None:
            raise DataError(f"data.source names {repeated!r} twice")
        return super().construct_mapping(node, deep)


def _check_location(location: object, what: str) -> None:
    if not isinstance(location, str) or not location.strip():
        raise DataError(f"{what} must be a non-empty location string, got {location!r}")


def source_name(location: str, strict: bool = True) -> str:
    """The name a location goes by: the Kaggle dataset, the DVC repository, or the archive's or
    folder's name without archive suffix, lower-cased with other characters as ``-``.

    One that gives no name (``.``) raises DataError, or is :data:`DEFAULT_NAME` unless ``strict``.
    """
    if location.startswith("kaggle:"):
        parts = location.removeprefix("kaggle:").split("/")
        stem = parts[1] if len(parts) > 1 else parts[0]  # OWNER/NAME[/versions/N]
    elif location.startswith("dvc:"):
        stem = re.split(r"[/:]", _dvc_spec(location.removeprefix("dvc:"))[0].rstrip("/"))[-1]
        stem = stem.removesuffix(".git")
    else:
        is_url = location.startswith(("http://", "https://"))
        stem = Path(urllib.parse.urlparse(location).path if is_url else location).name
        suffix = max((s for s in ARCHIVE_SUFFIXES if stem.lower().endswith(s)), key=len, default="")
        stem = stem[:len(stem) - len(suffix)]
    name = re.sub(r"[^a-z0-9_-]+", "-", stem.lower()).lstrip("_-")
    if name:
        return name
    if strict:
        raise DataError(f"cannot derive a name from data.source entry {location!r}: name it with "
                        "{name: location, ...}")
    return DEFAULT_NAME


def pinned(value: str, sha256: str = "") -> bool:
    """Whether every source's bytes are fixed by its name (:func:`data.pinned`; ``sha256`` checks a lone one)."""
    sources = parse_sources(value)
    return all(data_pinned(location, sha256 if len(sources) == 1 else "") for location in sources.values())


def split_for(digest: bytes, ratios: tuple[float, float, float]) -> str:
    """The split of a file whose sha256 is ``digest``, by (train, valid, test) shares summing to 1."""
    _check_ratios(ratios)
    position = int.from_bytes(digest[:8], "big") / 2 ** 64  # uniform in [0, 1)
    if position < ratios[0]:
        return SPLITS[0]
    return SPLITS[1] if position < ratios[0] + ratios[1] else SPLITS[2]


def _check_ratios(ratios: tuple[float, float, float]) -> None:
    if len(ratios) != 3 or any(not 0 <= r <= 1 for r in ratios) or abs(sum(ratios) - 1) > 1e-6:
        raise DataError(f"split ratios {tuple(ratios)} must be three shares (train, valid, test) summing to 1")


def list_images(root: Path, ratios: tuple[float, float, float]) -> list[Entry]:
    """The images of the source in ``root``, sorted by split, label and path.

    A split source keeps its splits (``ratios`` unused); an unsplit one is split by :func:`split_for`.
    Every file directly in a class folder counts: one that is no usable image is for preprocess to
    quarantine, with its reason, not to drop unseen.
    """
    data_root, is_split = find_data_root(root)
    if not is_split:
        _check_ratios(ratios)
    folders = [(s, label, data_root / s / c) for s in SPLITS for label, c in enumerate(CLASSES)] if is_split \
        else [(None, label, data_root / c) for label, c in enumerate(CLASSES)]
    entries = [Entry(p, p.relative_to(data_root).as_posix(), label, split or _hash_split(p, ratios))
               for split, label, folder in folders if folder.is_dir()
               for p in iter_files(folder)]
    if not entries:
        raise DataError(f"no files in the class folders under {data_root}")
    return sorted(entries, key=lambda e: (SPLITS.index(e.split), e.label, e.rel))


def _hash_split(path: Path, ratios: tuple[float, float, float]) -> str:
    with path.open("rb") as f:
        return split_for(hashlib.file_digest(f, "sha256").digest(), ratios)


def twins_info(folder: Path | None) -> dict | None:
    """The twins stage's record (``twins.json``) when ``folder`` holds twins it made, else None
    (no folder, or the stage ran with ``twins.enabled: false``)."""
    if folder is None or not (Path(folder) / TWINS_FILE).exists():
        return None
    info = json.loads((Path(folder) / TWINS_FILE).read_text())
    return info if info["enabled"] else None


def count_classes(entries: Iterable[Entry]) -> dict[str, dict[str, int]]:
    """Images per split and class: ``{split: {"real": n, "fake": m}}``, every split and class present."""
    counts = {split: dict.fromkeys(CLASSES, 0) for split in SPLITS}
    for entry in entries:
        counts[entry.split][CLASSES[entry.label]] += 1
    return counts


def check_classes(counts: Mapping[str, Mapping[str, int]], sources: Iterable[str] = ()) -> None:
    """Raise DataError naming each split that lacks a class in ``counts`` (summed over ``sources``).

    Every split needs both classes: train to learn, valid to choose the checkpoint and threshold,
    and test too, since its ROC AUC (the metric models are promoted on) needs both.
    """
    gaps = [f"split {split} has no {cls} images" for split in SPLITS for cls in CLASSES
            if not counts.get(split, {}).get(cls, 0)]
    if gaps:
        names = list(sources)
        across = f" across source{'s' * (len(names) != 1)} {', '.join(names)}" if names else ""
        raise DataError(f"{', '.join(gaps)}{across}: every split needs real and fake images "
                        "(add a source with the missing class)")
