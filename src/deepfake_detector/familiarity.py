"""The familiarity head (``model.familiarity``): whether an image is like the faces the model learned from.

A detector answers every image with a P(fake), also one unlike anything in its training data (a
generator family it never saw, a camera it never saw), and there it is often confidently wrong. This
head, fit after training on the network's own embedding (the input of its last linear layer) of the
train split, gives each image an *unfamiliarity*: its distance to the train embeddings, divided by
the distance that the set share ``model.unfamiliar_share`` of the valid images reaches. At 1 or
more the image is flagged: "unlike the faces this model was trained on".

Two density models, measured in docs/experiments.md:
- ``mahalanobis`` (Lee et al., NeurIPS 2018): a Gaussian per group (class, or class and source)
  with one shared covariance (Ledoit-Wolf shrunk: the embedding has more dimensions than some sets
  have images); the distance is the smallest squared Mahalanobis distance to a group mean.
- ``knn`` (Sun et al., ICML 2022): the distance from the L2-normalised embedding to its k-th
  nearest neighbour among (at most :data:`BANK_SIZE`) normalised train embeddings.

Both are tensor arithmetic in ``forward`` (matrix products, a top-k), so the ONNX export carries the
head as the graph's second output and ONNX Runtime scores it without torch. Nothing here imports the
network: :mod:`~deepfake_detector.heads` fits it on the embeddings the network gives.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

KINDS = ("mahalanobis", "knn")
BANK_SIZE = 4096  # knn: train embeddings kept (a random subset beyond it): 21 MB at 1280 dimensions
K = 10  # knn: the neighbour whose distance counts (Sun et al. use 1-50; 10 of a few thousand)


class FamiliarityHead(nn.Module):
    """Unfamiliarity of each embedding: its distance to the train embeddings over the flagging
    distance; until :func:`fit` sets it, 0 (every image familiar)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"familiarity kind must be one of {', '.join(KINDS)}, got {kind!r}")
        self.kind = kind
        # Shaped by fit (and by a checkpoint on load): (groups, d) and (d, d) for mahalanobis, (n, d) for knn.
        self.register_buffer("means", torch.zeros(0, 0))
        self.register_buffer("precision", torch.zeros(0, 0))
        self.register_buffer("bank", torch.zeros(0, 0))
        self.register_buffer("scale", torch.tensor(float("inf")))  # the flagging distance

    def distance(self, embedding: torch.Tensor) -> torch.Tensor:
        """The distance of each row of ``embedding`` (N, d) to the train embeddings."""
        with torch.autocast(embedding.device.type, enabled=False):  # fp16 loses the small distances near train
            return self._distance(embedding.float())

    def _distance(self, e: torch.Tensor) -> torch.Tensor:
        if self.kind == "mahalanobis":
            diff = e[:, None, :] - self.means[None]  # (N, groups, d)
            return ((diff @ self.precision) * diff).sum(-1).min(1).values
        e = nn.functional.normalize(e, dim=1)
        similarity = e @ self.bank.T  # both unit length: |a - b|² = 2 - 2 a·b
        kth = similarity.topk(min(K, self.bank.shape[0]), dim=1).values[:, -1]
        return torch.sqrt(torch.clamp(2 - 2 * kth, min=0))

    def forward(self, x: torch.Tensor, logits: torch.Tensor, embedding: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.bank.numel() and not self.means.numel():  # not fitted
            return {"unfamiliarity": torch.zeros(len(embedding), device=embedding.device)}
        return {"unfamiliarity": self.distance(embedding) / self.scale}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # The fitted buffers' shapes depend on the data: take the checkpoint's before loading it.
        for name in ("means", "precision", "bank"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name], device=self.scale.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def fit(head: FamiliarityHead, embeddings: np.ndarray, groups: np.ndarray, seed: int = 0) -> None:
    """Fit ``head`` on the train ``embeddings`` (N, d); ``groups`` (N,) names each row's Gaussian
    (mahalanobis; knn ignores it). The flagging distance is set by :func:`calibrate`."""
    e = np.asarray(embeddings, dtype=np.float64)
    if head.kind == "mahalanobis":
        from sklearn.covariance import LedoitWolf

        names = np.unique(groups)
        means = np.stack([e[groups == g].mean(0) for g in names])
        centred = e - means[np.searchsorted(names, groups)]
        precision = LedoitWolf(assume_centered=True).fit(centred).precision_
        head.means, head.precision = (torch.as_tensor(v, dtype=torch.float32, device=head.scale.device)
                                      for v in (means, precision))
    else:
        rows = np.random.default_rng(seed).permutation(len(e))[:BANK_SIZE]
        bank = torch.as_tensor(e[np.sort(rows)], dtype=torch.float32, device=head.scale.device)
        head.bank = nn.functional.normalize(bank, dim=1)


def calibrate(head: FamiliarityHead, distances: np.ndarray, share: float) -> float:
    """Set the flagging distance so that ``share`` of ``distances`` (the valid images') reach it; returns it."""
    d = np.asarray(distances, dtype=np.float32)
    scale = np.float32(max(np.quantile(d, 1 - share), np.finfo(np.float32).tiny))  # zero would flag all as inf
    if np.mean(d >= scale) > share + 1 / len(d):  # tied distances (a constant embedding): flag only beyond them
        scale = np.nextafter(scale, np.float32(np.inf))
    head.scale.fill_(float(scale))
    return float(scale)
