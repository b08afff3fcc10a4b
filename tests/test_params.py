"""params.yaml maps onto frozen dataclasses; bad keys fail loudly (which stage reads which: test_contract.py)."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from conftest import ROOT

from deepfake_detector.params import (
    ARCHS,
    PRECISIONS,
    BlurParams,
    DownloadParams,
    EvaluateParams,
    JpegParams,
    ModelParams,
    Params,
    ParamsError,
    TrainParams,
    flatten,
    from_flat,
    load_params,
    to_dict,
    with_overrides,
)


def test_params_yaml_loads_and_matches_defaults():
    params = load_params(ROOT / "params.yaml")
    assert isinstance(params, Params)
    # The file is the documented source of truth; the dataclass defaults must not drift from it.
    assert params == Params()
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.train.epochs = 1  # type: ignore[misc]


def test_unknown_key_is_named(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train"]["lr_rate"] = 0.1
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match=r"train\.lr_rate"):
        load_params(path)


@pytest.mark.parametrize("key, value, message", [
    ("epochs", "ten", r"train\.epochs must be int"),
    ("epochs", True, r"train\.epochs must be int"),
    ("channels_last", "maybe", r"train\.channels_last must be bool"),
    ("precision", "half", r"train\.precision must be one of auto, bf16, fp16, fp32, got 'half'"),
    ("monitor", "f1", r"train\.monitor must be one of auc, accuracy, loss, got 'f1'"),
    ("monitor", 3, r"train\.monitor must be str, got 3"),
    ("monitor_window", 0, r"train\.monitor_window must be at least 1, got 0"),
    ("ema_epochs", -1.0, r"train\.ema_epochs must be at least 0, got -1\.0"),
])
def test_mistyped_value_is_named(tmp_path, key, value, message):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train"][key] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match=message):
        load_params(path)


def test_missing_key_and_missing_file(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    del raw["evaluate"]["threshold"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match=r"missing parameter: evaluate\.threshold"):
        load_params(path)
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")


def test_overrides_parse_yaml_values_and_reject_unknown_keys():
    params = with_overrides(Params(), ["train.lr=1e-3", "model.channels=[8, 16]", "preprocess.blur.prob=0"])
    assert params.train.lr == 0.001
    assert params.model.channels == (8, 16)
    assert params.preprocess.blur.prob == 0.0
    for bad in ("train.nope=1", "nope.lr=1", "train.lr", "train.epochs="):
        with pytest.raises(ParamsError):
            with_overrides(Params(), [bad])
    # Probabilities are checked where they are read, with their full key.
    for bad, key in (("train.augment.mixup=1.5", "train.augment.mixup"), ("train.augment.hflip=-0.1", "hflip"),
                     ("preprocess.blur.prob=2", r"preprocess\.blur\.prob"), ("train.augment.jpeg.prob=-1", "jpeg")):
        with pytest.raises(ParamsError, match=f"{key}.* must be between 0 and 1"):
            with_overrides(Params(), [bad])
    assert with_overrides(Params(), ["train.augment.mixup=1"]).train.augment.mixup == 1.0
    # An empty value is an empty string (YAML alone reads null), as MLproject passes `data.sha256=`.
    assert with_overrides(Params(), ["data.sha256="]).data.sha256 == ""


def test_flatten_names_leaves_with_dots():
    flat = flatten({"seed": 1, "train": Params().train, "preprocess": {"blur": {"prob": 0.5}}})
    assert flat["seed"] == 1 and flat["train.lr"] == 0.001 and flat["preprocess.blur.prob"] == 0.5
    assert "train" not in flat


def test_from_flat_round_trips_flatten():
    params = with_overrides(Params(), ["train.epochs=3", "model.channels=[4]"])
    assert from_flat(flatten(params)) == params
    with pytest.raises(ParamsError, match="missing parameter"):
        from_flat({"seed": 1})
    assert from_flat({"seed": 1, "train.epochs": 3}, partial=True) == with_overrides(Params(seed=1), ["train.epochs=3"])


def test_to_dict_is_plain_yaml_data():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert to_dict(Params()) == raw  # lists, not tuples, at every depth


def test_text_values_are_read_as_yaml():
    """KFP hands every parameter over as text; typed fields parse it, string fields keep it."""
    flat = {k: str(v) if not isinstance(v, list) else ",".join(map(str, v)) for k, v in flatten(Params()).items()}
    flat |= {"train.epochs": "3.0", "train.channels_last": "false", "model.channels": "[8.0, 16.0]", "data.sha256": "",
             "preprocess.splits": "train,valid", "data.source": "123"}
    params = from_flat(flat)
    assert params.train.epochs == 3 and params.train.channels_last is False and params.model.channels == (8, 16)
    assert params.preprocess.splits == ("train", "valid") and params.data.source == "123"
    assert params.data.sha256 == "" and params.preprocess.blur.sigma == Params().preprocess.blur.sigma


# Each declared check (a Literal choice, a minimum, a probability), named by its full key whichever way the value came.
BAD = [
    ("train.monitor", "'f1'", r"train\.monitor must be one of auc, accuracy, loss, got 'f1'"),
    ("train.scheduler", "'step'", r"train\.scheduler must be one of cosine, constant, got 'step'"),
    ("train.data_on_device", "'sometimes'", r"train\.data_on_device must be one of auto, true, false, got 'sometimes'"),
    ("evaluate.threshold_rule", "'f1'", r"evaluate\.threshold_rule must be one of eer, max_accuracy, .*, got 'f1'"),
    ("model.arch", "'vgg'", r"model\.arch must be one of cnn, resnet18, .*, got 'vgg'"),
    ("model.familiar_features", "'layers'", r"model\.familiar_features must be one of joint, stages, embedding, got 'layers'"),
    ("train.epochs", "0", r"train\.epochs must be at least 1, got 0"),
    ("train.batch_size", "-1", r"train\.batch_size must be at least 1, got -1"),
    ("train.monitor_window", "0", r"train\.monitor_window must be at least 1, got 0"),
    ("train.ema_epochs", "-0.5", r"train\.ema_epochs must be at least 0, got -0\.5"),
    ("download.max_bytes", "0", r"download\.max_bytes must be more than 0, got 0"),
    ("download.max_entries", "0", r"download\.max_entries must be more than 0, got 0"),
    ("download.max_ratio", "-1", r"download\.max_ratio must be more than 0, got -1\.0"),
    ("train.augment.blur.prob", "1.5", r"train\.augment\.blur\.prob must be between 0 and 1, got 1\.5"),
    ("preprocess.noise.prob", "-0.1", r"preprocess\.noise\.prob must be between 0 and 1, got -0\.1"),
]


@pytest.mark.parametrize("key, value, message", BAD)
def test_declared_checks_name_the_key_from_a_file(tmp_path, key, value, message):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node[part]
    node[leaf] = yaml.safe_load(value)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match=message):
        load_params(path)


@pytest.mark.parametrize("key, value, message", BAD)
def test_declared_checks_name_the_key_from_an_override(key, value, message):
    with pytest.raises(ParamsError, match=message):
        with_overrides(Params(), [f"{key}={value}"])
    with pytest.raises(ParamsError, match=message):  # as KFP hands them over: text
        from_flat({key: value.strip("'")}, partial=True)


def test_declared_checks_run_in_python_too():
    """Code and tests build params directly (and with dataclasses.replace): the same checks, the same keys."""
    for build, message in (
        (lambda: TrainParams(monitor="f1"), r"train\.monitor must be one of auc, accuracy, loss, got 'f1'"),
        (lambda: TrainParams(precision="half"), r"train\.precision must be one of auto, bf16, fp16, fp32"),
        (lambda: TrainParams(data_on_device=True), r"train\.data_on_device must be one of auto, true, false, got True"),
        (lambda: EvaluateParams(threshold_rule="f1"), r"evaluate\.threshold_rule must be one of"),
        (lambda: ModelParams(arch="vgg"), r"model\.arch must be one of cnn, "),
        (lambda: ModelParams(familiar_features="layers"), r"model\.familiar_features must be one of joint, stages, embedding"),
        (lambda: TrainParams(epochs=0), r"train\.epochs must be at least 1, got 0"),
        (lambda: dataclasses.replace(Params().train, monitor_window=0), r"train\.monitor_window must be at least 1"),
        (lambda: DownloadParams(max_ratio=0), r"download\.max_ratio must be more than 0, got 0"),
        (lambda: JpegParams(prob=2.0), r"train\.augment\.jpeg\.prob must be between 0 and 1, got 2\.0"),
        # BlurParams sits at preprocess.blur and train.augment.blur: built alone, it goes by its class name.
        (lambda: BlurParams(prob=-1.0), r"BlurParams\.prob must be between 0 and 1, got -1\.0"),
    ):
        with pytest.raises(ParamsError, match=message):
            build()
    assert TrainParams(epochs=1, ema_epochs=0.0, precision="bf16").precision == "bf16"  # the bounds are allowed


def test_choices_are_declared_once():
    assert PRECISIONS == ("auto", "bf16", "fp16", "fp32")
    assert ARCHS[0] == "cnn" and Params().model.arch in ARCHS and len(set(ARCHS)) == len(ARCHS) == 9
    # YAML's `true` (or KFP's text "false") for a text switch is the text, as params.yaml documents it.
    assert from_flat({"train.data_on_device": True}, partial=True).train.data_on_device == "true"
    assert from_flat({"train.data_on_device": "false"}, partial=True).train.data_on_device == "false"
