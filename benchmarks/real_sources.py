"""Real sources beside FFHQ (issue #33): how often a trained model calls each source's real faces fake.

Each model is scored at its own threshold, chosen on the valid split of the data it was trained on
(``--own``, the rule of ``evaluate.threshold_rule``), on the test split of a broader preprocessed set
(``--data``: every real and fake source at hand, e.g. faces-mini, faces-sd and faces-utk): per source
test AUC, recall (fakes) and false-positive rate (reals); the reals of each source processed as users'
photos are (JPEG q50, blur sigma 1, downscale x0.5) and the share of them called fake; and, for UTKFace
reals, whose file names carry age, gender and ethnicity, the false-positive rate by group.

    python benchmarks/real_sources.py --model NAME=build/fits/a/models:build/fits/a/processed ... \\
        --data build/all/processed --out build/real_sources

Writes ``real_sources.json`` and ``real_sources.md`` (one row per model) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from deepfake_detector import preprocess  # noqa: E402
from deepfake_detector.degrade import blur, jpeg, rescale  # noqa: E402
from deepfake_detector.detector import Decision, Detector  # noqa: E402
from deepfake_detector.device import resolve_device  # noqa: E402
from deepfake_detector.evaluate import proxy_fakes, valid_threshold  # noqa: E402
from deepfake_detector.metrics import compute_metrics, per_source  # noqa: E402
from deepfake_detector.params import EvaluateParams, Params  # noqa: E402

# Processed reals: what a phone, a messenger or a web page does to a photo.
PROCESSED = {"jpeg_q50": lambda im: jpeg(im, 50), "blur_s1": lambda im: blur(im, 1.0),
             "downscale_x0.5": lambda im: rescale(im, 0.5)}
UTK_GROUPS = {"gender": {"0": "male", "1": "female"},
              "ethnicity": {"0": "White", "1": "Black", "2": "Asian", "3": "Indian", "4": "Others"}}
AGE_BINS = ((0, 12, "0-12"), (13, 29, "13-29"), (30, 49, "30-49"), (50, 69, "50-69"), (70, 200, "70+"))


def utk_group(name: str) -> dict[str, str] | None:
    """Age band, gender and ethnicity from a UTKFace file name (``age_gender_race_datetime.jpg.chip.jpg``)."""
    parts = Path(name).name.split("_")
    if len(parts) < 4 or not parts[0].isdigit() or parts[1] not in UTK_GROUPS["gender"] \
            or parts[2] not in UTK_GROUPS["ethnicity"]:
        return None
    age = int(parts[0])
    return {"age": next(label for low, high, label in AGE_BINS if low <= age <= high),
            "gender": UTK_GROUPS["gender"][parts[1]], "ethnicity": UTK_GROUPS["ethnicity"][parts[2]]}


def score(detector: Detector, data: Path, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list]:
    images, labels = preprocess.load_split(data, split)
    rows = preprocess.read_index(data, split)[1]
    return images, labels, detector.predict(images), np.array([r["source"] for r in rows]), [r["path"] for r in rows]


def evaluate_model(name: str, model: Path, own: Path, data: Path, rule: str, target_fpr: float) -> dict:
    detector = Detector.from_checkpoint(model / "model.pt", Decision(), resolve_device("auto"))
    _, valid_y, valid_p, valid_sources, _ = score(detector, own, "valid")
    # As the evaluate stage, here and on test: the twins' fakes are a training device, not a generator
    # the operating point or the figures are for.
    threshold = valid_threshold(valid_y, valid_p, valid_sources, detector.model.config.spectrum_only,
                                EvaluateParams(threshold_rule=rule, target_fpr=target_fpr))
    images, labels, p_fake, sources, paths = score(detector, data, "test")
    keep = ~proxy_fakes(labels, sources, detector.model.config.spectrum_only)
    row = {"model": name, "threshold": threshold,
           "test_auc": compute_metrics(labels[keep], p_fake[keep], threshold)["roc_auc"],
           "per_source": per_source(labels[keep], p_fake[keep], sources[keep], threshold), "processed": {},
           "utk_groups": {}}
    for source in sorted(set(sources[labels == 0].tolist())):
        reals = np.flatnonzero((labels == 0) & (sources == source))
        row["processed"][source] = {
            how: float(np.mean(detector.predict(np.asarray(images[reals]), lambda b, f=f: np.stack([f(i) for i in b]))
                               >= threshold)) for how, f in PROCESSED.items()}
    groups: dict[str, dict[str, list[bool]]] = {}
    for i in np.flatnonzero(labels == 0):
        group = utk_group(paths[i])
        for key, value in (group or {}).items():
            groups.setdefault(key, {}).setdefault(value, []).append(bool(p_fake[i] >= threshold))
    row["utk_groups"] = {key: {value: {"false_positive_rate": float(np.mean(v)), "n_real": len(v)}
                               for value, v in sorted(values.items())} for key, values in groups.items()}
    return row


def table(rows: list[dict]) -> str:
    sources = sorted({s for r in rows for s in r["per_source"]})
    head = ["model", "threshold", "test AUC"]
    for s in sources:
        kinds = rows[0]["per_source"].get(s, {})
        head += [f"{s} AUC", f"{s} recall"] if "n_fake" in kinds else []
        head += [f"{s} FPR", *[f"{s} FPR {how}" for how in PROCESSED]] if "n_real" in kinds else []
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        cells = [r["model"], f"{r['threshold']:.3f}", f"{r['test_auc']:.3f}"]
        for s in sources:
            m = r["per_source"].get(s, {})
            cells += [f"{m['roc_auc']:.3f}", f"{m['recall']:.2f}"] if "n_fake" in m else []
            cells += [f"{m['false_positive_rate']:.2f}", *[f"{r['processed'][s][how]:.2f}" for how in PROCESSED]] \
                if "n_real" in m else []
        lines.append("| " + " | ".join(cells) + " |")
    for r in rows:
        for key, values in r["utk_groups"].items():
            lines.append(f"\n{r['model']}, UTKFace test reals called fake by {key}: " + ", ".join(
                f"{v} {m['false_positive_rate']:.2f} (n={m['n_real']})" for v, m in values.items()))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, metavar="NAME=MODEL_DIR:OWN_PROCESSED",
                        help="a model folder and the preprocessed data it was trained on (its valid split sets "
                        "the threshold)")
    parser.add_argument("--data", type=Path, required=True, help="preprocessed data whose test split is scored")
    parser.add_argument("--out", type=Path, default=Path("build/real_sources"))
    parser.add_argument("--rule", default=Params().evaluate.threshold_rule)
    parser.add_argument("--target-fpr", type=float, default=Params().evaluate.target_fpr,
                        help="evaluate.target_fpr for --rule target_fpr or source_fpr (the (d) recipe's 0.03)")
    args = parser.parse_args()
    rows = []
    for spec in args.model:
        name, _, folders = spec.partition("=")
        model, _, own = folders.partition(":")
        rows.append(evaluate_model(name, Path(model), Path(own), args.data, args.rule, args.target_fpr))
        print(f"{name}: scored", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "real_sources.json").write_text(json.dumps(rows, indent=1))
    text = table(rows)
    (args.out / "real_sources.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
