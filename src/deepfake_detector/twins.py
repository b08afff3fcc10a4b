"""A fake family made without a generator: real faces re-synthesised by a small autoencoder.

AutoGAN (Zhang, Karaman and Chang, WIFS 2019) trains a detector on real images against their own
reconstructions through a generator-like up-sampling decoder: the pair shows the same face, so the only
thing to learn is what synthesis does to pixels, not content. With ``model.spectrum`` these twins fit
the spectrum branch (docs/experiments.md: unseen Stable Diffusion faces found at test AUC 0.92).

The autoencoder is fit on the train reals of every source in ``data/raw``; every real of every split
is then passed through it at its own size (it is fully convolutional, so no resampling adds a trace
the real lacks) and saved as JPEG into ``<out>/<split>/fake/<source>.<name>.jpg``, the split of the
real it came from, as preprocess lists it: a face and its twin never straddle splits.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from deepfake_detector.atomic import replacing_dir
from deepfake_detector.data import SPLITS, DataError
from deepfake_detector.params import TwinsParams, to_dict
from deepfake_detector.preprocess import decode_image, raw_sources
from deepfake_detector.sources import TWINS_FILE, Entry, list_images, twin_name

OUTPUTS = (*SPLITS, TWINS_FILE)  # all a run writes into its output folder


def up(c_in: int, c_out: int, how: str) -> nn.Module:
    """One 2x up-sampling stage as generators build it: a transposed convolution (checkerboard) or bilinear + conv."""
    if how == "transposed":
        return nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1)
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                         nn.Conv2d(c_in, c_out, 3, padding=1))


def autoencoder(latent: int, how: str, stages: int) -> nn.Sequential:
    """``stages`` stride-2 convolutions down to ``latent`` channels, as many up-sampling stages back."""
    widths = [3, *(32, 64)[:stages - 1], latent]
    layers: list[nn.Module] = []
    for c_in, c_out in zip(widths, widths[1:]):
        layers += [nn.Conv2d(c_in, c_out, 4, 2, 1), nn.ReLU()]
    back = widths[::-1]
    for c_in, c_out in zip(back, back[1:]):
        layers += [up(c_in, c_out, how), nn.ReLU()]
    layers[-1] = nn.Sigmoid()
    return nn.Sequential(*layers)


def reconstruct(net: nn.Module, x: torch.Tensor, stages: int) -> torch.Tensor:
    """``net`` on images ``x`` (N, 3, H, W in [0, 1]) of any size: padded by reflection to a multiple of
    2^stages at the bottom and right, and the output cropped back to H x W."""
    h, w = x.shape[-2:]
    pad = (0, -w % 2 ** stages, 0, -h % 2 ** stages)
    return net(F.pad(x, pad, mode="reflect") if any(pad) else x)[..., :h, :w]


def _batches(shapes: Sequence[tuple[int, int]], size: int, gen: torch.Generator) -> Iterator[list[int]]:
    """One epoch of shuffled batches of ``size`` indices, each of images fed at one shape: images are
    taken in one random order and a batch is complete when ``size`` of its shape are in (one shape: the
    permutation cut in order)."""
    pending: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i in torch.randperm(len(shapes), generator=gen).tolist():
        batch = pending[shapes[i]]
        batch.append(i)
        if len(batch) == size:
            yield pending.pop(shapes[i])
    yield from pending.values()


def _crop(image: torch.Tensor, shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """A random ``shape`` window of ``image`` (3, H, W); the image itself when it is that shape."""
    h, w = image.shape[-2:]
    if (h, w) == shape:
        return image
    top, left = (int(torch.randint(full - part + 1, (), generator=gen)) for full, part in zip((h, w), shape))
    return image[:, top:top + shape[0], left:left + shape[1]]


def fit(images: Sequence[torch.Tensor], params: TwinsParams, seed: int, device: torch.device,
        on_epoch: Callable[[int, float], None] | None = None, batch_size: int = 16) -> nn.Module:
    """The autoencoder fit by L1 on ``images`` (uint8 (3, H, W), any sizes), or on a random
    ``params.crop`` square of each per step, with horizontal flips and Adam at ``params.lr``, cosine to
    zero; ``on_epoch(epoch, mean L1 in 0-255)`` after each epoch."""
    torch.manual_seed(seed)
    net = autoencoder(params.latent, params.upsample, params.stages).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=params.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, params.epochs)
    gen = torch.Generator().manual_seed(seed)
    shapes = [tuple(min(side, params.crop or side) for side in image.shape[-2:]) for image in images]
    for epoch in range(params.epochs):
        total = 0.0
        for batch in _batches(shapes, batch_size, gen):
            x = torch.stack([_crop(images[i], shapes[i], gen) for i in batch]).float() / 255
            x = torch.where(torch.rand(len(x), 1, 1, 1, generator=gen) < 0.5, x.flip(-1), x).to(device)
            loss = (reconstruct(net, x, params.stages) - x).abs().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(x)
        sched.step()
        if on_epoch:
            on_epoch(epoch + 1, total / len(images) * 255)
    return net.eval()


def twin(net: nn.Module, image: np.ndarray, stages: int, device: torch.device) -> np.ndarray:
    """The reconstruction of one RGB uint8 image (H, W, 3), as uint8 of the same shape."""
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float().to(device) / 255
    with torch.inference_mode():
        y = reconstruct(net, x, stages)
    return (y[0] * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def _decoded(entries: Sequence[tuple[str, Entry]]) -> Iterator[tuple[str, Entry, np.ndarray | None]]:
    """Each (source, entry) with its RGB pixels, None for a file that does not decode (preprocess
    quarantines that real, so it needs no twin)."""
    for source, entry in entries:
        try:
            image = np.array(decode_image(entry.path)[0])
        except ValueError:
            image = None
        yield source, entry, image


def run(raw_dir: Path, out_dir: Path, params: TwinsParams, split_ratios: tuple[float, float, float], seed: int,
        device: torch.device, on_epoch: Callable[[int, float], None] | None = None) -> dict:
    """Make the twins of every real face in ``raw_dir`` into ``out_dir`` when ``params.enabled``, and
    ``twins.json``, the record of what was done (all it holds when disabled); returns the record.

    ``split_ratios`` (preprocess's) split unsplit sources exactly as preprocess will. The record holds
    no timing, so a rerun on the CPU writes the same bytes. ``out_dir`` is replaced only once complete.
    """
    with replacing_dir(Path(out_dir), OUTPUTS) as staging, _one_thread(device):
        record = _make(Path(raw_dir), staging, params, split_ratios, seed, device, on_epoch) if params.enabled \
            else {"enabled": False}
        (staging / TWINS_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


@contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """Torch on one CPU thread inside the block (as before it, after). The net's operations are too
    small to gain much from more, and on 2 cores shared with another job 2 threads made each step 20-40x
    slower (docs/experiments.md, the twins stage). The twins then depend on no core count either."""
    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _make(raw_dir: Path, out: Path, params: TwinsParams, split_ratios: tuple[float, float, float], seed: int,
          device: torch.device, on_epoch: Callable[[int, float], None] | None) -> dict:
    reals = [(name, e) for name, root in raw_sources(raw_dir).items()
             for e in list_images(root, split_ratios) if e.label == 0]
    train = [torch.from_numpy(image).permute(2, 0, 1)
             for _, e, image in _decoded([r for r in reals if r[1].split == SPLITS[0]]) if image is not None]
    if not train:
        raise DataError(f"twins.enabled, but no train split of {raw_dir} has a readable real image to fit on")
    net = fit(train, params, seed, device, on_epoch)
    del train  # the decoded train reals: their memory back before the pass over every real
    counts: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(SPLITS, 0))
    errors: dict[str, list[float]] = {split: [] for split in SPLITS}
    unreadable = 0
    for split in SPLITS:
        (out / split / "fake").mkdir(parents=True)
    for source, entry, image in _decoded(reals):
        if image is None:
            unreadable += 1
            continue
        fake = twin(net, image, params.stages, device)
        Image.fromarray(fake).save(out / entry.split / "fake" / twin_name(source, entry.path.name),
                                   quality=params.quality)
        counts[source][entry.split] += 1
        errors[entry.split].append(float(np.abs(fake.astype(np.int16) - image).mean()))
    return {"enabled": True, "params": to_dict(params), "seed": seed, "split_ratios": list(split_ratios),
            "device": str(device), "twins": dict(counts), "unreadable": unreadable,
            "l1_per_split": {split: round(float(np.mean(e)), 3) if e else None for split, e in errors.items()}}
