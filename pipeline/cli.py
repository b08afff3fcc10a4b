"""``deepfake pipeline compile`` and ``deepfake pipeline submit``."""

import argparse
import urllib.error
import urllib.request
from dataclasses import fields
from pathlib import Path

from deepfake_detector.errors import UserError
from deepfake_detector.params import Params, flatten, with_overrides
from pipeline.pipeline import ClusterOptions, compile_pipeline, param_name


def add_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    """``compile`` and ``submit`` under ``parser``; ``common`` brings --params and -S."""
    sub = parser.add_subparsers(dest="pipeline_command", required=True)
    compile_ = sub.add_parser("compile", parents=[common],
                              help="write the KFP pipeline spec (defaults from params.yaml and -S)")
    compile_.add_argument("--out", type=Path, default=Path("pipeline.yaml"))
    for f in fields(ClusterOptions):
        compile_.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
                              help=f"default: {f.default if f.default != '' else 'none'}")
    compile_.set_defaults(pipeline_func=cmd_compile)

    submit = sub.add_parser("submit", parents=[common],
                            help="submit a compiled pipeline to a Kubeflow Pipelines endpoint")
    submit.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080")
    submit.add_argument("--package", type=Path, default=Path("pipeline.yaml"), help="from `compile`")
    submit.add_argument("--experiment", default="deepfake-detector")
    submit.add_argument("--run-name", default=None)
    submit.add_argument("-p", "--param", dest="run_params", action="append", default=[], metavar="KEY=VALUE",
                        help="pipeline parameter, as in params.yaml (train.epochs=3) or the UI (train_epochs=3)")
    submit.add_argument("--namespace", default=None, help="Kubeflow profile namespace (multi-user installs)")
    submit.add_argument("--token", default=None, help="bearer token (default: the kfp client's own lookup)")
    submit.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the host to answer")
    submit.set_defaults(pipeline_func=cmd_submit)


def cmd_compile(params: Params, args: argparse.Namespace) -> None:
    options = ClusterOptions(**{f.name: getattr(args, f.name) for f in fields(ClusterOptions)})
    compile_pipeline(params, args.out, options)
    print(f"wrote {args.out} (image {options.image})")


def run_arguments(params: Params, run_params: list[str]) -> dict[str, str]:
    """``-p`` values keyed by pipeline parameter name, each checked against the params' keys and types."""
    known = {param_name(k): k for k in flatten(params)}
    arguments = {}
    for item in run_params:
        key, sep, value = item.partition("=")
        name = param_name(key)
        if not sep or name not in known:
            raise UserError(f"-p {item!r}: not KEY=VALUE with a key of params.yaml")
        with_overrides(params, [f"{known[name]}={value}"])  # type-check it now, not on the cluster
        arguments[name] = value
    return arguments


def cmd_submit(params: Params, args: argparse.Namespace) -> None:
    import kfp

    if not args.package.exists():
        raise UserError(f"{args.package} not found: run `deepfake pipeline compile` first")
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
                        "`kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80`, use http://localhost:8080)") from None
