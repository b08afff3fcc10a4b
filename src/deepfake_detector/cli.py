"""``deepfake <stage>``: the one entry point that DVC, MLproject and the Kubeflow train step call
(the other KFP components call the :mod:`deepfake_detector.stages` modules directly, the same functions).

Compiling and submitting the Kubeflow pipeline is ``deepfake-pipeline`` (``pipeline/cli.py``): the
core never imports kfp."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from deepfake_detector.errors import Stopped, UserError
from deepfake_detector.params import Params, ParamsError, load_params, with_overrides


def show_progress() -> bool:
    """Progress bars for people at a terminal; none in CI logs or when output is piped."""
    return sys.stderr.isatty() and not os.environ.get("CI")


def cmd_download(p: Params, args: argparse.Namespace) -> None:
    from deepfake_detector.stages import download

    report_download(download.run(p, args.out), args.out)


def report_download(info: dict, out: Path) -> None:
    print(f"downloaded {info['kind']} source {info['source']} to {out}: {json.dumps(info['files'])}")
    if info.get("skipped_links"):
        print(f"skipped {len(info['skipped_links'])} links that lead out of the source or to a folder: "
              f"{', '.join(info['skipped_links'][:10])}{' ...' if len(info['skipped_links']) > 10 else ''}")


def cmd_twins(p: Params, args: argparse.Namespace) -> None:
    from deepfake_detector.stages import twins

    report_twins(twins.run(p, args.raw, args.out), args.out)


def report_twins(record: dict, out: Path) -> None:
    if not record["enabled"]:
        print(f"twins.enabled is false: no twins made, a marker in {out}")
        return
    made = {source: sum(splits.values()) for source, splits in record["twins"].items()}
    print(f"{sum(made.values())} twins {made} in {out} ({record['seconds']:.0f} s); "
          f"mean |error| (0-255) {record['l1_per_split']}")


def cmd_preprocess(p: Params, args: argparse.Namespace) -> None:
    from deepfake_detector.stages import preprocess

    report_preprocess(preprocess.run(p, args.raw, args.out, args.workers, show_progress(), args.twins), args.out)


def report_preprocess(meta: dict, out: Path) -> None:
    for split, s in meta["splits"].items():
        print(f"{split}: {s['images']} images ({s['real']} real, {s['fake']} fake), "
              f"{s['quarantined']} quarantined {s['quarantine_reasons'] or ''}")
    if meta["quarantined"]:
        print(f"quarantined {meta['quarantined']} files: see {Path(out) / 'quarantine.csv'}")


def cmd_train(p: Params, args: argparse.Namespace) -> None:
    train(p, args.data, args.out, args.checkpoint_dir, args.params or DEFAULT_PARAMS, args.overrides)


def train(p: Params, data: Path, out: Path, checkpoint_dir: Path | None, params_file: Path,
          overrides: list[str]) -> None:
    """The train stage in this process, or (``train.device: auto`` on a multi-GPU machine) the same
    command once per GPU under torchrun."""
    import subprocess

    from deepfake_detector import distributed
    from deepfake_detector.device import auto_processes
    from deepfake_detector.stages import train as stage

    world = distributed.from_env()
    processes = auto_processes(p.train.device)
    if processes > 1 and not world.distributed:
        command = distributed.train_command(processes, params_file, data, out, checkpoint_dir, overrides)
        code = subprocess.run(command).returncode
        if code:
            raise SystemExit(code)
        return
    s = stage.run(p, data, out, show_progress(), checkpoint_dir=checkpoint_dir)
    if not world.main:
        return
    print(f"best epoch {s['best_epoch']}: valid accuracy {s['best_valid_accuracy']:.4f}, "
          f"AUC {s['best_valid_auc']:.4f} ({s['train_seconds']:.1f}s on {s['device']})"
          + (f"; MLflow run {s['run_id']}" if s["run_id"] else ""))


def figure(value: object) -> str:
    """A metric as printed: floats to 4 places, NaN (AUC of a one-class set) as "undefined"."""
    if isinstance(value, float):
        return "undefined" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def cmd_evaluate(p: Params, args: argparse.Namespace) -> None:
    if (Path(args.data) / "meta.json").exists():  # a preprocessed dataset: the pipeline's stage
        from deepfake_detector.stages import evaluate

        if args.params is None and not DEFAULT_PARAMS.exists():
            raise ParamsError(f"params file not found: {DEFAULT_PARAMS} (the evaluate stage reads the pipeline's)")
        out = args.out or Path("eval")
        metrics = evaluate.run(p, args.data, args.model, out)
    else:  # any labelled folder or CSV, scored with a stored model
        from deepfake_detector.scoring import default_out, evaluate_folder

        out = args.out or default_out(args.data)
        metrics = evaluate_folder(p, args.data, str(args.model), out, args.threshold, args.root)
    report_evaluate(p, metrics, out)


def report_evaluate(p: Params, metrics: dict, out: Path) -> None:
    from deepfake_detector.params import flatten

    version = metrics.pop("registered_version", None)
    robustness = metrics.pop("robustness", {})
    sources = metrics.pop("per_source", {})
    print("test: " + ", ".join(f"{k} {figure(v)}" for k, v in flatten(metrics).items()))
    for name, row in sources.items():  # a source's fakes, its reals, or both
        fakes = (f"{row['n_fake']} fakes, AUC {figure(row['roc_auc'])}  AP {figure(row['average_precision'])}  "
                 f"recall {figure(row['recall'])}") if "n_fake" in row else ""
        reals = (f"{row['n_real']} reals, false positive rate {figure(row['false_positive_rate'])}  "
                 f"AUC of all fakes vs them {figure(row['real_roc_auc'])}") if "n_real" in row else ""
        print(f"  {name:>14}: " + "; ".join(filter(None, (fakes, reals))))
    for name, row in robustness.items():
        by_source = ", ".join(f"{k} {figure(v)}" for k, v in row.get("sources", {}).items())
        fpr = ", ".join(f"{k} {figure(v)}" for k, v in row.get("source_fpr", {}).items())
        print(f"  {name:>14}: AUC {figure(row['auc'])}  accuracy {figure(row['accuracy'])}"
              + (f"  (AUC by source: {by_source})" if len(row.get("sources", {})) > 1 else "")
              + (f"  (false positive rate by source: {fpr})" if fpr else ""))
    print(f"metrics and plots in {out}")
    if version:
        print(f"registered {p.mlflow.model_name} version {version} as @{p.mlflow.alias}")


def cmd_promote(p: Params, args: argparse.Namespace) -> None:
    from deepfake_detector.promote import promote

    result = promote(p, dry_run=args.dry_run, force=args.force)
    for reason in result["reasons"]:
        print(f"  {reason}")
    target = f"{p.mlflow.model_name} version {result['version']}"
    becomes = "would become" if result.get("dry_run") else "is now"
    verdict = {"promoted": f"{target} {becomes} @{p.promote.alias}",
               "forced": f"{target} {becomes} @{p.promote.alias} (forced past failed gates)",
               "rejected": f"{target} stays @{p.mlflow.alias}; @{p.promote.alias} unchanged",
               "unchanged": f"{target} is already @{p.promote.alias}"}[result["decision"]]
    print(("dry run, nothing changed: " if result.get("dry_run") else "") + verdict)
    if result["decision"] == "rejected":
        raise SystemExit(1)


def cmd_predict(p: Params, args: argparse.Namespace) -> None:
    from deepfake_detector.scoring import predict_paths

    s = predict_paths(p, args.paths, args.model, args.out, args.threshold, False if args.no_face_crop else None,
                      show_progress())
    flagged = "" if s["unfamiliar"] is None else f"{s['unfamiliar']} flagged unfamiliar (unlike the training faces), "
    print(f"{s['images']} images: {s['fake']} fake, {s['real']} real (threshold {s['threshold']:.4f}), {flagged}"
          f"{s['unreadable']} unreadable, {s['skipped']} skipped (not an image type read here) -> {args.out}")


def cmd_package(p: Params, args: argparse.Namespace) -> None:
    from deepfake_detector.stages.register import package

    package(args.model, args.out)
    print(f"saved {args.model} as an MLflow model in {args.out}; serve it with\n"
          f"  mlflow models serve -m {args.out} --env-manager local -p 5001")


def cmd_loso(p: Params, args: argparse.Namespace) -> None:
    from deepfake_detector import loso
    from deepfake_detector.device import resolve_device

    result = loso.run(p, args.data, args.out, resolve_device(p.train.device), show_progress(), args.keep_data)
    print("test ROC AUC of each source's fakes against all reals (* the source left out of training):")
    print(loso.table(result, "roc_auc", bold=False), end="")
    if "held_out_caught_or_flagged" in result:  # a familiarity head: a missed fake may still be flagged
        print("held-out fakes caught or flagged unfamiliar: "
              + ", ".join(f"{s} {figure(v)}" for s, v in result["held_out_caught_or_flagged"].items()))
    if result["held_out_false_positive_rate"]:  # sources of reals alone, each left out: unseen cameras
        print("test false-positive rate of each real source (* the source left out of training):")
        print(loso.table(result, "false_positive_rate", bold=False, reals=True), end="")
    print(f"held-out ROC AUC: mean {figure(result['held_out_roc_auc_mean'])}, "
          f"worst {figure(result['held_out_roc_auc_min'])}; tables in {Path(args.out) / 'loso.md'}"
          + (f"; MLflow run {result['run_id']}" if result["run_id"] else ""))


def cmd_run(p: Params, args: argparse.Namespace) -> None:
    """All the stages in order, with the default paths (what MLproject's ``main`` runs)."""
    from deepfake_detector.stages import download, evaluate, preprocess, twins

    root = Path(args.root)
    raw, processed, models, evaluation = root / "data/raw", root / "data/processed", root / "models", root / "eval"
    report_download(download.run(p, raw), raw)
    report_twins(twins.run(p, raw, root / "data/twins"), root / "data/twins")
    report_preprocess(preprocess.run(p, raw, processed, args.workers, show_progress(), root / "data/twins"), processed)
    train(p, processed, models, None, args.params or DEFAULT_PARAMS, args.overrides)
    report_evaluate(p, evaluate.run(p, processed, models, evaluation), evaluation)


def probability(text: str) -> float:
    """An argparse type: a number from 0 to 1."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a probability (0 to 1)")
    return value


DEFAULT_PARAMS = Path("params.yaml")


def common_options() -> argparse.ArgumentParser:
    """``--params`` and ``-S``, the parent parser of every subcommand here and in ``deepfake-pipeline``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", type=Path, default=None,
                        help=f"params file (default: {DEFAULT_PARAMS}; for scoring, the defaults where there is none)")
    common.add_argument("--set", "-S", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, e.g. -S train.epochs=3 (repeatable)")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepfake", description="Run one stage of the pipeline (what dvc.yaml and MLproject call), score "
        "images with a trained model, or promote a registered one.")
    common = common_options()
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="one of these; `deepfake COMMAND --help` lists its options")

    def add(name: str, func, help_: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, parents=[common], help=help_, description=help_)
        cmd.set_defaults(func=func)
        return cmd

    cmd = add("download", cmd_download, "fetch the raw dataset named by data.source")
    cmd.add_argument("--out", type=Path, default=Path("data/raw"), help="where the dataset goes (default: %(default)s)")
    cmd = add("twins", cmd_twins, "make autoencoder twins of the real faces, a fake source for preprocess "
              "(twins.enabled; else a marker alone)")
    cmd.add_argument("--raw", type=Path, default=Path("data/raw"), help="the downloaded dataset (default: %(default)s)")
    cmd.add_argument("--out", type=Path, default=Path("data/twins"),
                     help="where the twins and twins.json go (default: %(default)s)")
    cmd = add("preprocess", cmd_preprocess, "validate, resize, blur and noise the raw images")
    cmd.add_argument("--raw", type=Path, default=Path("data/raw"), help="the downloaded dataset (default: %(default)s)")
    cmd.add_argument("--twins", type=Path, default=Path("data/twins"),
                     help="the twins stage's output, a fake source when it made twins (default: %(default)s)")
    cmd.add_argument("--out", type=Path, default=Path("data/processed"),
                     help="where the preprocessed splits go (default: %(default)s)")
    cmd.add_argument("--workers", type=int, default=None, help="decode processes (default: all cores)")
    cmd = add("train", cmd_train, "train the CNN and log the run to MLflow")
    cmd.add_argument("--data", type=Path, default=Path("data/processed"),
                     help="the preprocessed splits (default: %(default)s)")
    cmd.add_argument("--out", type=Path, default=Path("models"),
                     help="where model.pt and the training history go (default: %(default)s)")
    cmd.add_argument("--checkpoint-dir", type=Path, default=None,
                     help="resumable checkpoints, kept until the stage succeeds (default: OUT/.ckpt)")
    cmd = add("evaluate", cmd_evaluate, "score the model on the test split and register it, or score "
              "any labelled folder (real/, fake/) or CSV with a stored model")
    cmd.add_argument("--data", default="data/processed",
                     help="preprocessed data (the pipeline); or a folder with real/ and fake/, or a CSV; or "
                     "sources as data.source names them, scored whole and reported per source: a folder with "
                     "{train,valid,test}/{real,fake}/, or a list or mapping such as '{stylegan: DIR, sd: DIR}'")
    cmd.add_argument("--model", default="models", help="folder with model.pt, or an MLflow model URI "
                     "(models:/deepfake-detector@champion)")
    cmd.add_argument("--out", type=Path, default=None,
                     help="where metrics and plots go (default: eval for preprocessed data, with the model card "
                     "and decision settings; else eval-data/<the set's name>, never eval)")
    cmd.add_argument("--threshold", type=probability, default=None,
                     help="for a folder or CSV: P(fake) threshold (default: the model's registered one)")
    cmd.add_argument("--root", type=Path, default=None,
                     help="for a CSV: the folder its paths are relative to (default: found beside the CSV: "
                     "its own folder, real-vs-fake/ or real_vs_fake/real-vs-fake/ as in Kaggle's download)")
    cmd = add("predict", cmd_predict, "score image files and folders into a CSV")
    cmd.add_argument("paths", nargs="+", type=Path, help="image files and/or folders (searched recursively)")
    cmd.add_argument("--model", default="models:/deepfake-detector@champion",
                     help="MLflow model URI, or a folder with model.pt (default: %(default)s)")
    cmd.add_argument("--out", type=Path, default=Path("predictions/preds.csv"),
                     help="the CSV to write (default: %(default)s, a git-ignored folder)")
    cmd.add_argument("--threshold", type=probability, default=None, help="default: the model's registered threshold")
    cmd.add_argument("--no-face-crop", action="store_true", help="score whole images, never crop the largest face")
    cmd = add("package", cmd_package, "save a model folder (model.pt and its detector.json) as an MLflow model "
              "that `mlflow models serve -m OUT` serves without a registry")
    cmd.add_argument("--model", type=Path, default=Path("models"), help="folder with model.pt (default: %(default)s)")
    cmd.add_argument("--out", type=Path, default=Path("build/mlflow-model"),
                     help="the MLflow model folder to write; must not exist (default: %(default)s)")
    cmd = add("promote", cmd_promote, "move the champion alias to the challenger if it passes the gates")
    cmd.add_argument("--dry-run", action="store_true", help="report the decision, change nothing")
    cmd.add_argument("--force", action="store_true", help="promote even if a gate fails (recorded as forced)")
    cmd = add("loso", cmd_loso, "leave one source out: train without each fake source in turn and score every "
              "source's test fakes, to see whether the detector generalises to a generator it never saw")
    cmd.add_argument("--data", type=Path, default=Path("data/processed"),
                     help="the preprocessed splits, with at least two fake sources (default: %(default)s)")
    cmd.add_argument("--out", type=Path, default=Path("build/loso"),
                     help="where loso.json, loso.md and each fit's model go (default: %(default)s)")
    cmd.add_argument("--keep-data", action="store_true",
                     help="keep each fit's copy of the data without the left-out fakes (default: deleted once scored)")
    cmd = add("run", cmd_run, "download, twins, preprocess, train and evaluate in one process")
    cmd.add_argument("--root", type=Path, default=Path("."), help="where data/, models/ and eval/ go")
    cmd.add_argument("--workers", type=int, default=None, help="preprocess's decode processes (default: all cores)")
    return parser


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse ``argv`` (subcommands built with :func:`common_options`), load the params and run the
    subcommand's ``func``; returns the exit status. A :class:`UserError` is one line, status 2."""
    args = parser.parse_args(argv)
    try:
        params = with_overrides(read_params(args), args.overrides)
        args.func(params, args)
    except UserError as exc:
        print(f"{parser.prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Stopped as exc:
        print(f"{parser.prog} {args.command}: stopped by signal {exc.signum}; a rerun resumes from the checkpoint",
              file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        return 130
    return 0


# Commands that only score with a stored model: outside a pipeline workspace they need no params file.
SCORING = frozenset({"predict", "evaluate", "package"})


def read_params(args: argparse.Namespace) -> Params:
    """``--params``, else ``params.yaml`` here, else (for a scoring command) the defaults."""
    if args.params is None and not DEFAULT_PARAMS.exists() and args.command in SCORING:
        return Params()
    return load_params(args.params or DEFAULT_PARAMS)


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
