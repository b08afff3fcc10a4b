"""Which threshold rule to use, chosen on the valid split alone: each rule's split-half accuracy.

The rule (``evaluate.threshold_rule``) is a choice like any other, so it is made on valid: split the
valid images in two halves (stratified by class, ``--repeats`` times), let each rule pick its threshold
on one half and score accuracy on the other (both ways round), and keep the rule with the best mean.
With several sources the classes are unequal (e.g. 100 real and 180 fake valid faces), where the rules
disagree most. Test accuracy at each rule's threshold on the whole valid split is printed for the
record only, never to choose.

    .venv/bin/python benchmarks/threshold_rules.py --model models --data data/processed [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from deepfake_detector import preprocess  # noqa: E402
from deepfake_detector.detector import Decision, Detector  # noqa: E402
from deepfake_detector.device import resolve_device  # noqa: E402
from deepfake_detector.metrics import choose_threshold  # noqa: E402
from deepfake_detector.params import THRESHOLD_RULES  # noqa: E402

RULES = ("eer", "max_accuracy", "fixed")


def accuracy(labels: np.ndarray, p_fake: np.ndarray, threshold: float) -> float:
    return float(((p_fake >= threshold) == labels).mean())


def split_half(labels: np.ndarray, p_fake: np.ndarray, rule: str, repeats: int, seed: int = 0) -> float:
    """Mean accuracy of ``rule``'s threshold chosen on one stratified half and scored on the other."""
    rng = np.random.default_rng(seed)  # the same halves for every rule
    scores = []
    for _ in range(repeats):
        half = np.zeros(len(labels), dtype=bool)
        for label in (0, 1):
            members = np.flatnonzero(labels == label)
            half[rng.choice(members, len(members) // 2, replace=False)] = True
        for fit, score in ((half, ~half), (~half, half)):
            scores.append(accuracy(labels[score], p_fake[score], choose_threshold(labels[fit], p_fake[fit], rule)))
    return float(np.mean(scores))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models"), help="folder with model.pt")
    parser.add_argument("--data", type=Path, default=Path("data/processed"), help="preprocessed valid and test splits")
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=THRESHOLD_RULES)
    parser.add_argument("--repeats", type=int, default=500)
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()
    detector = Detector.from_checkpoint(args.model / "model.pt", Decision(), resolve_device("auto"))
    scored = {}
    for split in ("valid", "test"):
        images, labels = preprocess.load_split(args.data, split)
        scored[split] = (labels.astype(int), detector.predict(images))
    (valid, p_valid), (test, p_test) = scored["valid"], scored["test"]
    print(f"valid: {int((valid == 0).sum())} real, {int(valid.sum())} fake; "
          f"test: {int((test == 0).sum())} real, {int(test.sum())} fake")
    rows = []
    for rule in args.rules:
        threshold = choose_threshold(valid, p_valid, rule)
        rows.append({"rule": rule, "split_half_valid_accuracy": split_half(valid, p_valid, rule, args.repeats),
                     "threshold": threshold, "test_accuracy": accuracy(test, p_test, threshold)})
    best = max(rows, key=lambda r: r["split_half_valid_accuracy"])["rule"]
    print("| rule | split-half valid accuracy | threshold on all valid | test accuracy (record) |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['rule']}{' (chosen)' if r['rule'] == best else ''} | {r['split_half_valid_accuracy']:.4f} "
              f"| {r['threshold']:.3f} | {r['test_accuracy']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"chosen": best, "rules": rows}, indent=2))


if __name__ == "__main__":
    main()
