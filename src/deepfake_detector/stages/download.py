"""The download stage: ``data.source`` into ``data/raw``, one folder per source when there are several."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from deepfake_detector import data
from deepfake_detector.atomic import replace_dir
from deepfake_detector.params import Params
from deepfake_detector.sources import SOURCES_FILE, parse_sources


def run(p: Params, out: Path) -> dict:
    """Fetch ``data.source`` into ``out``; returns the source info and file counts.

    One source lands in ``out`` itself (as it always has); several land in ``out/<name>``, listed in
    ``out/sources.json``, and ``out`` is replaced only once every one is complete.
    """
    out = Path(out)
    sources = parse_sources(p.data.source)
    fetch = dict(timeout_s=p.download.timeout_s, retries=p.download.retries, limits=p.download)
    if len(sources) == 1:
        return data.download(next(iter(sources.values())), out, p.data.sha256, **fetch)
    if p.data.sha256:
        raise data.DataError("data.sha256 checks one archive: with several sources, pin each one instead "
                             "(a dvc:REPO@REV, or an archive whose name fixes its bytes)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        staging = Path(tmp) / "sources"
        infos = {name: data.download(location, staging / name, **fetch) for name, location in sources.items()}
        (staging / SOURCES_FILE).write_text(json.dumps(infos, indent=2) + "\n")
        replace_dir(staging, out)
    return {"kind": "sources", "source": p.data.source, "files": {n: i["files"] for n, i in infos.items()},
            "sources": infos}
