"""Leave one source out: whether the detector generalises to a generator it never saw.

With several named fake sources (``data.source``, see :mod:`~deepfake_detector.sources`), each one in
turn is left out of training: the model is trained on every image except that source's fakes (its
reals stay: a StyleGAN source also holds the FFHQ photographs), its threshold is chosen on the valid
split filtered the same way, and it is scored on the whole test split, each source's fakes against
all reals (:func:`~deepfake_detector.metrics.per_fake_source`). The held-out source's AUC, the diagonal of
the matrix, is the number that says whether the detector catches fakes of a kind it was not trained
on; the other cells are the in-distribution control. With a familiarity head (``model.familiarity``),
each cell also says how many of those fakes were flagged unfamiliar, and how many were caught or
flagged: a fake of a new generator that the detector misses is not passed as real without a warning.

A source of reals alone (a camera: faces-utk beside faces-mini) is left out in turn as well, its reals
out of train and valid, while other sources hold reals: its false-positive rate, the diagonal of the
real sources' matrix (:func:`~deepfake_detector.metrics.per_real_source`), says whether "real" carries
over to photographs from a camera the model never saw.

Writes ``loso.json`` (the matrix and each fit's summary), ``loso.md`` (the matrix as a table) and
``fits/<source>/model/`` (each fit's ``model.pt``, ``history.csv`` and ``train.json``), and logs one
MLflow run named ``leave-one-source-out``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from deepfake_detector.atomic import replacing_dir
from deepfake_detector.data import CLASSES, SPLITS
from deepfake_detector.detector import Decision, Detector
from deepfake_detector.errors import UserError
from deepfake_detector.evaluate import proxy_fakes, valid_threshold
from deepfake_detector.metrics import compute_metrics, per_fake_source, per_real_source
from deepfake_detector.params import Params, flatten
from deepfake_detector.preprocess import load_split, npy_header, read_index
from deepfake_detector.sources import DEFAULT_NAME, TWINS_SOURCE, twin_origin
from deepfake_detector.train import fit, prepared_as

RUN_NAME = "leave-one-source-out"  # the MLflow run's name, and its ``check`` tag
OUTPUTS = ("loso.json", "loso.md", "fits")  # all :func:`run` writes into its folder
FILTERED = ("train", "valid")  # the splits a left-out source's fakes are removed from; test stays whole
CHUNK_BYTES = 64 << 20  # images copied at a time when writing a subset


def fake_sources(processed: Path, split: str = "train") -> list[str]:
    """The sources with fake images in ``split``, in order of first appearance in its index."""
    _, rows = read_index(processed, split)
    return list(dict.fromkeys(row["source"] for row in rows if int(row["label"]) == 1))


def real_only_sources(processed: Path, split: str = "train") -> list[str]:
    """The sources with real images and no fake ones in ``split``, in order of first appearance."""
    _, rows = read_index(processed, split)
    fakes = set(fake_sources(processed, split))
    return [s for s in dict.fromkeys(row["source"] for row in rows if int(row["label"]) == 0) if s not in fakes]


def _check_processed(processed: Path) -> dict:
    meta_file = Path(processed) / "meta.json"
    if not meta_file.exists():
        raise UserError(f"{meta_file} not found: run the preprocess stage first")
    return json.loads(meta_file.read_text())


def leave_out(processed: Path, out: Path, source: str) -> dict:
    """A copy of the preprocessed folder ``processed`` at ``out`` without ``source``'s fakes in train
    and valid (its reals stay) or, for a source with no fakes in train, without its reals and the
    twins made from them (a twin is its real face, reconstructed); the test split is the whole one
    (hard-linked when possible).

    The subset ``images.npy`` is written a chunk at a time, so memory stays flat however large the
    split. ``meta.json`` is copied with its train and valid counts updated and a ``left_out`` note.
    ``out`` is replaced only once complete. Returns ``{"source", "class": the class removed,
    "removed": {split: n}, "splits": {split: {"images", "real", "fake"}}}``.
    """
    processed, out = Path(processed), Path(out)
    meta = _check_processed(processed)
    known = {row["source"] for split in SPLITS for row in read_index(processed, split)[1]}
    if source not in known:
        raise UserError(f"{processed} has no source {source!r} (it has {', '.join(sorted(known))})")
    label = 1 if source in fake_sources(processed, "train") else 0
    counts: dict = {"source": source, "class": CLASSES[label], "removed": {}, "splits": {}}
    with replacing_dir(out, ("meta.json", *SPLITS)) as staging:
        for split in SPLITS:
            (staging / split).mkdir()
            columns, rows = read_index(processed, split)
            if split in FILTERED:
                keep = [i for i, row in enumerate(rows) if not (int(row["label"]) == label and row["source"] == source)
                        and not (label == 0 and row["source"] == TWINS_SOURCE and twin_origin(row["path"]) == source)]
                _write_subset(processed / split, staging / split, columns, rows, keep)
            else:
                keep = list(range(len(rows)))
                for name in ("images.npy", "index.csv"):
                    _link_or_copy(processed / split / name, staging / split / name)
            labels = [int(rows[i]["label"]) for i in keep]
            counts["removed"][split] = len(rows) - len(keep)
            counts["splits"][split] = {"images": len(keep), **{c: labels.count(k) for k, c in enumerate(CLASSES)}}
            _update_meta_split(meta, split, counts["splits"][split], [rows[i] for i in keep])
        meta["left_out"] = {"source": source, "class": CLASSES[label],
                            "removed": {s: counts["removed"][s] for s in FILTERED}, "from": str(processed.resolve()),
                            "note": f"train and valid hold every image except the {CLASSES[label]} images of "
                                    f"{source}{' and their twins' if label == 0 else ''}; test is the whole test split"}
        (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return counts


def _write_subset(src: Path, dst: Path, columns: list[str], rows: list[dict], keep: list[int]) -> None:
    """``images.npy`` and ``index.csv`` of the rows ``keep`` of the split in ``src``, written to ``dst``."""
    images = np.load(src / "images.npy", mmap_mode="r")
    if len(images) != len(rows):
        raise UserError(f"{src}: {len(images)} images but {len(rows)} rows in index.csv")
    shape = (len(keep), *images.shape[1:])
    per_chunk = max(1, CHUNK_BYTES // max(1, int(np.prod(images.shape[1:])) * images.itemsize))
    index = np.asarray(keep, dtype=np.int64)
    with (dst / "images.npy").open("wb") as f:
        f.write(npy_header(shape))
        for start in range(0, len(index), per_chunk):
            f.write(np.ascontiguousarray(images[index[start:start + per_chunk]]).tobytes())
    with (dst / "index.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows[i] for i in keep)


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (preprocess replaces its folder, never rewrites a file in place), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _update_meta_split(meta: dict, split: str, counts: dict, kept: list[dict]) -> None:
    """``meta``'s counts of ``split`` (and of each source in it) as the subset's ``kept`` rows have them."""
    stats = (meta.get("splits") or {}).get(split)
    if not isinstance(stats, dict):
        return
    stats.update(counts)
    for name, per_class in (stats.get("sources") or {}).items():
        per_class.update({c: sum(r["source"] == name and int(r["label"]) == k for r in kept)
                          for k, c in enumerate(CLASSES)})


def run(p: Params, processed: Path, out: Path, device: torch.device, progress: bool = False,
        keep_data: bool = False) -> dict:
    """Leave each fake source of the train split out in turn, then each source of reals alone (while
    another source holds reals): fit, choose the threshold on the filtered valid split, score the
    whole test split per source.

    A ``model.spectrum_only`` source is never left out (listed as ``never_left_out``).

    Returns ``{"sources", "real_only", "never_left_out", "test_sources", "matrix": {left_out: {test_source:
    {"roc_auc", "average_precision", "recall", "n_fake"}}}, "test_real_sources", "real_matrix": {left_out:
    {real_source: {"false_positive_rate", "n_real", "real_roc_auc"}}}, "held_out": {fake source left out:
    AUC on its own fakes}, "held_out_roc_auc_mean", "held_out_roc_auc_min", "held_out_false_positive_rate":
    {real source left out: share of its reals called fake}, "fits": {left_out: summary}, "run_id"}``
    (``sources`` the fake sources left out, ``real_only`` the real ones); with a familiarity head, each
    cell has ``flagged`` and ``caught_or_flagged`` too (``real_flagged`` in ``real_matrix``), and
    ``held_out_caught_or_flagged`` is ``{left_out: share of its own fakes caught or flagged}``;
    also written to ``out/loso.json`` (NaN as null) and, as tables, ``out/loso.md``. Each fit's
    data subset is deleted once scored unless ``keep_data``. Logs one MLflow run (when
    ``p.mlflow.enabled``) in ``p.mlflow.experiment``. ``out`` is replaced only once complete.
    """
    from deepfake_detector.tracking import Tracker, run_tags  # MLflow only when a run is made

    processed, out = Path(processed), Path(out)
    meta = _check_processed(processed)
    # A model.spectrum_only source (the twins) is the spectrum branch's training family, never the CNN's: it
    # stays in every fold, since without it the branch has nothing to fit and it is no generator to find.
    branch_only = [s for s in fake_sources(processed, "train") if s in p.model.spectrum_only]
    sources = [s for s in fake_sources(processed, "train") if s not in branch_only]
    if len(sources) < 2:
        names = list(meta.get("sources") or [DEFAULT_NAME])
        with_fakes = f"only {sources[0]} has" if sources else "none has"
        besides = f" besides {', '.join(branch_only)} (model.spectrum_only: the spectrum branch's alone)" \
            if branch_only else ""
        raise UserError(f"leave-one-source-out needs at least two fake sources; data.source has {len(names)} "
                        f"({', '.join(names)}) and {with_fakes} fake images in the train split{besides}: add a "
                        "source of fakes from another generator")
    # A camera left out needs reals from elsewhere to train on (faces-mini's FFHQ photographs).
    with_reals = {row["source"] for row in read_index(processed, "train")[1] if int(row["label"]) == 0}
    real_only = real_only_sources(processed, "train") if len(with_reals) > 1 else []
    tracker = Tracker.start(p.mlflow, RUN_NAME, _logged_params(p, meta, sources + real_only),
                            {**run_tags(), "check": RUN_NAME, "device": str(device)})
    result: dict = {"sources": sources, "real_only": real_only, "never_left_out": branch_only, "test_sources": [],
                    "matrix": {}, "test_real_sources": [], "real_matrix": {}, "held_out": {},
                    "held_out_false_positive_rate": {}, "fits": {}}
    with tracker.running(), replacing_dir(out, OUTPUTS) as staging:
        for source in sources + real_only:
            fit_dir = staging / "fits" / source
            print(f"{RUN_NAME}: training without the {'reals' if source in real_only else 'fakes'} of {source}",
                  flush=True)
            counts = leave_out(processed, fit_dir / "data", source)
            summary = fit(fit_dir / "data", fit_dir / "model", p.model, p.train, device, p.seed, progress=progress,
                          **prepared_as(meta))
            scores = _score(p, fit_dir / "data", fit_dir / "model" / "model.pt", device)
            if not keep_data:
                shutil.rmtree(fit_dir / "data")
            result["matrix"][source], result["real_matrix"][source] = scores.pop("per_source"), scores.pop("per_real")
            if source in real_only:
                result["held_out_false_positive_rate"][source] = result["real_matrix"][source][source][
                    "false_positive_rate"]
            else:
                result["held_out"][source] = result["matrix"][source].get(source, {}).get("roc_auc", math.nan)
            result["fits"][source] = {**scores, "counts": counts, "train": summary}
            cells = [*result["matrix"][source].items(), *result["real_matrix"][source].items()]  # a source may be both
            tracker.log_metrics({f"loso.{source}.{test}.{k}": v for test, row in cells for k, v in row.items()
                                 if k in ("roc_auc", "recall", "flagged", "caught_or_flagged", "false_positive_rate",
                                          "real_flagged")}
                                | {f"loso.{source}.{k}": v for k, v in scores.items()}
                                | {f"loso.{source}.best_valid_auc": summary["best_valid_auc"]})
        result["test_sources"] = sorted({t for row in result["matrix"].values() for t in row})
        result["test_real_sources"] = sorted({t for row in result["real_matrix"].values() for t in row})
        held = [v for v in result["held_out"].values() if not math.isnan(v)]
        result["held_out_roc_auc_mean"] = float(np.mean(held)) if held else math.nan
        result["held_out_roc_auc_min"] = float(min(held)) if held else math.nan
        caught = {left: row[left]["caught_or_flagged"] for left, row in result["matrix"].items()
                  if "caught_or_flagged" in row.get(left, {})}
        if caught:  # models with a familiarity head
            result["held_out_caught_or_flagged"] = caught
        tracker.log_metrics({f"loso.held_out_roc_auc_{k}": result[f"held_out_roc_auc_{k}"] for k in ("mean", "min")})
        result["run_id"] = tracker.run_id
        (staging / "loso.json").write_text(json.dumps(_nan_to_null(result), indent=2, allow_nan=False) + "\n")
        (staging / "loso.md").write_text(markdown(result))
        for name in ("loso.json", "loso.md"):
            tracker.log_artifacts(staging / name, "loso")
        for source in sources + real_only:
            for name in ("history.csv", "train.json"):
                tracker.log_artifacts(staging / "fits" / source / "model" / name, f"loso/{source}")
    return result


def _score(p: Params, data: Path, model_pt: Path, device: torch.device) -> dict:
    """The threshold chosen on ``data``'s (filtered) valid split, and the whole test split scored
    with it: overall figures (without the fakes of ``model.spectrum_only`` sources), ``per_source`` (fakes)
    and ``per_real``."""
    detector = Detector.from_checkpoint(model_pt, Decision(), device)
    detector.batch_size = p.evaluate.batch_size
    valid_x, valid_y = load_split(data, "valid")
    valid_sources = [row["source"] for row in read_index(data, "valid")[1]]
    threshold = valid_threshold(valid_y, detector.predict(valid_x), valid_sources, p.model.spectrum_only, p.evaluate)
    test_x, test_y = load_split(data, "test")
    p_fake, unfamiliarity = detector.assess(test_x)
    sources = [row["source"] for row in read_index(data, "test")[1]]
    # The headline leaves the twins' fakes out, as evaluate's does; per_source still shows them as a column.
    keep = ~proxy_fakes(test_y, sources, p.model.spectrum_only)
    overall = compute_metrics(test_y[keep], p_fake[keep], threshold)
    return {"threshold": float(threshold), "test_roc_auc": overall["roc_auc"], "test_accuracy": overall["accuracy"],
            "test_recall": overall["recall"],
            "per_source": per_fake_source(test_y, p_fake, sources, threshold, unfamiliarity),
            "per_real": per_real_source(test_y, p_fake, sources, threshold, unfamiliarity)}


def _logged_params(p: Params, meta: dict, sources: list[str]) -> dict:
    """What the run's models were made with: seed, model, train, the threshold rule and the data
    (as preprocess recorded it in ``meta.json``), and the sources left out in turn."""
    return {**flatten({"seed": p.seed, "model": p.model, "train": p.train}),
            **flatten({"preprocess": meta["params"]}),
            **{f"evaluate.{k}": getattr(p.evaluate, k) for k in ("threshold_rule", "target_fpr", "threshold")},
            "data.source": (meta.get("download") or {}).get("source", "unknown"),
            "loso.sources": ",".join(sources)}


def _figure(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"


def table(result: dict, key: str = "roc_auc", bold: bool = True, reals: bool = False) -> str:
    """The matrix's ``key`` (``real_matrix``'s when ``reals``) as a markdown table: a row per left-out
    source ("trained without"), a column per test source; the held-out source's cell in bold (or
    starred when not ``bold``)."""
    columns = result["test_real_sources" if reals else "test_sources"]
    lines = ["| trained without | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for left, row in result["real_matrix" if reals else "matrix"].items():
        cells = []
        for test in columns:
            text = _figure(row.get(test, {}).get(key))
            cells.append(text if test != left else f"**{text}**" if bold else f"{text}*")
        lines.append(f"| {left} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown(result: dict) -> str:
    """``loso.md``: ROC AUC and recall tables (and, with a familiarity head, caught-or-flagged), the real
    sources' false-positive rates, and the held-out summary."""
    caught = result.get("held_out_caught_or_flagged")
    never = result.get("never_left_out")
    kept = (f"\nNever left out: {', '.join(never)} (model.spectrum_only: the spectrum branch's training family, "
            "in every fold).\n") if never else ""
    flags = ("\n## Caught or flagged unfamiliar\n\nThe share of each source's test fakes called fake at the threshold "
             "or flagged unfamiliar by the familiarity head: not passed as real without a warning.\n\n"
             + table(result, "caught_or_flagged") + "\nHeld-out fakes caught or flagged: "
             + ", ".join(f"{s} {_figure(v)}" for s, v in caught.items()) + ".\n") if caught else ""
    cameras = result.get("held_out_false_positive_rate")
    reals = ("\n## False-positive rate per real source\n\nThe share of each source's test reals called fake at the "
             "threshold. A row of a source of reals alone is a model trained without its reals: the bold cell is a "
             "camera the model never saw.\n\n" + table(result, "false_positive_rate", reals=True)
             + ("\nHeld-out reals called fake: " + ", ".join(f"{s} {_figure(v)}" for s, v in cameras.items()) + ".\n"
                if cameras else "")) if result.get("test_real_sources") else ""
    return (f"# Leave one source out\n\n"
            "Each row is a model trained without one source's fakes (its real images stay), or without the reals "
            "of a source of reals alone, scored on the whole test split: each column is that source's test fakes "
            "against all test reals. The bold cell is the source the model never saw: how well the detector "
            "generalises to a new generator.\n\n"
            f"Held-out ROC AUC: mean {_figure(result['held_out_roc_auc_mean'])}, "
            f"worst {_figure(result['held_out_roc_auc_min'])}.\n\n"
            "## ROC AUC\n\n" + table(result, "roc_auc") +
            "\n## Recall at the threshold chosen on the filtered valid split\n\n" + table(result, "recall")
            + flags + reals +
            "\nThresholds (P(fake)): " + ", ".join(f"without {s} {_figure(f['threshold'])}"
                                                 for s, f in result["fits"].items()) + "\n" + kept)


def _nan_to_null(value: object) -> object:
    """JSON has no NaN: an undefined figure (an AUC without reals) is null."""
    if isinstance(value, dict):
        return {k: _nan_to_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_null(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value
