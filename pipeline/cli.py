"""``deepfake-pipeline``: compile the Kubeflow pipeline, or submit a compiled one to a KFP endpoint.

A console script of its own, next to the core's ``deepfake``, so that the core never imports kfp
(the kubeflow extra). ``--params`` and ``-S`` work as they do for ``deepfake``.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request
from dataclasses import fields
from pathlib import Path
from typing import Any

from deepfake_detector.cli import common_options, run
from deepfake_detector.contract import param_name, param_value
from deepfake_detector.errors import UserError
from deepfake_detector.params import Params, flatten, with_overrides

# pipeline.pipeline (kfp) is imported inside the functions, so that main can say what is missing.
PROG = "deepfake-pipeline"
PACKAGE = Path("build/pipeline.yaml")  # build/ is git-ignored: a compiled spec is not source


def build_parser() -> argparse.ArgumentParser:
    """``compile`` and ``submit``; raises ModuleNotFoundError without kfp (the kubeflow extra)."""
    from pipeline.pipeline import ClusterOptions

    parser = argparse.ArgumentParser(prog=PROG, description="Compile the Kubeflow pipeline, or submit a compiled "
                                     "one to a Kubeflow Pipelines endpoint.")
    common = common_options()
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help=f"one of these; `{PROG} COMMAND --help` lists its options")
    compile_help = "write the KFP pipeline spec (parameter defaults from params.yaml and -S)"
    compile_ = sub.add_parser("compile", parents=[common], help=compile_help, description=compile_help)
    compile_.add_argument("--out", type=Path, default=PACKAGE, help="where the spec goes (default: %(default)s)")
    for f in fields(ClusterOptions):
        compile_.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
                              help=f"{f.metadata['help']} (default: {f.default if f.default != '' else 'none'})")
    compile_.set_defaults(func=cmd_compile)

    submit_help = "submit a compiled pipeline to a Kubeflow Pipelines endpoint"
    submit = sub.add_parser("submit", parents=[common], help=submit_help, description=submit_help)
    submit.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080")
    submit.add_argument("--package", type=Path, default=PACKAGE,
                        help="the spec `compile` wrote (default: %(default)s)")
    submit.add_argument("--experiment", default="deepfake-detector",
                        help="KFP experiment, created when missing (default: %(default)s)")
    submit.add_argument("--run-name", default=None, help="the run's display name (default: KFP's)")
    submit.add_argument("-p", "--param", dest="run_params", action="append", default=[], metavar="KEY=VALUE",
                        help="pipeline parameter, as in params.yaml (train.epochs=3) or the UI (train_epochs=3)")
    submit.add_argument("--namespace", default=None, help="Kubeflow profile namespace (multi-user installs)")
    submit.add_argument("--token", default=None, help="bearer token (default: the kfp client's own lookup)")
    submit.add_argument("--timeout", type=float, default=10.0,
                        help="seconds to wait for the host to answer (default: %(default)s)")
    submit.set_defaults(func=cmd_submit)
    return parser


def cmd_compile(params: Params, args: argparse.Namespace) -> None:
    from pipeline.pipeline import ClusterOptions, compile_pipeline

    options = ClusterOptions(**{f.name: getattr(args, f.name) for f in fields(ClusterOptions)})
    args.out.parent.mkdir(parents=True, exist_ok=True)  # the default, build/, is absent in a fresh clone
    compile_pipeline(params, args.out, options)
    print(f"wrote {args.out} (image {options.image})")


def run_arguments(params: Params, run_params: list[str]) -> dict[str, Any]:
    """``-p`` values keyed by pipeline parameter name, checked against the params' keys and types and
    typed as the pipeline declares its parameters (KFP's API wants 3, not "3", for an integer)."""
    known = {param_name(k): k for k in flatten(params)}
    keys, overrides = [], []
    for item in run_params:
        key, sep, value = item.partition("=")
        if not sep or param_name(key) not in known:
            raise UserError(f"-p {item!r}: not KEY=VALUE with a key of params.yaml")
        keys.append(known[param_name(key)])
        overrides.append(f"{keys[-1]}={value}")
    checked = flatten(with_overrides(params, overrides))  # type-checked now, not on the cluster
    return {param_name(k): param_value(checked[k]) for k in keys}  # as make_pipeline declares them


def cmd_submit(params: Params, args: argparse.Namespace) -> None:
    import kfp

    if not args.package.exists():
        raise UserError(f"{args.package} not found: run `{PROG} compile --out {args.package}` first")
    arguments = run_arguments(params, args.run_params)
    _check_reachable(args.host, args.timeout)
    try:
        client = kfp.Client(host=args.host, namespace=args.namespace, existing_token=args.token)
        result = client.create_run_from_pipeline_package(
            str(args.package), arguments=arguments, run_name=args.run_name,
            experiment_name=args.experiment, namespace=args.namespace)
    except Exception as exc:  # the kfp client raises ApiException, urllib3 and auth errors alike
        raise UserError(f"KFP at {args.host} refused the run: {str(exc).strip().splitlines()[0][:300]}") from None
    print(f"submitted run {result.run_id}: {args.host.rstrip('/')}/#/runs/details/{result.run_id}")


def _check_reachable(host: str, timeout: float) -> None:
    """Fail in seconds on a host that does not answer; the kfp client has no timeout of its own.

    Any HTTP answer counts (a login redirect or 401 is the server speaking); silence does not.
    """
    url = f"{host.rstrip('/')}/apis/v2beta1/healthz"
    try:
        urllib.request.urlopen(url, timeout=timeout).close()
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(f"cannot reach KFP at {host}: {reason}. Check --host (e.g. after "
                        "`kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80`, "
                        "use http://localhost:8080)") from None


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("kfp"):  # kfp missing is a setup step; anything else a bug
            raise
        print(f"{PROG}: error: needs the kubeflow extra ({exc}): in the repository, "
              f"{sys.executable} -m pip install -e '.[kubeflow]'", file=sys.stderr)
        return 2
    return run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
