"""The familiarity head's options (issue #34), measured on trained models: which images each one flags.

For each model, the embeddings (the input of the last linear layer) of the train, valid and test splits
of the data it was trained on (``OWN``) are computed once; each option of
:mod:`~deepfake_detector.familiarity` is fit on the train embeddings, its flagging distance set so that
``--share`` of the valid images are flagged, and then scored:
- in distribution, the model's own test split: the share flagged (aim: at most 0.07 when valid flags
  0.05), the ROC AUC on all images and on the accepted ones;
- on the test split of a broader set (``--data``: faces-mini, faces-sd, faces-utk), per source: fakes
  called fake, flagged, and either (a source the model never saw is the leave-one-source-out figure;
  aim: caught or flagged >= 0.90); reals called fake and flagged;
- the reals of ``--data`` processed as users' photos are (JPEG q50, blur sigma 1, downscale x0.5):
  called fake and flagged.
The P(fake) threshold is each model's own, chosen on its valid split by ``--rule``.

    python benchmarks/familiarity.py --model NAME=MODEL_DIR:OWN_PROCESSED ... --data ALL_PROCESSED \\
        --out build/familiarity

Writes ``familiarity.json`` and ``familiarity.md`` and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from real_sources import PROCESSED  # noqa: E402

from deepfake_detector import familiarity, preprocess  # noqa: E402
from deepfake_detector.evaluate import valid_threshold  # noqa: E402
from deepfake_detector.heads import load_checkpoint  # noqa: E402
from deepfake_detector.metrics import compute_metrics  # noqa: E402
from deepfake_detector.model import to_input  # noqa: E402
from deepfake_detector.params import EvaluateParams, Params  # noqa: E402
from deepfake_detector.spectrum import SpectrumBranch  # noqa: E402

# name: (model.familiarity, model.familiar_groups, features): the embedding, the ring spectrum
# (spectrum.SpectrumBranch.features) or both (the larger of the two calibrated distances)
OPTIONS = {"mahalanobis/class": ("mahalanobis", "class", "embedding"),
           "mahalanobis/source": ("mahalanobis", "source", "embedding"),
           "knn": ("knn", "class", "embedding"),
           "spectrum mahalanobis/source": ("mahalanobis", "source", "spectrum"),
           "both mahalanobis/source": ("mahalanobis", "source", "both"),
           # the backbone's stage outputs, mean-pooled, each its own Gaussian (Lee et al.'s feature ensemble)
           "stages mahalanobis/class": ("mahalanobis", "class", "stages"),
           "stages mahalanobis/source": ("mahalanobis", "source", "stages"),
           "stages knn": ("knn", "class", "stages"),
           "stages+spectrum mahalanobis/source": ("mahalanobis", "source", "stages+spectrum"),
           # the same stage outputs side by side, one Gaussian per group (model.familiar_features: joint)
           "joint mahalanobis/source": ("mahalanobis", "source", "joint")}


def embed(model, images: np.ndarray, device: torch.device, batch_size: int = 64
          ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """P(fake) (the model's answer, heads included), and the embedding, ring spectrum and stage
    outputs (mean-pooled; and all of them side by side, ``joint``) of each image."""
    rings = SpectrumBranch(model.image_size).to(device)
    joint = familiarity.FamiliarityHead("mahalanobis", "joint")  # reads the vectors only: what the head measures
    batches = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            x = to_input(torch.from_numpy(np.array(images[i:i + batch_size]))).to(device)
            out = model.outputs(x)
            batches.append([torch.softmax(out["logits"].float(), 1)[:, 1], out["embedding"], rings.features(x),
                            *joint.vectors(out), *out["stages"]])
    columns = [torch.cat(c).double().numpy() for c in zip(*batches)]
    return columns[0], {"embedding": columns[1], "spectrum": columns[2], "joint": columns[3],
                        **{f"stage{j}": c for j, c in enumerate(columns[4:])}}


def split(data: Path, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    images, labels = preprocess.load_split(data, name)
    return images, labels, np.array([r["source"] for r in preprocess.read_index(data, name)[1]])


def share(mask: np.ndarray) -> float:
    return float(np.mean(mask)) if len(mask) else float("nan")


def auc(labels: np.ndarray, p_fake: np.ndarray) -> float:
    return compute_metrics(labels, p_fake, 0.5)["roc_auc"] if len(set(labels.tolist())) > 1 else float("nan")


def evaluate_model(model_dir: Path, own: Path, data: Path, rule: str, share_flagged: float) -> dict:
    device = torch.device("cpu")
    model = load_checkpoint(model_dir / "model.pt", device)[0]
    scored = {}
    for name, folder, kind in (("train", own, "train"), ("valid", own, "valid"), ("own_test", own, "test"),
                               ("test", data, "test")):
        images, labels, sources = split(folder, kind)
        p, e = embed(model, images, device)
        scored[name] = {"labels": labels, "sources": sources, "p": p, "e": e, "images": images}
    valid = scored["valid"]
    threshold = valid_threshold(valid["labels"], valid["p"], valid["sources"], model.config.spectrum_only,
                                EvaluateParams(threshold_rule=rule))  # as the evaluate stage: the twins do not count
    test = scored["test"]
    processed = {}
    for source in sorted(set(test["sources"][test["labels"] == 0].tolist())):
        reals = np.flatnonzero((test["labels"] == 0) & (test["sources"] == source))
        for how, f in PROCESSED.items():
            images = np.stack([f(np.asarray(test["images"][i])) for i in reals])
            processed[(source, how)] = embed(model, images, device)
    rows = {}
    for option, (kind, groups, features) in OPTIONS.items():
        train = scored["train"]
        names = np.char.add(train["sources"].astype(str), train["labels"].astype(str)) if groups == "source" \
            else train["labels"]
        stages = tuple(k for k in train["e"] if k.startswith("stage"))
        parts = {"both": ("embedding", "spectrum"), "stages": stages,
                 "stages+spectrum": (*stages, "spectrum")}.get(features, (features,))
        head = familiarity.FamiliarityHead(kind, "embedding")  # its parts are the benchmark's own choice
        familiarity.fit(head, [train["e"][part] for part in parts], names)
        familiarity.calibrate(head, [scored["valid"]["e"][part] for part in parts], share_flagged)

        def unfamiliarity(e: dict[str, np.ndarray]) -> np.ndarray:
            with torch.inference_mode():
                vectors = [torch.as_tensor(e[part], dtype=torch.float32) for part in parts]
                return head.distance(vectors).numpy() / float(head.scale)

        own_test = scored["own_test"]
        flagged = unfamiliarity(own_test["e"]) >= 1
        accepted = ~flagged
        row = {"valid_flagged": share(unfamiliarity(scored["valid"]["e"]) >= 1),
               "in_distribution": {"flagged": share(flagged), "roc_auc": auc(own_test["labels"], own_test["p"]),
                                   "accepted_roc_auc": auc(own_test["labels"][accepted], own_test["p"][accepted]),
                                   "confident_errors": share(((own_test["p"] >= threshold) != own_test["labels"])
                                                             & accepted)},
               "sources": {}, "processed": {}}
        u = unfamiliarity(test["e"]) >= 1
        called = test["p"] >= threshold
        for source in sorted(set(test["sources"].tolist())):
            for label, kind_name in ((1, "fake"), (0, "real")):
                rows_ = (test["sources"] == source) & (test["labels"] == label)
                if rows_.any():
                    row["sources"][f"{source} {kind_name}"] = {
                        "n": int(rows_.sum()), "called_fake": share(called[rows_]), "flagged": share(u[rows_]),
                        "caught_or_flagged": share((called | u)[rows_]) if label == 1 else None}
        for (source, how), (p, e) in processed.items():
            row["processed"][f"{source} {how}"] = {"called_fake": share(p >= threshold),
                                                   "flagged": share(unfamiliarity(e) >= 1)}
        rows[option] = row
    return {"threshold": float(threshold), "options": rows}


def table(results: dict) -> str:
    lines = []
    for name, result in results.items():
        lines.append(f"\n### {name} (P(fake) threshold {result['threshold']:.3f})\n")
        first = next(iter(result["options"].values()))
        cols = list(first["sources"]) + list(first["processed"])
        lines.append("| option | valid flagged | own test flagged | AUC | AUC accepted | confident errors | "
                     + " | ".join(cols) + " |")
        lines.append("|---|" + "---:|" * (5 + len(cols)))
        for option, r in result["options"].items():
            d = r["in_distribution"]
            cells = [option, f"{r['valid_flagged']:.3f}", f"{d['flagged']:.3f}", f"{d['roc_auc']:.3f}",
                     f"{d['accepted_roc_auc']:.3f}", f"{d['confident_errors']:.3f}"]
            for c in cols:
                m = r["sources"].get(c) or r["processed"][c]
                text = f"{m['called_fake']:.2f} / {m['flagged']:.2f}"
                cells.append(text + (f" / **{m['caught_or_flagged']:.2f}**" if m.get("caught_or_flagged") is not None
                                     else ""))
            lines.append("| " + " | ".join(cells) + " |")
    return ("Cells: called fake / flagged (/ either, for fakes), at the model's own P(fake) threshold.\n"
            + "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, metavar="NAME=MODEL_DIR:OWN_PROCESSED")
    parser.add_argument("--data", type=Path, required=True, help="preprocessed data whose test split is scored")
    parser.add_argument("--out", type=Path, default=Path("build/familiarity"))
    parser.add_argument("--rule", default=Params().evaluate.threshold_rule)
    parser.add_argument("--share", type=float, default=Params().model.unfamiliar_share,
                        help="share of the valid images flagged (default: %(default)s)")
    args = parser.parse_args()
    results = {}
    for spec in args.model:
        name, _, folders = spec.partition("=")
        model, _, own = folders.partition(":")
        results[name] = evaluate_model(Path(model), Path(own), args.data, args.rule, args.share)
        print(f"{name}: scored", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "familiarity.json").write_text(json.dumps(results, indent=1))
    (args.out / "familiarity.md").write_text(table(results))
    print(table(results), end="")


if __name__ == "__main__":
    main()
