"""Linear probes on frozen features: does a classifier fit on some generators detect one it never saw?

UnivFD-style (Ojha et al., CVPR 2023), but on ImageNet EfficientNet-Lite features (CLIP weights cannot
be installed offline), beside hand-made spectra. Per feature set and C, a logistic regression
(standardised features, balanced classes) is fit on the train split and scored on the valid split
only (test stays untouched); a fake source's AUC is its valid fakes against all valid reals:
- both: fit on every source;
- held-out: fit without that source's fakes (each fake source in turn), a generator never seen.

    .venv/bin/python benchmarks/linear_probes.py \\
        --sources '{stylegan: ../shared/data/faces-mini, sd: ../shared/data/faces-sd}' \\
        [--arch efficientnet_lite0] [--image-size 224] [--C 0.01 0.1 1.0] [--json out.json]

Feature sets: ``rgb-*`` and ``residual-*``, for the image and for its NPR residual (``model.residual``):
mean and std over space of every MBConv block's output and the mean of the last map (``all``), the
last alone, and the blocks in quarters; ``spectrum``, the azimuthally averaged log amplitude spectrum
of the grey image at 256 px (``spectrum-high`` its upper half of radii); ``phase``, the log mean |NPR
residual| of the grey image per 8x8 phase; ``spectrum+phase``. It prints the image counts, then a
table, one row per feature set and C: both-AUC per source, held-out AUC per source, held-out mean.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from deepfake_detector.data import DataError
from deepfake_detector.model import LITE_ARCHS, DeepfakeNet, build_model, residual, to_input
from deepfake_detector.params import ModelParams, PreprocessParams
from deepfake_detector.preprocess import decode_image, fit_image
from deepfake_detector.sources import list_images, parse_sources

SPECTRUM_SIZE = 256  # the shared sets' own size; other images are resized to it so every spectrum has one length
RADIUS = np.hypot(*(np.indices((SPECTRUM_SIZE,) * 2) - SPECTRUM_SIZE // 2)).astype(int).ravel()
RING = np.bincount(RADIUS)  # pixels per ring


def labelled(value: str, prep: PreprocessParams) -> tuple[list[Path], np.ndarray, np.ndarray, np.ndarray]:
    """Paths, split, label (1 fake) and source name of the train and valid images of ``value``'s local
    sources, listed as preprocess lists them (an unsplit source split by file hash as there)."""
    entries = [(name, e) for name, location in parse_sources(value).items()
               for e in list_images(Path(location), prep.split_ratios) if e.split in ("train", "valid")]
    return ([e.path for _, e in entries], np.array([e.split for _, e in entries]),
            np.array([e.label for _, e in entries]), np.array([name for name, _ in entries]))


def spectral(grey: np.ndarray) -> np.ndarray:
    """The log amplitude spectrum averaged over rings, then the log mean |NPR residual| per 8x8 phase."""
    g = grey - grey.mean()
    amplitude = np.abs(np.fft.fftshift(np.fft.fft2(g))).ravel()
    spectrum = np.log1p(np.bincount(RADIUS, amplitude) / RING)
    res = np.abs(g - g[::2, ::2].repeat(2, 0).repeat(2, 1))
    n = SPECTRUM_SIZE // 8
    phase = np.log(res.reshape(n, 8, n, 8).mean((0, 2)).ravel() + 1e-6)  # element [i, j]: res[i::8, j::8]
    return np.concatenate([spectrum, phase])


def block_outputs(net: DeepfakeNet) -> list[torch.Tensor]:
    """A list that each forward pass of ``net`` appends its MBConv blocks' outputs to, in order."""
    outputs: list[torch.Tensor] = []
    for block in net.features.net._blocks:
        block.register_forward_hook(lambda module, args, out: outputs.append(out))
    return outputs


@torch.inference_mode()
def cnn_features(net: DeepfakeNet, outputs: list[torch.Tensor], x: torch.Tensor) -> list[np.ndarray]:
    """Per block, mean and std over space of its output on ``x`` (normalised); last, the mean of the last map."""
    outputs.clear()
    last = net.features(x)
    # correction=0: at small input sizes the deepest maps are 1x1, whose unbiased std is NaN.
    return [torch.cat([o.mean((2, 3)), o.std((2, 3), correction=0)], 1).numpy() for o in outputs] + \
        [last.mean((2, 3)).numpy()]


def extract(net: DeepfakeNet, paths: list[Path], size: int, prep: PreprocessParams, batch_size: int
            ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every feature set of the images of ``paths`` that decode and fit, and the indices of those."""
    outputs, kept, spectra = block_outputs(net), [], []
    parts: dict[str, list[list[np.ndarray]]] = {"rgb": [], "residual": []}
    for start in range(0, len(paths), batch_size):
        batch = []
        for i, path in enumerate(paths[start:start + batch_size], start):
            try:  # as preprocess does: an image it would quarantine is left out, with its reason
                image = decode_image(path)[0]
                batch.append(fit_image(image, size, prep.min_source_size))
                spectra.append(spectral(fit_image(image.convert("L"), SPECTRUM_SIZE, 1).astype(np.float64)))
                kept.append(i)
            except ValueError as exc:
                print(f"left out {path}: {exc}", file=sys.stderr)
        if batch:
            x = (to_input(torch.from_numpy(np.stack(batch))) - net.mean) / net.std
            parts["rgb"].append(cnn_features(net, outputs, x))
            parts["residual"].append(cnn_features(net, outputs, residual(x)))
    sets = {}
    for mode, batches in parts.items():
        blocks = [np.concatenate(b) for b in zip(*batches)]  # per block, every image
        sets[f"{mode}-all"], sets[f"{mode}-last"] = np.hstack(blocks), blocks[-1]
        quarters = [(len(blocks) - 1) * k // 4 for k in range(5)]
        for lo, hi in zip(quarters, quarters[1:]):
            sets[f"{mode}-blocks{lo}-{hi - 1}"] = np.hstack(blocks[lo:hi])
    spectra, rings = np.stack(spectra), len(RING)
    sets |= {"spectrum": spectra[:, :rings], "spectrum-high": spectra[:, rings // 2:rings],
             "phase": spectra[:, rings:], "spectrum+phase": spectra}
    return sets, np.array(kept)


def aucs(x: np.ndarray, fit: np.ndarray, valid: np.ndarray, fake: np.ndarray, source: np.ndarray,
         scored: list[str], c: float) -> dict[str, float]:
    """Fit on the rows ``fit``; per source in ``scored``, the AUC of its valid fakes against all valid reals."""
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, class_weight="balanced", max_iter=3000))
    clf.fit(x[fit], fake[fit])
    p, y, names = clf.predict_proba(x[valid])[:, 1], fake[valid], source[valid]
    return {s: float(roc_auc_score(y[(y == 0) | (names == s)], p[(y == 0) | (names == s)])) for s in scored}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", required=True,
                        help="data.source's syntax, local folders: '{name: folder, ...}' (each fake source named)")
    parser.add_argument("--arch", default="efficientnet_lite0", choices=LITE_ARCHS,
                        help="EfficientNet-Lite only: the features are read from its MBConv blocks")
    parser.add_argument("--image-size", type=int, default=224, help="the CNN's input size (the spectra use 256)")
    parser.add_argument("--C", type=float, nargs="+", default=[0.01, 0.1, 1.0],
                        help="logistic regression C values (inverse L2 strength)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: every core)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prep = PreprocessParams()
    try:
        paths, split, fake, source = labelled(args.sources, prep)
    except DataError as exc:
        parser.error(str(exc))
    net = build_model(ModelParams(arch=args.arch), args.image_size, "imagenet").eval()
    start = time.perf_counter()
    sets, kept = extract(net, paths, args.image_size, prep, args.batch_size)
    split, fake, source = split[kept], fake[kept], source[kept]
    counts = {s: {"real": int(((split == s) & (fake == 0)).sum()),
                  **{n: int(((split == s) & (fake == 1) & (source == n)).sum()) for n in dict.fromkeys(source)}}
              for s in ("train", "valid")}
    print(f"{len(kept)} images ({len(paths) - len(kept)} left out), features in {time.perf_counter() - start:.0f} s: "
          + "; ".join(f"{s} " + ", ".join(f"{k} {v}" for k, v in c.items()) for s, c in counts.items()))
    train, valid = split == "train", split == "valid"
    for s, mask in (("train", train), ("valid", valid)):
        if not (mask & (fake == 0)).any() or not (mask & (fake == 1)).any():
            parser.error(f"the {s} split needs real and fake images")
    fakes = list(dict.fromkeys(source[fake == 1]))
    scored = [s for s in fakes if (valid & (fake == 1) & (source == s)).any()]
    notes = [f"{s}: no valid fakes, not scored (its train fakes are still fit on)" for s in fakes if s not in scored]
    # Held out, a source needs another source's train fakes to learn from.
    held_out = [s for s in scored if (train & (fake == 1) & (source != s)).any()]
    notes += [f"{s}: no held-out figure, no other source has train fakes" for s in scored if s not in held_out]
    rows = []
    for name, x in sets.items():
        for c in args.C:
            held = {s: aucs(x, train & ((fake == 0) | (source != s)), valid, fake, source, [s], c)[s]
                    for s in held_out}
            rows.append({"features": name, "dims": x.shape[1], "C": c,
                         "both": aucs(x, train, valid, fake, source, scored, c), "held_out": held,
                         "held_out_mean": float(np.mean(list(held.values()))) if held else None})
    head = ["features", "dims", "C", *(f"both {s}" for s in scored), *(f"held-out {s}" for s in scored),
            "held-out mean"]
    print("| " + " | ".join(head) + " |\n|---|" + "---:|" * (len(head) - 1))

    def cell(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    for r in rows:
        print(f"| {r['features']} | {r['dims']} | {r['C']:g} | " + " | ".join(
            [*(cell(r["both"][s]) for s in scored), *(cell(r["held_out"].get(s)) for s in scored),
             cell(r["held_out_mean"])]) + " |")
    for note in notes:
        print(f"note: {note}")
    if args.json:
        args.json.write_text(json.dumps({"arch": args.arch, "image_size": args.image_size, "images": counts,
                                         "left_out": len(paths) - len(kept), "notes": notes, "rows": rows},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
