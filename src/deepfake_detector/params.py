"""Pipeline parameters: frozen dataclasses loaded from ``params.yaml`` (which documents each key).

Every key maps onto a field; an unknown, missing or mistyped key is a :class:`ParamsError` that names
it, so a typo in ``dvc exp run -S train.lr=...`` fails before any work is done. Choices are declared as
``Literal`` types and ranges with :func:`checked`; one routine, :func:`_check`, checks both whenever a
params dataclass is built (from YAML, ``-S`` overrides, KFP text or Python), naming the full key.
"""

from __future__ import annotations

import contextlib
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


class ParamsError(UserError):
    """A parameter file that does not match the schema."""


def checked(default: Any, must: str, test: Callable[[Any], bool]) -> Any:
    """A field whose value must pass ``test``, else "<key> must be <must>, got <value>"."""
    return field(default=default, metadata={"must": (must, test)})


def probability(default: float = 0.0) -> Any:
    return checked(default, "between 0 and 1", lambda v: 0 <= v <= 1)


def at_least(low: float, default: Any) -> Any:
    return checked(default, f"at least {low:g}", lambda v: v >= low)


def positive(default: Any) -> Any:
    return checked(default, "more than 0", lambda v: v > 0)


def section(cls: type) -> Any:
    return field(default_factory=cls)


class _Checked:
    """Base of the params dataclasses: checks each field's declared choices and range on construction."""

    def __post_init__(self) -> None:
        for name in _hints(type(self)):
            _check(type(self), name, getattr(self, name), f"{_WHERE.get(type(self), type(self).__name__)}.{name}")


Arch = Literal["cnn", "resnet18", "resnet50", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny",
               "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
ARCHS: tuple[str, ...] = typing.get_args(Arch)
Precision = Literal["auto", "bf16", "fp16", "fp32"]
PRECISIONS: tuple[str, ...] = typing.get_args(Precision)
ThresholdRule = Literal["eer", "max_accuracy", "target_fpr", "source_fpr", "fixed"]
THRESHOLD_RULES: tuple[str, ...] = typing.get_args(ThresholdRule)


@dataclass(frozen=True)
class DataParams(_Checked):
    # One source or several (a list, or a mapping {name: source}: sources.py). A list or mapping is kept
    # as its YAML text, so it travels as one value through DVC, MLproject, Kubeflow and MLflow.
    source: str = field(default="kaggle:xhlulu/140k-real-and-fake-faces", metadata={"yaml_text": True})
    sha256: str = ""


@dataclass(frozen=True)
class DownloadParams(_Checked):
    timeout_s: float = 60.0
    retries: int = 3
    # Archive-bomb caps: the 140k set unpacks to ~4 GB in ~140k barely compressible JPEGs.
    max_bytes: int = positive(20_000_000_000)
    max_entries: int = positive(500_000)
    max_ratio: float = positive(100.0)


@dataclass(frozen=True)
class TwinsParams(_Checked):
    """Autoencoder twins of the real faces, a fake family made without a generator (twins.py)."""

    enabled: bool = False  # off: the stage writes a marker alone and preprocess adds no source
    # The "faithful" twins of docs/experiments.md (mean error 4.8 of 255): 3 stages, 64 channels and 30
    # epochs at 1e-3 made blurred twins (8.3), which taught a wrong cue.
    stages: int = checked(1, "1, 2 or 3", lambda v: v in (1, 2, 3))
    latent: int = at_least(1, 32)
    upsample: Literal["transposed", "bilinear"] = "transposed"
    epochs: int = at_least(1, 100)
    lr: float = positive(3e-3)
    # Fit on a random crop x crop square of each image per step (0: whole images, as resynth.py did): the
    # net (1 stage) sees ~6 px around a pixel, so crops teach it the same spectral cue ~25x faster
    # (docs/experiments.md, the twins stage).
    crop: int = at_least(0, 64)
    quality: int = checked(75, "between 1 and 100", lambda v: 1 <= v <= 100)
    device: str = "auto"


@dataclass(frozen=True)
class BlurParams(_Checked):
    prob: float = probability()
    sigma: tuple[float, float] = (0.1, 1.5)


@dataclass(frozen=True)
class NoiseParams(_Checked):
    prob: float = probability()
    sigma: tuple[float, float] = (1.0, 8.0)  # 0-255 pixel units


@dataclass(frozen=True)
class JpegParams(_Checked):
    prob: float = probability()
    quality: tuple[float, float] = (50.0, 95.0)


@dataclass(frozen=True)
class PreprocessParams(_Checked):
    image_size: int = 224
    min_source_size: int = 64
    limit_per_class: int = 0
    splits: tuple[str, ...] = ("train",)
    # crop keeps the source's own pixels: resampling blurs a generator's up-sampling traces (B-Free, CVPR
    # 2025). It travels in model.pt, so every scorer of the model fits images the same way.
    fit: Literal["resize", "crop"] = "resize"
    split_ratios: tuple[float, float, float] = checked((0.8, 0.1, 0.1), "three shares (train/valid/test) summing to 1",
                                                       lambda v: min(v) >= 0 and abs(sum(v) - 1) < 1e-6)
    # Off by default: valid AUC and accuracy were higher without them for each of three seeds (docs/experiments.md).
    blur: BlurParams = section(BlurParams)
    noise: NoiseParams = section(NoiseParams)


@dataclass(frozen=True)
class ModelParams(_Checked):
    arch: Arch = "efficientnet_lite0"
    # residual: NPR (CVPR 2024), the generator's up-sampling traces rather than the content (model.residual).
    input: Literal["rgb", "residual"] = "rgb"
    # A spectrum branch beside the CNN, fit after training (spectrum.py): off by default, since it needs
    # a fake family with spectral traces in training (Stable Diffusion, autoencoder twins; not StyleGAN).
    spectrum: bool = False
    # Fake sources that fit the spectrum branch only, never the CNN: autoencoder twins teach a CNN that
    # "smoother than FFHQ" means fake, and it then calls blurred or downscaled real photos fake.
    spectrum_only: tuple[str, ...] = ()
    # A head fit after training that flags images unlike the train split ("unfamiliar": the answer is
    # unreliable there), familiarity.py: mahalanobis | knn | none. Chosen in docs/experiments.md.
    familiarity: Literal["mahalanobis", "knn", "none"] = "mahalanobis"
    # joint: each stage's mean-pooled output, side by side, one density | stages: a density each (the
    # largest distance counts) | embedding: the last layer's input alone
    familiar_features: Literal["joint", "stages", "embedding"] = "joint"
    familiar_groups: Literal["class", "source"] = "source"  # mahalanobis: one Gaussian per class, or per source
    unfamiliar_share: float = checked(0.05, "a share in (0, 1)", lambda v: 0 < v < 1)  # of valid images flagged
    pretrained: str = "imagenet"
    # cnn only. Five single-conv blocks (32-256) reached valid AUC 0.87 where four double-conv ones
    # (16-128) reached 0.81, for 12 % more time per epoch (docs/experiments.md).
    channels: tuple[int, ...] = (32, 64, 128, 256, 256)
    convs_per_block: int = 1
    batch_norm: bool = True
    hidden: int = 128
    dropout: float = 0.2


@dataclass(frozen=True)
class AugmentParams(_Checked):
    """Online augmentation of training batches, drawn per sample every epoch (augment.py)."""

    hflip: float = probability(0.5)
    crop_scale: tuple[float, float] = (0.6, 1.0)
    # Blur, noise and JPEG are off by default: the ablation in docs/experiments.md.
    blur: BlurParams = section(BlurParams)
    noise: NoiseParams = section(NoiseParams)
    jpeg: JpegParams = section(JpegParams)
    mixup: float = probability()  # torchvision's MixUp with alpha 1, drawn per image


@dataclass(frozen=True)
class TrainParams(_Checked):
    epochs: int = at_least(1, 10)
    batch_size: int = at_least(1, 64)
    lr: float = 1e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    # auto: loss weights n / (2 n_class) when the classes are unequal; sources: per (class, source) group,
    # n / (2 k_class n_group), so a small second source of a class is not drowned by a big one.
    balance: Literal["auto", "sources", "none"] = "auto"
    warmup_epochs: float = 1.0
    device: str = "auto"
    ema_epochs: float = at_least(0, 0.0)  # torchvision's --model-ema, its time constant in epochs
    precision: Precision = "auto"
    augment: AugmentParams = section(AugmentParams)
    monitor: Literal["auc", "accuracy", "loss"] = "auc"
    # On a small valid split the best single epoch of a noisy curve is partly a lucky draw (README, the
    # train stage): a window of 5 picks a good stretch.
    monitor_window: int = at_least(1, 5)
    scheduler: Literal["cosine", "constant"] = "cosine"
    data_on_device: Literal["auto", "true", "false"] = "auto"
    channels_last: bool = True
    compile: bool = False


@dataclass(frozen=True)
class RobustnessParams(_Checked):
    """Perturbations of the test split, each level one row of the robustness matrix."""

    jpeg_quality: tuple[int, ...] = (90, 75, 50, 30)
    blur_sigma: tuple[float, ...] = (0.5, 1.0, 2.0)
    noise_sigma: tuple[float, ...] = (5.0,)
    downscale: tuple[float, ...] = (0.5,)


@dataclass(frozen=True)
class EvaluateParams(_Checked):
    batch_size: int = at_least(1, 128)
    backend: Literal["auto", "torch", "onnxruntime"] = "auto"  # backends.py
    # eer (false positive rate = miss rate) is steadier than max_accuracy on a small valid split
    # (docs/experiments.md).
    threshold_rule: ThresholdRule = "eer"
    target_fpr: float = 0.05
    threshold: float = 0.5
    crop_faces: bool = True
    calibration_bins: int = 10
    mistakes: int = 16
    robustness: RobustnessParams = section(RobustnessParams)


@dataclass(frozen=True)
class PromoteParams(_Checked):
    """Gates a challenger must pass to become champion (``deepfake promote``)."""

    min_auc: float = 0.8
    max_auc_drop: float = 0.005
    max_robustness_drop: float = 0.25
    min_source_auc: float = probability(0.8)
    # The default model calls about a tenth of faces-mini's real test faces fake at the eer threshold
    # (its EER: 0.085-0.110 over three seeds); 100 of them put one seed's figure a few points either side.
    max_source_fpr: float = probability(0.2)
    alias: str = "champion"


@dataclass(frozen=True)
class MlflowParams(_Checked):
    enabled: bool = True
    tracking_uri: str = "sqlite:///mlflow.db"  # MLFLOW_TRACKING_URI overrides it
    experiment: str = "deepfake-detector"
    model_name: str = "deepfake-detector"
    alias: str = "challenger"
    register_min_auc: float = 0.5


@dataclass(frozen=True)
class Params(_Checked):
    seed: int = 0
    data: DataParams = section(DataParams)
    download: DownloadParams = section(DownloadParams)
    twins: TwinsParams = section(TwinsParams)
    preprocess: PreprocessParams = section(PreprocessParams)
    model: ModelParams = section(ModelParams)
    train: TrainParams = section(TrainParams)
    evaluate: EvaluateParams = section(EvaluateParams)
    promote: PromoteParams = section(PromoteParams)
    mlflow: MlflowParams = section(MlflowParams)


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
    flat = flatten(params)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ParamsError(f"override {item!r} is not KEY=VALUE")
        if key not in flat:
            raise ParamsError(f"unknown parameter: {key}")
        # An empty value is the empty string, not YAML's null: MLproject passes `data.sha256=` so.
        flat[key] = yaml.safe_load(value) if value else ""
    return from_flat(flat)


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
        return [plain(v) for v in value] if isinstance(value, (tuple, list)) else value

    return plain(dataclasses.asdict(params))


def flatten(params: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys (``train.lr``) to leaf values, as DVC and MLflow name them, of a params dataclass or
    of a dict whose values may be dataclasses or dicts."""
    out: dict[str, Any] = {}
    for key, value in (to_dict(params) if dataclasses.is_dataclass(params) else params).items():
        if dataclasses.is_dataclass(value) or isinstance(value, dict):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _build(cls: type, raw: Any, where: str, partial: bool) -> Any:
    if not isinstance(raw, dict):
        raise ParamsError(f"{where or 'params'} must be a mapping, got {type(raw).__name__}")
    names = list(_hints(cls))
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
        kwargs[name] = _coerce(_hints(cls)[name], value, key, partial)
        _check(cls, name, kwargs[name], key)  # here, where the full key is known
    return cls(**kwargs)


def _check(cls: type, name: str, value: Any, key: str) -> None:
    """The one check of a field's declared choices (its Literal type) and range (metadata of ``checked``)."""
    hint = _hints(cls)[name]
    choices = typing.get_args(hint) if typing.get_origin(hint) is Literal else ()
    if choices and value not in choices:
        raise ParamsError(f"{key} must be one of {', '.join(choices)}, got {value!r}")
    must, test = cls.__dataclass_fields__[name].metadata.get("must", (None, None))
    if test is not None and not test(value):
        raise ParamsError(f"{key} must be {must}, got {value!r}")


def _coerce(hint: Any, value: Any, key: str, partial: bool) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key, partial)
    hint = str if typing.get_origin(hint) is Literal else hint  # a choice of text; _check checks the choice
    items = typing.get_args(hint)  # of a tuple
    if isinstance(value, str) and hint is not str and value.strip():
        # Text from outside (KFP parameters arrive as strings) is read as YAML: "3" -> 3, "[8, 16]" ->
        # [8, 16]; a list may also be given comma-separated ("train,valid") or as one item ("8").
        value = yaml.safe_load(value)
        if items and not isinstance(value, list):
            value = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else [value]
    elif isinstance(value, str) and items:
        value = []  # an empty list as KFP passes it: comma-separated, no items (contract.py)
    if items:
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{key} must be a list, got {value!r}")
        if items[-1] is Ellipsis:
            items = (items[0],) * len(value)
        elif len(value) != len(items):
            raise ParamsError(f"{key} must be a list of {len(items)} values, got {value!r}")
        return tuple(_coerce(a, v, f"{key}[{i}]", partial) for i, (a, v) in enumerate(zip(items, value)))
    if hint is int and isinstance(value, float) and value.is_integer():
        value = int(value)  # MLproject has no int type: its float params arrive as e.g. 20.0, meaning 20
    elif hint is float and isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)  # PyYAML reads `1e-3` (no dot) as text
    elif hint is str and isinstance(value, bool):
        value = str(value).lower()  # YAML's `true` for a text switch (auto|true|false) is the text
    # bool is an int subclass: keep `epochs: true` from passing as 1.
    if not isinstance(value, (int, float) if hint is float else hint) or (hint is not bool and isinstance(value, bool)):
        raise ParamsError(f"{key} must be {hint.__name__}, got {value!r}")
    return float(value) if hint is float else value
