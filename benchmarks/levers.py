"""Generalisation levers: each recipe on several seeds, scored on valid and on leave-one-source-out.

For every recipe (a name and its ``-S`` overrides) and seed it trains, with the core alone (no
MLflow, DVC or checkpoints, so it also runs on a bare GPU machine that has only torch):
- one model on every source, scored on the valid split: overall AUC and each source's fakes
  against all reals;
- one model per fake source left out of train and valid (``loso.leave_out``), scored on the whole
  valid split: the left-out source's AUC is the held-out figure, a generator the model never saw.
Choose on those (valid) figures; the test columns are recorded for the chosen recipe's report only.

    python benchmarks/levers.py --sources '{stylegan: ../shared/data/faces-mini, sd: ../shared/data/faces-sd}' \\
        --recipes baseline residual crop --seeds 0 1 2 --out build/levers

Each finished fit appends a row to ``results.jsonl`` (a rerun skips the rows already there) and
the summary, mean and spread over seeds per recipe, is written to ``levers.md`` and printed.
``--workers`` fits run at once (several share one GPU well; on a 2-core CPU keep 1).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from deepfake_detector import loso, preprocess  # noqa: E402
from deepfake_detector.detector import Decision, Detector  # noqa: E402
from deepfake_detector.device import resolve_device  # noqa: E402
from deepfake_detector.metrics import choose_threshold, compute_metrics, per_fake_source  # noqa: E402
from deepfake_detector.params import Params, load_params, to_dict, with_overrides  # noqa: E402
from deepfake_detector.stages import download  # noqa: E402
from deepfake_detector.train import fit, prepared_as  # noqa: E402

# No resampling anywhere: preprocess crops the centre square, and the online random resized crop is off.
CROP = ["preprocess.fit=crop", "train.augment.crop_scale=[1,1]"]
# The custom CNN from scratch on the centre 128 px (its CPU recipe: bf16, weight average) at 40 epochs.
SCRATCH = ["model.arch=cnn", "model.pretrained=none", *CROP, "preprocess.image_size=128", "train.epochs=40",
           "train.precision=bf16", "train.ema_epochs=5"]

# The levers of issue #23, one at a time against the default recipe, and the combinations tried.
RECIPES: dict[str, list[str]] = {
    "baseline": [],
    "residual": ["model.input=residual"],
    "crop": CROP,
    "jpeg": ["train.augment.jpeg.prob=0.5"],  # both classes re-compressed at quality 50-95, half the images
    "lite1": ["model.arch=efficientnet_lite1"],
    "lite2": ["model.arch=efficientnet_lite2"],
    "crop+residual": [*CROP, "model.input=residual"],
    "crop+jpeg": [*CROP, "train.augment.jpeg.prob=0.5"],
    "scratch+residual": [*SCRATCH, "model.input=residual"],  # NPR as published: residual, trained from scratch
    # Small receptive fields (Chai et al., ECCV 2020: patch classifiers generalise across face GANs): the CNN
    # cut to three blocks, about 22 px seen per feature, pooled over the image.
    "patch": [*SCRATCH, "model.channels=[32,64,128]"],
    # The spectrum branch beside the CNN (spectrum.py); it needs a fake family with spectral traces in training.
    "crop+spectrum": [*CROP, "model.spectrum=true"],
    # ... fit with the autoencoder twins (`deepfake twins`, named ae in --sources), which the CNN never sees.
    "crop+spectrum-ae": [*CROP, "model.spectrum=true", "model.spectrum_only=[ae]"],
}


def recipe_params(base: Params, recipe: str, seed: int, weights: Path | None) -> Params:
    """``base`` with the recipe's overrides and ``seed``; Lite backbones from ``weights/<arch>.pt`` if given."""
    p = with_overrides(base, RECIPES[recipe])
    if weights is not None and p.model.arch.startswith("efficientnet_lite") and p.model.pretrained == "imagenet":
        p = replace(p, model=replace(p.model, pretrained=str(weights / f"{p.model.arch}.pt")))
    return replace(p, seed=seed)


def scored(detector: Detector, data: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    x, y = preprocess.load_split(data, split)
    return y, detector.predict(x), [row["source"] for row in preprocess.read_index(data, split)[1]]


def run_fit(p: Params, recipe: str, left_out: str | None, data: Path, full: Path, out: Path, threads: int) -> dict:
    """Train on ``data`` (``full`` with ``left_out``'s fakes removed, or ``full`` itself) and score
    ``full``'s valid and test splits per source, with the threshold chosen on ``data``'s valid split."""
    torch.set_num_threads(threads)
    device = resolve_device(p.train.device)
    meta = json.loads((data / "meta.json").read_text())
    summary = fit(data, out, p.model, p.train, device, p.seed, progress=False, **prepared_as(meta))
    detector = Detector.from_checkpoint(out / "model.pt", Decision(), device)
    y, p_fake, sources = scored(detector, data, "valid")
    threshold = choose_threshold(y, p_fake, p.evaluate.threshold_rule, p.evaluate.target_fpr, p.evaluate.threshold,
                                 sources)
    row = {"recipe": recipe, "seed": p.seed, "left_out": left_out, "threshold": float(threshold),
           "best_valid_auc": summary["best_valid_auc"], "train_seconds": round(summary["train_seconds"], 1),
           "device": summary["device"]}
    for split in ("valid", "test"):
        y, p_fake, sources = scored(detector, full, split)
        row[f"{split}_auc"] = compute_metrics(y, p_fake, threshold)["roc_auc"]
        row[split] = per_fake_source(y, p_fake, sources, threshold)
    return row


def summarise(rows: list[dict], sources: list[str]) -> str:
    """Per recipe, mean ± sd over seeds: valid figures first (choose on these), then the test record."""

    def cell(values: list[float]) -> str:
        values = [v for v in values if v is not None and not np.isnan(v)]
        if not values:
            return "n/a"
        return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"

    held = [f"held-out {s}" for s in sources]
    head = ["recipe", "seeds", "valid AUC", "worst source (valid)", *[f"{h} (valid)" for h in held],
            "held-out mean (valid)", "test AUC", *[f"{h} (test)" for h in held]]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|" + "---:|" * (len(head) - 2)]
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        mine = [r for r in rows if r["recipe"] == recipe]
        full = [r for r in mine if r["left_out"] is None]
        seeds = sorted({r["seed"] for r in mine})

        def out(source: str, split: str) -> list[float]:
            return [r[split][source]["roc_auc"] for r in mine if r["left_out"] == source and source in r[split]]

        # The held-out mean of each seed whose every leave-out fit finished.
        held = {(r["seed"], r["left_out"]): r["valid"][r["left_out"]]["roc_auc"] for r in mine
                if r["left_out"] is not None and r["left_out"] in r["valid"]}
        per_seed_mean = [np.mean([held[seed, s] for s in sources]) for seed in seeds
                         if all((seed, s) in held for s in sources)]
        lines.append("| " + " | ".join([
            recipe, str(len(seeds)), cell([r["valid_auc"] for r in full]),
            cell([min(v["roc_auc"] for v in r["valid"].values()) for r in full]),
            *[cell(out(s, "valid")) for s in sources], cell(per_seed_mean),
            cell([r["test_auc"] for r in full]), *[cell(out(s, "test")) for s in sources]]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", required=True, help="data.source with two or more named sources")
    parser.add_argument("--out", type=Path, default=Path("build/levers"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=1, help="fits at once")
    parser.add_argument("--weights", type=Path, help="folder of <arch>.pt ImageNet state dicts for the Lite backbones")
    parser.add_argument("--report", type=Path, help="folder for results.jsonl and levers.md (default: --out)")
    parser.add_argument("--hold-out", nargs="+", metavar="SOURCE",
                        help="the fake sources to leave out in turn (default: every one)")
    parser.add_argument("--no-full", action="store_true",
                        help="only the left-out fits (each also scores the sources it trained on, on valid)")
    parser.add_argument("--budget-s", type=float, help="start no fit after this many seconds; summarise what finished")
    parser.add_argument("-S", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    base = with_overrides(load_params(args.params), [f"data.source={args.sources}", *args.overrides])
    out = args.out.resolve()
    raw = out / "raw"
    if not raw.exists():
        download.run(base, raw)
    report = (args.report or out).resolve()
    report.mkdir(parents=True, exist_ok=True)
    results = report / "results.jsonl"
    rows = [json.loads(line) for line in results.open()] if results.exists() else []
    done = {(r["recipe"], r["seed"], r["left_out"]) for r in rows}
    # One preprocessed copy per distinct preprocess section, and per source left out of it.
    jobs, sources = [], []
    for recipe in args.recipes:
        prep = recipe_params(base, recipe, 0, None).preprocess
        key = "data-" + hashlib.sha256(json.dumps(to_dict(prep), sort_keys=True).encode()).hexdigest()[:8]
        full = out / key / "all"
        if not (full / "meta.json").exists():
            preprocess.run(raw, full, prep, seed=0, progress=False)
        sources = loso.fake_sources(full)
        if args.hold_out:
            if unknown := set(args.hold_out) - set(sources):
                parser.error(f"--hold-out {sorted(unknown)}: not a fake source of the data ({sources})")
            sources = args.hold_out
        for left_out in [*([] if args.no_full else [None]), *sources]:
            data = full if left_out is None else out / key / f"without-{left_out}"
            if left_out is not None and not (data / "meta.json").exists():
                loso.leave_out(full, data, left_out)
            for seed in args.seeds:
                if (recipe, seed, left_out) not in done:
                    jobs.append((recipe_params(base, recipe, seed, args.weights), recipe, left_out, data, full,
                                 out / "fits" / f"{recipe}-s{seed}-{left_out or 'all'}"))
    print(f"{len(jobs)} fits to run ({len(done)} done before), {args.workers} at a time", flush=True)
    threads = max(1, (os.cpu_count() or 1) // args.workers)
    start = time.perf_counter()
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(run_fit, *job, threads) for job in sorted(jobs, key=lambda j: (j[0].seed, j[1]))]
        for future in as_completed(futures):
            if args.budget_s and time.perf_counter() - start > args.budget_s:
                for waiting in futures:
                    waiting.cancel()  # those not started yet; running fits finish
            if future.cancelled():
                continue
            row = future.result()
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{time.perf_counter() - start:7.1f}s {row['recipe']} seed {row['seed']} without "
                  f"{row['left_out'] or '-'}: valid AUC {row['valid_auc']:.3f} "
                  + " ".join(f"{s} {v['roc_auc']:.3f}" for s, v in row["valid"].items()), flush=True)
    rows = [json.loads(line) for line in results.open()]
    table = summarise([r for r in rows if r["recipe"] in args.recipes], sources)
    (report / "levers.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
