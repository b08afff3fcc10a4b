"""Pipeline parameters: frozen dataclasses loaded from ``params.yaml``.

Every key in ``params.yaml`` maps onto a field here; an unknown, missing or
mistyped key is a :class:`ParamsError` that names it, so a typo in
``dvc exp run -S train.lr=...`` fails before any work is done.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from deepfake_detector.errors import UserError

DEFAULT_KAGGLE_SOURCE = "kaggle:xhlulu/140k-real-and-fake-faces"


class ParamsError(UserError):
    """A parameter file that does not match the schema."""


# Choices are declared as Literal types, ranges with the helpers below; one routine, _check, checks both
# whenever a params dataclass (a _Checked) is built, from YAML, -S overrides or Python, naming the full key.
def checked(default: Any, must: str, test: Callable[[Any], bool]) -> Any:
    """A field whose value must pass ``test``, else "<key> must be <must>, got <value>"."""
    return field(default=default, metadata={"must": (must, test)})


def probability(default: float = 0.0) -> Any:
    return checked(default, "between 0 and 1", lambda v: 0 <= v <= 1)


def at_least(low: float, default: Any) -> Any:
    return checked(default, f"at least {low:g}", lambda v: v >= low)


def positive(default: Any) -> Any:
    return checked(default, "more than 0", lambda v: v > 0)


class _Checked:
    """Base of the params dataclasses: checks each field's declared choices and range on construction."""

    def __post_init__(self) -> None:
        for name in _hints(type(self)):
            _check(type(self), name, getattr(self, name), f"{_WHERE.get(type(self), type(self).__name__)}.{name}")


Arch = Literal["cnn", "resnet18", "resnet50", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny",
               "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
ARCHS: tuple[str, ...] = typing.get_args(Arch)
Precision = Literal["auto", "bf16", "fp16", "fp32"]
PRECISIONS: tuple[str, ...] = typing.get_args(Precision)  # train.precision


@dataclass(frozen=True)
class DataParams(_Checked):
    """Where the raw dataset comes from."""

    # One source: kaggle:OWNER/NAME, http(s)://...zip|tar, dvc:REPO@REV or a local folder/archive; several:
    # a list of them, or a mapping {name: source} (sources.py). A list or mapping is kept as its YAML
    # text, so it travels as one value through DVC, MLproject, Kubeflow and MLflow.
    source: str = field(default=DEFAULT_KAGGLE_SOURCE, metadata={"yaml_text": True})
    sha256: str = ""  # expected checksum of a URL archive; empty skips the check


@dataclass(frozen=True)
class DownloadParams(_Checked):
    """Fetching ``data.source``, and the caps that refuse an archive bomb before anything is unpacked."""

    timeout_s: float = 60.0
    retries: int = 3
    # The 140k set unpacks to ~4 GB in ~140k barely compressible JPEGs: these leave it ample room.
    max_bytes: int = positive(20_000_000_000)  # total uncompressed size of an archive's entries (20 GB)
    max_entries: int = positive(500_000)  # files and folders in an archive
    max_ratio: float = positive(100.0)  # uncompressed size / archive size: JPEGs ~1, text ~10, zip bombs 1000


@dataclass(frozen=True)
class BlurParams(_Checked):
    prob: float = probability()
    sigma: tuple[float, float] = (0.1, 1.5)


@dataclass(frozen=True)
class NoiseParams(_Checked):
    prob: float = probability()
    sigma: tuple[float, float] = (1.0, 8.0)  # std of Gaussian noise, in 0-255 pixel units


@dataclass(frozen=True)
class PreprocessParams(_Checked):
    image_size: int = 224
    min_source_size: int = 64  # smaller images are quarantined, not upscaled
    limit_per_class: int = 0  # 0 keeps every image; N keeps the first N per split and class
    splits: tuple[str, ...] = ("train",)  # splits that get blur and noise
    # How an image reaches image_size: resize (centre square, bicubic) or crop (the centre image_size
    # square at the source's own pixels, resized only when smaller): resampling blurs a generator's
    # up-sampling traces (B-Free, CVPR 2025). Scorers of the model fit images the same way.
    fit: Literal["resize", "crop"] = "resize"
    # A source without train/valid/test folders is split by the sha256 of each file: these shares.
    split_ratios: tuple[float, float, float] = checked((0.8, 0.1, 0.1), "three shares (train/valid/test) summing to 1",
                                                       lambda v: min(v) >= 0 and abs(sum(v) - 1) < 1e-6)
    # Off by default: without them valid AUC and accuracy were higher for each of three seeds (the
    # docs/experiments.md); set a prob (e.g. 0.2) to train on degraded copies as well.
    blur: BlurParams = field(default_factory=BlurParams)
    noise: NoiseParams = field(default_factory=NoiseParams)


@dataclass(frozen=True)
class ModelParams(_Checked):
    arch: Arch = "efficientnet_lite0"  # cnn (our own) | a torchvision backbone | efficientnet_lite0/1/2 (see ARCHS)
    # What the network sees: rgb, or residual, the normalised image minus its 2x nearest-neighbour
    # down-and-up-sampled copy (NPR, CVPR 2024): the traces of a generator's up-sampling, not the content.
    input: Literal["rgb", "residual"] = "rgb"
    pretrained: str = "imagenet"  # backbone weights: none | imagenet | path of a state dict
    # cnn: one conv block per entry, depth and width. Five single-conv blocks (32-256) reached valid
    # AUC 0.87 where four double-conv ones (16-128) reached 0.81, for 12 % more time per epoch
    # (docs/experiments.md).
    channels: tuple[int, ...] = (32, 64, 128, 256, 256)
    convs_per_block: int = 1  # cnn
    batch_norm: bool = True  # cnn
    hidden: int = 128  # cnn: width of the hidden fully connected layer
    dropout: float = 0.2  # before the final linear layer(s)


@dataclass(frozen=True)
class JpegParams(_Checked):
    prob: float = probability()
    quality: tuple[float, float] = (50.0, 95.0)  # JPEG quality range


@dataclass(frozen=True)
class AugmentParams(_Checked):
    """Online augmentation of training batches, drawn per sample every epoch (see augment.py)."""

    hflip: float = probability(0.5)  # probability of a horizontal flip; faces are left-right symmetric
    crop_scale: tuple[float, float] = (0.6, 1.0)  # random resized crop: area share range; [1, 1] turns it off
    # Online blur, noise and JPEG are off by default (the ablation in docs/experiments.md); preprocess keeps its own.
    blur: BlurParams = field(default_factory=BlurParams)
    noise: NoiseParams = field(default_factory=NoiseParams)
    jpeg: JpegParams = field(default_factory=JpegParams)
    # MixUp: the probability that an image is blended with the one before it in its batch, keeping a
    # uniform share of itself and of its label (torchvision's MixUp with alpha 1, drawn per image).
    mixup: float = probability()


@dataclass(frozen=True)
class TrainParams(_Checked):
    epochs: int = at_least(1, 10)
    batch_size: int = at_least(1, 64)
    lr: float = 1e-3
    weight_decay: float = 0.05  # AdamW's, on weights only (never on norms and biases)
    label_smoothing: float = 0.1  # cross-entropy towards (1 - e, e) instead of one-hot targets
    # auto: when the train split's classes are unequal (sources add fakes), weight the loss by
    # n / (2 n_class) so that each class counts alike; none: plain mean.
    balance: Literal["auto", "none"] = "auto"
    warmup_epochs: float = 1.0  # linear learning-rate warm-up from 0, then the schedule
    device: str = "auto"  # auto (every CUDA device, else CPU) | cpu | cuda | cuda:N
    # An exponential moving average of the weights (torchvision's --model-ema), its time constant in
    # epochs; 0 = off. Validation, the best checkpoint and the saved model then use the average.
    ema_epochs: float = at_least(0, 0.0)
    # Autocast dtype. auto: bf16 on GPUs that support it, fp16 with loss scaling on older GPUs, fp32 on
    # CPUs; bf16: also on CPUs with bf16 instructions (AVX512-BF16, AMX); fp16 (CUDA only); fp32.
    precision: Precision = "auto"
    augment: AugmentParams = field(default_factory=AugmentParams)
    monitor: Literal["auc", "accuracy", "loss"] = "auc"  # valid metric that picks the best checkpoint
    # The best checkpoint is the epoch whose monitor, averaged over it and the epochs before it (this
    # many in all), is best; 1 = that epoch's alone. On a small valid split the best single epoch of a
    # noisy curve is partly a lucky draw (README, the train stage); a window of 5 picks a good stretch.
    monitor_window: int = at_least(1, 5)
    scheduler: Literal["cosine", "constant"] = "cosine"  # learning-rate schedule over the epochs
    data_on_device: Literal["auto", "true", "false"] = "auto"  # splits resident in device memory; auto: if they fit
    channels_last: bool = True  # NHWC memory layout, faster convolutions on GPUs and CPUs
    compile: bool = False  # torch.compile the model: faster steps on GPUs after a warm-up


@dataclass(frozen=True)
class RobustnessParams(_Checked):
    """Perturbations of the test split, each level one row of the robustness matrix."""

    jpeg_quality: tuple[int, ...] = (90, 75, 50, 30)  # JPEG re-compression
    blur_sigma: tuple[float, ...] = (0.5, 1.0, 2.0)  # Gaussian blur, pixels
    noise_sigma: tuple[float, ...] = (5.0,)  # additive Gaussian noise std, 0-255 units
    downscale: tuple[float, ...] = (0.5,)  # downscale by this factor, then back up


@dataclass(frozen=True)
class EvaluateParams(_Checked):
    batch_size: int = at_least(1, 128)  # images scored at a time (evaluate, predict, serving)
    # How P(fake) is computed (backends.py): torch (an inference graph of the network) or onnxruntime
    # (model.onnx, the onnx extra); auto: onnxruntime on a CPU where it and the model's ONNX file are there.
    backend: Literal["auto", "torch", "onnxruntime"] = "auto"
    # Chosen on the valid split: eer | max_accuracy | target_fpr | fixed. eer (false positive rate =
    # miss rate) is steadier than max_accuracy on a small valid split (docs/experiments.md, Results).
    threshold_rule: Literal["eer", "max_accuracy", "target_fpr", "fixed"] = "eer"
    target_fpr: float = 0.05  # target_fpr: highest recall with at most this share of real called fake
    threshold: float = 0.5  # fixed: P(fake) at or above which an image is called fake
    crop_faces: bool = True  # scorers of this model crop the largest face of photos that are not face crops
    calibration_bins: int = 10
    mistakes: int = 16  # how many of the most confident mistakes to show
    robustness: RobustnessParams = field(default_factory=RobustnessParams)


@dataclass(frozen=True)
class PromoteParams(_Checked):
    """Gates a challenger must pass to become champion (``deepfake promote``)."""

    min_auc: float = 0.8  # test ROC AUC at least this
    max_auc_drop: float = 0.005  # and at most this much below the current champion's
    max_robustness_drop: float = 0.25  # worst robustness row's AUC at most this far below clean AUC
    min_source_auc: float = probability(0.8)  # each source's fakes vs all reals: test ROC AUC at least this
    alias: str = "champion"


@dataclass(frozen=True)
class MlflowParams(_Checked):
    enabled: bool = True
    tracking_uri: str = "sqlite:///mlflow.db"  # MLFLOW_TRACKING_URI overrides it
    experiment: str = "deepfake-detector"
    model_name: str = "deepfake-detector"
    alias: str = "challenger"
    register_min_auc: float = 0.5  # register (and move the alias) only when test ROC AUC reaches this


@dataclass(frozen=True)
class Params(_Checked):
    seed: int = 0
    data: DataParams = field(default_factory=DataParams)
    download: DownloadParams = field(default_factory=DownloadParams)
    preprocess: PreprocessParams = field(default_factory=PreprocessParams)
    model: ModelParams = field(default_factory=ModelParams)
    train: TrainParams = field(default_factory=TrainParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    promote: PromoteParams = field(default_factory=PromoteParams)
    mlflow: MlflowParams = field(default_factory=MlflowParams)


_hints = functools.cache(typing.get_type_hints)
_WHERE: dict[type, str] = {}  # key of each section, for messages about one built in Python: train.augment


def _name_sections(cls: type, where: str = "") -> None:
    for name, hint in _hints(cls).items():
        if dataclasses.is_dataclass(hint):  # one found at two keys (BlurParams) goes by its class name
            _WHERE[hint] = where + name if _WHERE.get(hint, where + name) == where + name else hint.__name__
            _name_sections(hint, f"{where}{name}.")


_name_sections(Params)


def project_root() -> Path:
    """The repository a run belongs to, against which relative paths of params (the MLflow sqlite
    store, a local ``data.source``) resolve.

    ``dvc exp run --queue`` and ``--temp`` run the pipeline in a temporary clone inside
    ``<repo>/.dvc/tmp/exps/``, deleted afterwards (``DVC_ROOT`` is that clone): what must outlive the
    run resolves against ``<repo>``. Anywhere else it is ``DVC_ROOT``, else the working directory.
    """
    root = Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()
    parts = root.parts
    for i in range(len(parts) - 2):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root


def resolve(path: str) -> str:
    """``path`` if it is absolute or exists as given, else the same path under :func:`project_root`
    when something is there."""
    candidate = Path(path)
    if candidate.is_absolute() or candidate.exists() or not (project_root() / candidate).exists():
        return path
    return str(project_root() / candidate)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read ``path`` into :class:`Params`; every key must exist in the file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"params file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {exc}") from None
    return from_dict(raw if raw is not None else {}, partial=False)


def from_dict(raw: Any, partial: bool = True) -> Params:
    """Build :class:`Params` from nested dicts; ``partial`` fills missing keys with defaults."""
    return _build(Params, raw, "", partial)


def with_overrides(params: Params, overrides: list[str]) -> Params:
    """Apply ``key.path=value`` overrides (values parsed as YAML), as ``dvc exp run -S`` does."""
    if not overrides:
        return params
    raw = to_dict(params)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ParamsError(f"override {item!r} is not KEY=VALUE")
        *parents, leaf = key.split(".")
        node = raw
        for i, part in enumerate(parents):
            if not isinstance(node.get(part), dict):
                raise ParamsError(f"unknown parameter: {'.'.join(parents[:i + 1])}")
            node = node[part]
        if leaf not in node:
            raise ParamsError(f"unknown parameter: {key}")
        # An empty value is the empty string, not YAML's null: MLproject passes `data.sha256=` so.
        node[leaf] = yaml.safe_load(value) if value else ""
    return from_dict(raw, partial=False)


def from_flat(flat: dict[str, Any], partial: bool = False) -> Params:
    """:class:`Params` from dotted keys (``{"train.lr": 0.01, ...}``); every key required unless ``partial``."""
    raw: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return from_dict(raw, partial=partial)


def to_dict(params: Any) -> dict[str, Any]:
    """Nested plain dict of a params dataclass (tuples become lists, as in YAML)."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(params))


def flatten(params: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys (``train.lr``) to leaf values, as DVC and MLflow name them.

    ``params`` is a params dataclass or a dict whose values may be dataclasses or dicts.
    """
    out: dict[str, Any] = {}
    for key, value in (to_dict(params) if dataclasses.is_dataclass(params) else params).items():
        name = f"{prefix}{key}"
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _build(cls: type, raw: Any, where: str, partial: bool) -> Any:
    label = where or "params"
    if not isinstance(raw, dict):
        raise ParamsError(f"{label} must be a mapping, got {type(raw).__name__}")
    hints = _hints(cls)
    names = list(hints)
    unknown = sorted(set(raw) - set(names))
    if unknown:
        keys = ", ".join(f"{where}{'.' if where else ''}{k}" for k in unknown)
        raise ParamsError(f"unknown parameter(s): {keys} (known here: {', '.join(names)})")
    kwargs = {}
    for name in names:
        key = f"{where}.{name}" if where else name
        if name not in raw:
            if not partial:
                raise ParamsError(f"missing parameter: {key}")
            continue
        value = raw[name]
        if isinstance(value, (list, dict)) and cls.__dataclass_fields__[name].metadata.get("yaml_text"):
            value = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=1 << 16).strip()
        kwargs[name] = _coerce(hints[name], value, key, partial)
        _check(cls, name, kwargs[name], key)  # here, where the full key is known
    return cls(**kwargs)


def _check(cls: type, name: str, value: Any, key: str) -> None:
    """The one check of a field's declared choices (its Literal type) and range (metadata of ``checked``)."""
    choices = typing.get_args(_hints(cls)[name]) if typing.get_origin(_hints(cls)[name]) is Literal else ()
    if choices and value not in choices:
        raise ParamsError(f"{key} must be one of {', '.join(choices)}, got {value!r}")
    must, test = cls.__dataclass_fields__[name].metadata.get("must", (None, None))
    if test is not None and not test(value):
        raise ParamsError(f"{key} must be {must}, got {value!r}")


def _coerce(hint: Any, value: Any, key: str, partial: bool) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key, partial)
    if typing.get_origin(hint) is Literal:  # choices of text, read as str; _check checks the choice
        hint = str
    origin = typing.get_origin(hint)
    if isinstance(value, str) and hint is not str and value.strip():
        # Text from outside (KFP parameters arrive as strings) is read as YAML: "3" -> 3,
        # "[8, 16]" -> [8, 16]; a list may also be given comma-separated: "train,valid".
        value = yaml.safe_load(value)
        if origin is tuple and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif origin is tuple and not isinstance(value, list):
            value = [value]  # "8": a one-item list
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{key} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{key}[{i}]", partial) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ParamsError(f"{key} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, f"{key}[{i}]", partial) for i, (a, v) in enumerate(zip(args, value)))
    # bool is an int subclass: keep `epochs: true` from passing as 1.
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        # MLproject has no int type: its float params arrive as e.g. 20.0, which means 20.
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        # PyYAML reads `1e-3` (no dot) as a string; accept it as the number it means.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif hint is str:
        if isinstance(value, bool):  # YAML reads `true` as a boolean; switches like auto|true|false want text
            value = str(value).lower()
        ok = isinstance(value, str)
    else:
        raise TypeError(f"unsupported type for {key}: {hint}")
    if not ok:
        raise ParamsError(f"{key} must be {hint.__name__}, got {value!r}")
    return value
