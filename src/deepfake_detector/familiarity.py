"""The familiarity head (``model.familiarity``): whether an image is like the faces the model learned from.

A detector answers every image with a P(fake), also one unlike anything in its training data (a
generator family it never saw, a camera it never saw), and there it is often confidently wrong. This
head, fit after training on the network's own features of the train split (each stage's mean-pooled
output, ``model.familiar_features``), gives each image an *unfamiliarity*: its distance to the train
images, divided by the distance that the set share ``model.unfamiliar_share`` of the valid images
reaches. At 1 or more the image is flagged: "unlike the faces this model was trained on".

Two density models, measured in docs/experiments.md:
- ``mahalanobis`` (Lee et al., NeurIPS 2018): a Gaussian per group (class, or class and source)
  with one shared covariance (Ledoit-Wolf shrunk: a feature vector has more dimensions than some
  sets have images); the distance is the smallest squared Mahalanobis distance to a group mean.
- ``knn`` (Sun et al., ICML 2022): the distance from the L2-normalised vector to its k-th nearest
  neighbour among (at most :data:`BANK_SIZE`) normalised train vectors.

Both are tensor arithmetic in ``forward`` (matrix products, a top-k), so the ONNX export carries the
head as the graph's second output and ONNX Runtime scores it without torch. Nothing here imports the
network: :mod:`~deepfake_detector.heads` fits it on the features the network gives.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

KINDS = ("mahalanobis", "knn")
FEATURES = ("joint", "stages", "embedding")
BANK_SIZE = 4096  # knn: train embeddings kept (a random subset beyond it): 21 MB at 1280 dimensions
K = 10  # knn: the neighbour whose distance counts (Sun et al. use 1-50; 10 of a few thousand)


class Density(nn.Module):
    """One density model of one feature vector: the distance of a row to the train rows, and the
    distance (``scale``) that the set share of the valid rows reach."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"familiarity kind must be one of {', '.join(KINDS)}, got {kind!r}")
        self.kind = kind
        # Shaped by fit (and by a checkpoint on load): (groups, d) and (d, d) for mahalanobis, (n, d) for knn.
        self.register_buffer("means", torch.zeros(0, 0))
        self.register_buffer("precision", torch.zeros(0, 0))
        self.register_buffer("bank", torch.zeros(0, 0))
        self.register_buffer("scale", torch.tensor(float("inf")))

    def distance(self, e: torch.Tensor) -> torch.Tensor:
        """The distance of each row of ``e`` (N, d) to the train rows."""
        with torch.autocast(e.device.type, enabled=False):  # fp16 loses the small distances near train
            e = e.float()
            if self.kind == "mahalanobis":
                diff = e[:, None, :] - self.means[None]  # (N, groups, d)
                return ((diff @ self.precision) * diff).sum(-1).min(1).values
            e = nn.functional.normalize(e, dim=1)
            similarity = e @ self.bank.T  # both unit length: |a - b|² = 2 - 2 a·b
            kth = similarity.topk(min(K, self.bank.shape[0]), dim=1).values[:, -1]
            return torch.sqrt(torch.clamp(2 - 2 * kth, min=0))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # The fitted buffers' shapes depend on the data: take the checkpoint's before loading it.
        for name in ("means", "precision", "bank"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name], device=self.scale.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class FamiliarityHead(nn.Module):
    """Unfamiliarity of each image: the largest of its features' distances, each over its own flagging
    distance, over the flagging distance of that largest; until :func:`fit`, 0 (every image familiar).

    ``features``: the network's stage outputs, mean-pooled (low-level statistics a generator leaves
    that the last layer, trained to tell only the fakes it saw, discards), either ``joint`` (one
    :class:`Density` of all of them side by side, so that it sees how the stages move together) or
    ``stages`` (a :class:`Density` each, the largest distance counts: the feature ensemble of Lee et
    al.); or ``embedding`` (the last layer's input alone).
    """

    def __init__(self, kind: str, features: str = "joint") -> None:
        super().__init__()
        if features not in FEATURES:
            raise ValueError(f"familiarity features must be one of {', '.join(FEATURES)}, got {features!r}")
        Density(kind)  # checks the kind
        self.kind, self.features = kind, features
        self.parts = nn.ModuleList()  # a Density per feature vector, made by fit (and by a checkpoint on load)
        self.register_buffer("scale", torch.tensor(float("inf")))

    def vectors(self, out: dict) -> list[torch.Tensor]:
        """The feature vectors this head measures, of the network's outputs ``out``; the embedding for
        a network without stages (a CNN of one block, whose only block feeds the embedding)."""
        stages = list(out["stages"]) if self.features != "embedding" else []
        if self.features == "joint" and stages:
            return [torch.cat(stages, 1)]
        return stages or [out["embedding"]]

    def distance(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        """The largest of the vectors' distances, each over its part's flagging distance."""
        return torch.stack([part.distance(v) / part.scale for part, v in zip(self.parts, vectors)]).amax(0)

    def forward(self, x: torch.Tensor, out: dict) -> dict[str, torch.Tensor]:
        if not len(self.parts):  # not fitted
            return {"unfamiliarity": torch.zeros(len(x), device=x.device)}
        return {"unfamiliarity": self.distance(self.vectors(out)) / self.scale}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # The parts are made by fit: as many as the checkpoint holds (its children load after this).
        count = len({k[len(prefix) + 6:].split(".")[0] for k in state_dict if k.startswith(prefix + "parts.")})
        self.parts.extend(Density(self.kind).to(self.scale.device) for _ in range(count - len(self.parts)))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def fit(head: FamiliarityHead, vectors: list[np.ndarray], groups: np.ndarray, seed: int = 0) -> None:
    """Fit a part of ``head`` on each of the train ``vectors`` (N, d_i); ``groups`` (N,) names each
    row's Gaussian (mahalanobis; knn ignores it). The flagging distances are set by :func:`calibrate`."""
    head.parts = nn.ModuleList(Density(head.kind).to(head.scale.device) for _ in vectors)
    for part, v in zip(head.parts, vectors):
        e = np.asarray(v, dtype=np.float64)
        if part.kind == "mahalanobis":
            from sklearn.covariance import LedoitWolf

            names = np.unique(groups)
            means = np.stack([e[groups == g].mean(0) for g in names])
            centred = e - means[np.searchsorted(names, groups)]
            precision = LedoitWolf(assume_centered=True).fit(centred).precision_
            part.means, part.precision = (torch.as_tensor(a, dtype=torch.float32, device=part.scale.device)
                                          for a in (means, precision))
        else:
            rows = np.random.default_rng(seed).permutation(len(e))[:BANK_SIZE]
            bank = torch.as_tensor(e[np.sort(rows)], dtype=torch.float32, device=part.scale.device)
            part.bank = nn.functional.normalize(bank, dim=1)


@torch.inference_mode()
def calibrate(head: FamiliarityHead, vectors: list[np.ndarray], share: float) -> np.ndarray:
    """Set the flagging distances on the valid ``vectors``: each part's, then the whole head's, so that
    ``share`` of them are flagged; returns the valid images' unfamiliarity."""
    device = head.scale.device
    tensors = [torch.as_tensor(np.asarray(v), dtype=torch.float32, device=device) for v in vectors]
    for part, v in zip(head.parts, tensors):
        part.scale.fill_(flagging_distance(part.distance(v).cpu().numpy(), share))
    relative = head.distance(tensors).cpu().numpy()
    head.scale.fill_(flagging_distance(relative, share))
    return relative / float(head.scale)


def flagging_distance(distances: np.ndarray, share: float) -> float:
    """The distance that ``share`` of ``distances`` reach."""
    d = np.asarray(distances, dtype=np.float32)
    scale = np.float32(max(np.quantile(d, 1 - share), np.finfo(np.float32).tiny))  # zero would flag all as inf
    if np.mean(d >= scale) > share + 1 / len(d):  # tied distances (a constant embedding): flag only beyond them
        scale = np.nextafter(scale, np.float32(np.inf))
    return float(scale)
