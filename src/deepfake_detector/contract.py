"""The stage contract: for each stage, the params it reads and the paths it reads and writes.

This is the one declaration that ``dvc.yaml``, ``MLproject`` and the Kubeflow components follow;
``tests/test_contract.py`` checks each of them against it, computes each stage's code dependencies
from its imports, and runs every stage on params that fail on any key outside its list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deepfake_detector.params import Params, ParamsError, flatten, from_flat


@dataclass(frozen=True)
class Stage:
    """One stage: its module in :mod:`deepfake_detector.stages` (whose ``run`` does it) and what it
    reads and writes."""

    name: str
    params: tuple[str, ...]  # top-level keys or sections and dotted keys, as dvc.yaml lists them
    inputs: tuple[str, ...] = ()  # data paths as dvc.yaml names them; code dependencies come from imports
    outputs: tuple[str, ...] = ()


# Of `mlflow`, train and evaluate read where to log; evaluate and register, where to register.
_TRACKING = ("mlflow.enabled", "mlflow.tracking_uri", "mlflow.experiment")
_REGISTRY = ("mlflow.model_name", "mlflow.alias", "mlflow.register_min_auc")

DOWNLOAD = Stage("download", ("data", "download"), outputs=("data/raw",))
# Twins of every real face, split as preprocess splits them (its split_ratios); a marker alone when
# twins.enabled is false, so the graph is the same either way.
TWINS = Stage("twins", ("seed", "twins", "preprocess.split_ratios"), ("data/raw",), ("data/twins",))
PREPROCESS = Stage("preprocess", ("seed", "preprocess"), ("data/raw", "data/twins"), ("data/processed",))
TRAIN = Stage("train", ("seed", "model", "train", *_TRACKING), ("data/processed",),
              ("models/model.pt", "models/model.onnx", "models/run.json", "models/train.json", "models/history.csv"))
EVALUATE = Stage(
    "evaluate", ("seed", "evaluate", *_TRACKING, *_REGISTRY),
    ("data/processed", "models/model.pt", "models/model.onnx", "models/run.json", "models/history.csv"),
    ("eval/model_card.md", "eval/detector.json", "models/detector.json", "eval/metrics.json", "eval/plots/predictions.csv",
     "eval/plots/roc.json", "eval/plots/pr.json", "eval/plots/calibration.json", "eval/plots/robustness.json",
     "eval/plots/per_source.json", "eval/plots/images"))
# A Kubeflow step of its own; under DVC and MLproject the evaluate stage registers. It reads the
# decision settings and model card that evaluate wrote, and no param of another stage.
REGISTER = Stage("register", ("mlflow.enabled", "mlflow.tracking_uri", *_REGISTRY),
                 ("models/model.pt", "models/model.onnx", "models/run.json", "eval/metrics.json", "eval/detector.json",
                  "eval/model_card.md"))

PIPELINE = (DOWNLOAD, TWINS, PREPROCESS, TRAIN, EVALUATE)  # the stages of dvc.yaml and MLproject, in order
STAGES = {stage.name: stage for stage in (*PIPELINE, REGISTER)}


def param_name(key: str) -> str:
    """A dotted key as a Kubeflow or MLproject parameter, which allow no dots: ``train.epochs`` -> ``train_epochs``."""
    return key.replace(".", "_")


def param_value(value: Any) -> Any:
    """A param's value as a Kubeflow parameter: lists as comma-separated text ("16,32,64"), since KFP
    hands list items inside a dict over as unescaped JSON, which breaks on strings; Params reads the
    text back."""
    return ",".join(map(str, value)) if isinstance(value, list) else value


def stage_params(params: Params, stage: str) -> dict[str, Any]:
    """The flat params (dotted keys, as :func:`flatten` names them) that ``stage`` reads, and no others."""
    names = STAGES[stage].params
    return {key: value for key, value in flatten(params).items()
            if any(key == name or key.startswith(f"{name}.") for name in names)}


def from_stage_params(stage: str, flat: dict[str, Any]) -> Params:
    """:class:`Params` from exactly ``stage``'s flat params; the keys it does not read keep their defaults.

    A missing or extra key is an error: a missing one would silently take its default.
    """
    expected = set(stage_params(Params(), stage))
    missing, extra = sorted(expected - set(flat)), sorted(set(flat) - expected)
    if missing or extra:
        raise ParamsError(f"params of stage {stage}: missing {', '.join(missing) or 'none'}; "
                          f"not read by it {', '.join(extra) or 'none'}")
    return from_flat(flat, partial=True)
