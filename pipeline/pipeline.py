"""The ``@dsl.pipeline``: download -> twins -> preprocess -> train (torchrun, GPUs) -> evaluate -> gated register.

Its parameters are the keys of ``params.yaml`` with dots as underscores (``train.epochs`` ->
``train_epochs``), defaults read from the file at compile time, so the KFP UI shows and edits the
same knobs as ``dvc exp run -S``. Each step gets only its stage's params
(:mod:`deepfake_detector.contract`), so its cache key moves only with them.
"""

import inspect
from dataclasses import dataclass, field
from pathlib import Path

from kfp import dsl, kubernetes

from components.stages import build
from deepfake_detector.contract import STAGES, param_name, param_value, stage_params
from deepfake_detector.params import Params, flatten
from deepfake_detector.sources import pinned

# Keys of the MLflow secret: the URI is required, the rest optional (not every server wants them).
SECRET_REQUIRED = ("MLFLOW_TRACKING_URI",)
SECRET_OPTIONAL = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                   "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL")
# Where ClusterOptions.checkpoint_pvc is mounted on the train step. Checkpoints inside are keyed
# by a hash of the train params and data, so runs can share the claim.
CHECKPOINT_MOUNT = "/checkpoints"
CHECKPOINT_DIR = f"{CHECKPOINT_MOUNT}/deepfake-detector"


def _option(default, help_: str):
    """A ClusterOptions field whose help text `deepfake-pipeline compile --help` shows."""
    return field(default=default, metadata={"help": help_})


@dataclass(frozen=True)
class ClusterOptions:
    """What the cluster gives each step; compile-time, not pipeline parameters."""

    image: str = _option("ghcr.io/deepfake-detector/deepfake-detector:latest", "project image every step runs on")
    mlflow_secret: str = _option("mlflow", "Kubernetes secret holding MLFLOW_TRACKING_URI and any credentials")
    accelerator_type: str = _option("nvidia.com/gpu", "accelerator resource the train step requests")
    accelerator_limit: int = _option(1, "accelerators for train, one torchrun process each; 0 trains on CPU")
    train_cpu: str = _option("4", "CPUs the train step requests")
    train_memory: str = _option("16G", "memory the train step requests")
    download_retries: int = _option(3, "retries of a failed download step")
    train_retries: int = _option(2, "retries of a failed train pod, resumed from --checkpoint-pvc if set")
    checkpoint_pvc: str = _option("", "existing PersistentVolumeClaim for resumable checkpoints")


def make_pipeline(defaults: Params, options: ClusterOptions = ClusterOptions()):
    """The pipeline function, with one parameter per params key defaulting to ``defaults``."""
    flat = flatten(defaults)
    names = {key: param_name(key) for key in flat}
    if len(set(names.values())) != len(names):
        raise ValueError("two params keys map to the same pipeline parameter name")
    ops = build(options.image)

    def deepfake_detector_pipeline(*args):
        # KFP passes the inputs positionally, in signature order (the order of `flat`).
        channels = dict(zip(flat, args))
        # Each step reads only its stage's keys: an evaluate param change leaves train's inputs, and
        # so its cache key, as they were.
        params = {stage: {key: channels[key] for key in stage_params(defaults, stage)} for stage in STAGES}
        download = ops.download(params=params["download"]).set_display_name("download")
        download.set_retry(num_retries=options.download_retries, backoff_duration="30s", backoff_factor=2)
        twins = ops.twins(params=params["twins"], raw=download.outputs["raw"]).set_display_name("twins")
        preprocess = ops.preprocess(params=params["preprocess"], raw=download.outputs["raw"],
                                    twins=twins.outputs["twins"]).set_display_name("preprocess")
        train = ops.train(params=params["train"], processed=preprocess.outputs["processed"],
                          nproc_per_node=max(options.accelerator_limit, 1),
                          checkpoint_dir=CHECKPOINT_DIR if options.checkpoint_pvc else "").set_display_name("train")
        train.set_cpu_request(options.train_cpu).set_memory_request(options.train_memory)
        train.set_retry(num_retries=options.train_retries, backoff_duration="60s", backoff_factor=2)
        if options.accelerator_limit:
            train.set_accelerator_type(options.accelerator_type).set_accelerator_limit(options.accelerator_limit)
        if options.checkpoint_pvc:
            kubernetes.mount_pvc(train, pvc_name=options.checkpoint_pvc, mount_path=CHECKPOINT_MOUNT)
        # NCCL passes tensors between the pod's processes through /dev/shm; a container's default
        # 64 MB is too small for that.
        kubernetes.empty_dir_mount(train, volume_name="dshm", mount_path="/dev/shm", medium="Memory")
        evaluate = ops.evaluate(params=params["evaluate"], processed=preprocess.outputs["processed"],
                                model=train.outputs["model"]).set_display_name("evaluate")
        with dsl.If(evaluate.outputs["Output"] >= channels["mlflow.register_min_auc"], name="auc-gate"):
            register = ops.register(params=params["register"], model=train.outputs["model"],
                                    evaluation=evaluate.outputs["evaluation"]).set_display_name("register")
        # data.source is a run parameter, but caching is set at compile time: download is cached
        # only when the compiled default is pinned (its bytes fixed by its name); a Kaggle dataset
        # or a folder read again may have changed. A run given another source keeps this choice.
        download.set_caching_options(pinned(defaults.data.source, defaults.data.sha256))
        for task in (twins, preprocess, train, evaluate, register):
            task.set_caching_options(True)
        for task in (train, evaluate, register):
            kubernetes.use_secret_as_env(task, options.mlflow_secret, {k: k for k in SECRET_REQUIRED})
        # Storage credentials also serve download, for `data.source: dvc:...` with an S3 remote.
        for task in (download, train, evaluate, register):
            kubernetes.use_secret_as_env(task, options.mlflow_secret, {k: k for k in SECRET_OPTIONAL},
                                         optional=True)

    # KFP reads inputs from the signature: one typed, defaulted parameter per key.
    defaults_ = {key: param_value(v) for key, v in flat.items()}
    parameters = [inspect.Parameter(names[key], inspect.Parameter.POSITIONAL_OR_KEYWORD, default=value,
                                    annotation=type(value)) for key, value in defaults_.items()]
    deepfake_detector_pipeline.__signature__ = inspect.Signature(parameters)
    deepfake_detector_pipeline.__annotations__ = {p.name: p.annotation for p in parameters}
    return dsl.pipeline(name="deepfake-detector",
                        description="Real vs GAN face detector: download, twins, preprocess, train, evaluate, "
                                    "register to MLflow")(deepfake_detector_pipeline)


def compile_pipeline(defaults: Params, out: Path, options: ClusterOptions = ClusterOptions()) -> Path:
    """Write the pipeline spec with ``defaults`` as parameter defaults to ``out`` (YAML)."""
    from kfp import compiler

    compiler.Compiler().compile(make_pipeline(defaults, options), str(out))
    return out
