"""A fake family made without a generator: real faces re-synthesised by a small autoencoder.

AutoGAN (Zhang, Karaman and Chang, WIFS 2019) trains a detector on real images against their own
reconstructions through a generator-like up-sampling decoder: the pair shows the same face, so the only
thing to learn is what synthesis does to pixels, not content. Here it is a third fake source for the
leave-one-source-out check of issue #23, so each left-out fit trains on two kinds of fake.

The autoencoder is fit on the source's train reals only; every real of every split is then passed through
it and saved like faces-sd (JPEG quality 75, 4:2:0) as ``<out>/<split>/fake/<name>.jpg``, the split of
the real it came from, so a face and its twin never straddle splits.

    .venv/bin/python benchmarks/resynth.py --source ../shared/data/faces-mini --out build/resynth \\
        [--upsample transposed|bilinear] [--stages 1] [--latent 32] [--epochs 100] [--lr 3e-3] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from deepfake_detector.data import SPLITS  # noqa: E402
from deepfake_detector.params import PreprocessParams  # noqa: E402
from deepfake_detector.preprocess import load_image  # noqa: E402
from deepfake_detector.sources import list_images  # noqa: E402


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


def reals(source: Path, size: int) -> dict[str, tuple[list[str], torch.Tensor]]:
    """Per split, the real images' file names and pixels as uint8 (N, 3, size, size)."""
    # Listed once, as preprocess lists it: an unsplit source is split by file hash at the default ratios.
    listed = list_images(source, PreprocessParams().split_ratios)
    out = {}
    for split in SPLITS:
        entries = [e for e in listed if e.split == split and e.label == 0]
        images = [load_image(e.path, size, min_source_size=size)[0] for e in entries]
        out[split] = ([e.path.name for e in entries], torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2))
    return out


def fit(images: torch.Tensor, latent: int, how: str, stages: int, epochs: int, lr: float, seed: int,
        batch: int = 16) -> nn.Module:
    """The autoencoder fit by L1 on ``images`` (uint8), with horizontal flips; prints the loss per epoch."""
    torch.manual_seed(seed)
    net = autoencoder(latent, how, stages)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        order, total = torch.randperm(len(images), generator=gen), 0.0
        for i in range(0, len(images), batch):
            x = images[order[i:i + batch]].float() / 255
            x = torch.where(torch.rand(len(x), 1, 1, 1, generator=gen) < 0.5, x.flip(-1), x)
            loss = (net(x) - x).abs().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(x)
        sched.step()
        print(f"epoch {epoch + 1}/{epochs}: L1 {total / len(images) * 255:.2f} (0-255)", flush=True)
    return net.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, required=True, help="a source with real faces (split or unsplit)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--upsample", choices=["transposed", "bilinear"], default="transposed")
    # The defaults are the "faithful" twins of docs/experiments.md (mean error 4.8 of 255); 3 stages, 64
    # channels and 30 epochs at 1e-3 made blurred twins (8.3), which taught a wrong cue.
    parser.add_argument("--stages", type=int, default=1, choices=[1, 2, 3],
                        help="stride-2 stages: the decoder rebuilds each 2^stages square from one latent vector")
    parser.add_argument("--latent", type=int, default=32,
                        help="latent channels (3 stages, 64: 6x fewer numbers than pixels; 1 stage, 32: 2.7x more)")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam's learning rate, cosine to zero")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--quality", type=int, default=75)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.size % 2 ** args.stages:
        parser.error(f"--size must be a multiple of {2 ** args.stages}")
    start = time.perf_counter()
    data = reals(args.source, args.size)
    net = fit(data["train"][1], args.latent, args.upsample, args.stages, args.epochs, args.lr, args.seed)
    errors = {}
    with torch.inference_mode():
        for split, (names, images) in data.items():
            folder = args.out / split / "fake"
            folder.mkdir(parents=True, exist_ok=True)
            err = []
            for i in range(0, len(images), 32):
                x = images[i:i + 32].float() / 255
                y = (net(x) * 255).round().clamp(0, 255).to(torch.uint8)
                err.append((y.float() - images[i:i + 32].float()).abs().mean((1, 2, 3)))
                for name, pixels in zip(names[i:i + 32], y.permute(0, 2, 3, 1).numpy()):
                    Image.fromarray(pixels).save(folder / f"{Path(name).stem}.jpg", quality=args.quality)
            errors[split] = round(float(torch.cat(err).mean()), 2)
    recipe = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    (args.out / "resynth.json").write_text(json.dumps({**recipe, "l1_per_split": errors,
                                                       "seconds": round(time.perf_counter() - start, 1)}, indent=1))
    print(f"{sum(len(n) for n, _ in data.values())} reconstructions in {args.out}; mean |error| (0-255) {errors}; "
          f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
