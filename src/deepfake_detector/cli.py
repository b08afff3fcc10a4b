"""``deepfake <stage>``: the one entry point that DVC, MLproject and Kubeflow components call."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from deepfake_detector.errors import UserError
from deepfake_detector.params import Params, flatten, load_params, with_overrides


def show_progress() -> bool:
    """Progress bars for people at a terminal; none in CI logs or when output is piped."""
    return sys.stderr.isatty() and not os.environ.get("CI")


def cmd_download(p: Params, args: argparse.Namespace) -> None:
    from deepfake_detector.data import download

    info = download(p.data.source, args.out, p.data.sha256, p.download.timeout_s, p.download.retries)
    print(f"downloaded {info['kind']} source {info['source']} to {args.out}: {json.dumps(info['files'])}")


def cmd_preprocess(p: Params, args: argparse.Namespace) -> None:
    from deepfake_detector import preprocess

    meta = preprocess.run(args.raw, args.out, p.preprocess, p.seed, args.workers, show_progress())
    for split, stats in meta["splits"].items():
        print(f"{split}: {stats['images']} images ({stats['real']} real, {stats['fake']} fake), "
              f"{stats['quarantined']} quarantined {stats['quarantine_reasons'] or ''}")
    if meta["quarantined"]:
        print(f"quarantined {meta['quarantined']} files: see {Path(args.out) / 'quarantine.csv'}")


def cmd_train(p: Params, args: argparse.Namespace) -> None:
    import torch

    from deepfake_detector import train
    from deepfake_detector.model import load_checkpoint, to_input
    from deepfake_detector.preprocess import load_split
    from deepfake_detector.tracking import RUN_FILE, Tracker, run_tags

    meta_file = Path(args.data) / "meta.json"
    if not meta_file.exists():
        raise UserError(f"{meta_file} not found: run `deepfake preprocess` first")
    meta = json.loads(meta_file.read_text())
    device = train.resolve_device(p.train.device)
    # Data params come from what actually built the data (meta.json), not today's params.yaml.
    logged = {**flatten({"seed": p.seed, "model": p.model, "train": p.train}),
              **flatten({"preprocess": meta["params"]}),
              "data.source": (meta.get("download") or {}).get("source", "unknown")}
    exp_name = os.environ.get("DVC_EXP_NAME")
    tags = {**run_tags(), "device": str(device), **({"dvc.exp_name": exp_name} if exp_name else {})}
    tracker = Tracker.start(p.mlflow, exp_name, logged, tags)
    with tracker.running():
        tracker.log_metrics({f"data.{split}_images": s["images"] for split, s in meta["splits"].items()}
                            | {"data.quarantined": meta["quarantined"]})
        summary = train.fit(args.data, args.out, p.model, p.train, device, p.seed,
                            on_epoch=lambda epoch, m: tracker.log_metrics(m, step=epoch),
                            progress=show_progress())
        tracker.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        for name in ("history.csv", "train.json"):
            tracker.log_artifacts(Path(args.out) / name, "train")
        tracker.log_artifacts(meta_file, "data")
        model, _ = load_checkpoint(Path(args.out) / "model.pt")
        valid_x, _ = load_split(args.data, "valid")
        model_uri = tracker.log_model(model, to_input(torch.from_numpy(valid_x[:2].copy())).numpy())
    tracker.save(Path(args.out) / RUN_FILE, model_uri)
    print(f"best epoch {summary['best_epoch']}: valid accuracy {summary['best_valid_accuracy']:.4f}, "
          f"AUC {summary['best_valid_auc']:.4f} ({summary['train_seconds']:.1f}s on {device})"
          + (f"; MLflow run {tracker.run_id}" if tracker.run_id else ""))


def cmd_evaluate(p: Params, args: argparse.Namespace) -> None:
    from deepfake_detector import evaluate
    from deepfake_detector.tracking import RUN_FILE, Tracker, run_tags
    from deepfake_detector.train import resolve_device

    model_dir = Path(args.model)
    train_run, model_uri = Tracker.resume(p.mlflow, model_dir / RUN_FILE)
    eval_params = flatten({"evaluate": p.evaluate})
    logged = train_run.logged_params()
    if any(k in logged and logged[k] != str(v) for k, v in eval_params.items()):
        # Same model, new evaluate params: MLflow params are immutable, so use a child run.
        target = Tracker.start(p.mlflow, "re-evaluate", eval_params, run_tags(), train_run.run_id)
    else:
        target = train_run
        target.log_params({k: v for k, v in eval_params.items() if k not in logged})
    with target.running():
        metrics = evaluate.run(args.data, model_dir / "model.pt", args.out, p.evaluate, resolve_device("auto"))
        target.log_metrics({f"test_{k}": v for k, v in metrics.items()})
        target.log_artifacts(Path(args.out), "evaluation")
        version = target.register(model_uri, {"test_roc_auc": f"{metrics['roc_auc']:.4f}",
                                                      "test_accuracy": f"{metrics['accuracy']:.4f}"})
    print("test: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
    if version:
        print(f"registered {p.mlflow.model_name} version {version} as @{p.mlflow.alias}")


def cmd_run(p: Params, args: argparse.Namespace) -> None:
    """All four stages in order, with the default paths (what MLproject's ``main`` runs)."""
    root = Path(args.root)
    raw, processed, models, evaluation = root / "data/raw", root / "data/processed", root / "models", root / "eval"
    cmd_download(p, argparse.Namespace(out=raw))
    cmd_preprocess(p, argparse.Namespace(raw=raw, out=processed, workers=args.workers))
    cmd_train(p, argparse.Namespace(data=processed, out=models))
    cmd_evaluate(p, argparse.Namespace(data=processed, model=models, out=evaluation))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepfake", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: %(default)s)")
    common.add_argument("--set", "-S", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, e.g. -S train.epochs=3 (repeatable)")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func, help_: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, parents=[common], help=help_, description=help_)
        cmd.set_defaults(func=func)
        return cmd

    cmd = add("download", cmd_download, "fetch the raw dataset named by data.source")
    cmd.add_argument("--out", type=Path, default=Path("data/raw"))
    cmd = add("preprocess", cmd_preprocess, "validate, resize, blur and noise the raw images")
    cmd.add_argument("--raw", type=Path, default=Path("data/raw"))
    cmd.add_argument("--out", type=Path, default=Path("data/processed"))
    cmd.add_argument("--workers", type=int, default=None, help="decode processes (default: all cores)")
    cmd = add("train", cmd_train, "train the CNN and log the run to MLflow")
    cmd.add_argument("--data", type=Path, default=Path("data/processed"))
    cmd.add_argument("--out", type=Path, default=Path("models"))
    cmd = add("evaluate", cmd_evaluate, "score the model on the test split and register it")
    cmd.add_argument("--data", type=Path, default=Path("data/processed"))
    cmd.add_argument("--model", type=Path, default=Path("models"))
    cmd.add_argument("--out", type=Path, default=Path("eval"))
    cmd = add("run", cmd_run, "download, preprocess, train and evaluate in one process")
    cmd.add_argument("--root", type=Path, default=Path("."), help="where data/, models/ and eval/ go")
    cmd.add_argument("--workers", type=int, default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        params = with_overrides(load_params(args.params), args.overrides)
        args.func(params, args)
    except UserError as exc:
        print(f"deepfake {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
