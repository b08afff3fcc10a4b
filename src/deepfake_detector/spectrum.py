"""A second opinion from the image's amplitude spectrum (``model.spectrum``), beside the CNN.

Generators leave energy in the top octave of the spectrum (up-sampling, Durall et al., CVPR 2020), and
there a linear model fit on some fake families finds others that it never saw (docs/experiments.md:
fit on StyleGAN and autoencoder twins of the real faces, unseen Stable Diffusion faces at valid AUC
0.91-0.96), where the fine-tuned CNN scores them below chance. So after training, a logistic regression
is fit on the train split's ring-averaged log amplitude spectrum (the upper half of radii) and the
model calls an image fake when either branch does: its fake log-odds are the larger of the CNN's and
the branch's, the latter shifted and scaled so that the valid real faces score alike on both.

The spectrum is computed in the model (a DFT as matrix products, which ONNX exports), on the same
prepared input as the CNN, so every scorer (evaluate, predict, serving, the app, ONNX) gets it. Its
constant matrices are rebuilt from the input size, never saved: 11 MB at 224 px (the ring matrix,
size² x size/4, grows as the cube of the size).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

# Ridge strength of the logistic regression: the held-out figure in docs/experiments.md is flat from
# C 0.01 to 1; the strongest (0.01) was best on valid for two of three sources.
SPECTRUM_C = 0.01
GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as Pillow's convert("L")


def ring_matrix(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (size², rings) 0/1 matrix picking each pixel of the unshifted 2D spectrum into its ring
    (integer radius in cycles per image), for the rings from size/4 to size/2 (the upper half of
    radii up to Nyquist; the corners beyond are left out); and each ring's pixel count."""
    freq = torch.fft.fftfreq(size, 1 / size)  # 0, 1, ..., -1 cycles per image
    radius = torch.hypot(freq[:, None], freq[None, :]).long().flatten()
    rings = torch.arange(size // 4, size // 2)
    member = (radius[:, None] == rings[None, :]).float()
    return member, member.sum(0)


class SpectrumBranch(nn.Module):
    """Log-odds of 'fake' from the image's ring-averaged log amplitude spectrum; until :func:`fit`
    sets its weights, it hands on the CNN's logits unchanged (a post-training head: :mod:`~deepfake_detector.heads`)."""

    def __init__(self, image_size: int) -> None:
        super().__init__()
        angle = 2 * math.pi * torch.outer(torch.arange(image_size), torch.arange(image_size)).double() / image_size
        member, count = ring_matrix(image_size)
        # Not saved: rebuilt from the image size, so a checkpoint carries only the fitted weights.
        self.register_buffer("cos", torch.cos(angle).float(), persistent=False)
        self.register_buffer("sin", torch.sin(angle).float(), persistent=False)
        self.register_buffer("rings", member / count, persistent=False)
        self.register_buffer("grey", torch.tensor(GREY).view(1, 3, 1, 1), persistent=False)
        rings = member.shape[1]
        self.register_buffer("mean", torch.zeros(rings))  # standardisation of the features, then
        self.register_buffer("scale", torch.ones(rings))  # the regression's weights
        self.register_buffer("weight", torch.zeros(rings))
        self.register_buffer("bias", torch.zeros(()))
        # The range of the mean standardised feature over the train images: outside it (a blurred,
        # rescaled or noisy photo) the regression would extrapolate, so the branch abstains.
        self.register_buffer("low", torch.zeros(()))
        self.register_buffer("high", torch.zeros(()))
        # score -> CNN log-odds scale: gain * score + shift. -inf until fitted, so the CNN's logits win.
        self.register_buffer("gain", torch.zeros(()))
        self.register_buffer("shift", torch.tensor(float("-inf")))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, rings) log1p of the mean amplitude per ring of the grey image (0-255) of ``x`` (N, 3, S, S) in [0, 1]."""
        with torch.autocast(x.device.type, enabled=False):  # fp16 would overflow: amplitudes reach ~1e7
            g = (x.float() * self.grey).sum(1) * 255
            gc, gs = g @ self.cos, g @ self.sin
            real = self.cos @ gc - self.sin @ gs
            imag = self.sin @ gc + self.cos @ gs  # the imaginary part's sign does not change the amplitude
            amplitude = torch.sqrt(real.square() + imag.square()).flatten(1)
            return torch.log1p(amplitude @ self.rings)

    def score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The regression's log-odds of 'fake' for each image of ``x``, and whether its spectrum lies
        in the range the regression was fit on."""
        z = (self.features(x) - self.mean) / self.scale
        level = z.mean(1)
        return z @ self.weight + self.bias, (level >= self.low) & (level <= self.high)

    def forward(self, x: torch.Tensor, out: dict) -> dict[str, torch.Tensor]:
        """The (real, fake) logits whose fake log-odds are the larger of the CNN's (``out["logits"]``)
        and the branch's (the CNN's alone where the branch abstains)."""
        logits = out["logits"]
        cnn = (logits[:, 1] - logits[:, 0]).float()
        score, known = self.score(x)
        odds = torch.where(known, torch.maximum(cnn, self.gain * score + self.shift), cnn)
        return {"logits": torch.stack([logits[:, 0].float(), logits[:, 0].float() + odds], 1).to(logits.dtype)}


def fit(branch: SpectrumBranch, features: np.ndarray, labels: np.ndarray) -> float:
    """Fit the regression of ``branch`` on the train images' :meth:`~SpectrumBranch.features` and
    ``labels``; returns its train AUC."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(features)
    z = scaler.transform(features)
    # Balanced: with several sources the classes are unequal, and the regression must not learn the prior.
    clf = LogisticRegression(C=SPECTRUM_C, class_weight="balanced", max_iter=5000).fit(z, labels)
    level = z.mean(1)
    for buffer, value in ((branch.mean, scaler.mean_), (branch.scale, scaler.scale_), (branch.weight, clf.coef_[0]),
                          (branch.bias, clf.intercept_[0]), (branch.low, level.min()), (branch.high, level.max())):
        buffer.copy_(torch.as_tensor(value, dtype=torch.float32))
    return float(roc_auc_score(labels, clf.decision_function(z)))


def align(branch: SpectrumBranch, cnn_odds: np.ndarray, scores: np.ndarray) -> None:
    """Map the branch's scores onto the CNN's log-odds scale: the CNN's ``cnn_odds`` and the branch's
    ``scores`` of the same (valid real) images get one mean and spread."""
    if scores.std() > 0:  # else the branch is a constant, and its shift stays -inf: it never wins
        gain = cnn_odds.std() / scores.std()
        branch.gain.fill_(float(gain))
        branch.shift.fill_(float(cnn_odds.mean() - gain * scores.mean()))
