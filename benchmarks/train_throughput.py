"""Training throughput: does the data path keep the model busy?

For each device (the CPU, and CUDA when present), model (our CNN and torchvision's resnet18) and
setting (bf16 autocast on and off where the device has it; on CUDA torch.compile on and off) it
times training steps three ways, in one process so the figures are comparable:

- ``real``: the training loop's own path: a memory-mapped uint8 split (written to a temporary
  ``images.npy`` like preprocess writes) through :class:`deepfake_detector.batches.Batches`
  (resident on the GPU when it fits, else prefetched), converted to float on the device;
- ``real+aug``: the same plus online augmentation (flips, crops, and blur, noise and JPEG on a
  fifth of the images each);
- ``synthetic``: the same model and step on one fixed device-resident float batch of the dtype and
  layout the real path hands the model, so no data movement at all.

``real / synthetic`` near 1 means reading and converting data costs (almost) nothing. It prints a
table, plus the time of one epoch over 100k images at the measured rate. Needs torch, torchvision,
numpy and this package (no MLflow or DVC), so it also runs on a bare GPU machine:

    python benchmarks/train_throughput.py                    # 128 px, CPU (+ CUDA when present)
    python benchmarks/train_throughput.py --size 256 --images 4096 --devices cuda
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from deepfake_detector.batches import Batches, resident_choice  # noqa: E402
from deepfake_detector.distributed import SINGLE  # noqa: E402
from deepfake_detector.model import build_model  # noqa: E402
from deepfake_detector.augment import draw  # noqa: E402
from deepfake_detector.params import (AugmentParams, BlurParams, JpegParams, ModelParams, NoiseParams,  # noqa: E402
                                      TrainParams)
from deepfake_detector.train import Trainer, cpu_has_bf16, epoch_batches, prepare_batch, train_step  # noqa: E402

# Every kind of augmentation, each on a fifth of the images (the defaults keep blur, noise and JPEG off).
AUGMENT = AugmentParams(blur=BlurParams(prob=0.2), noise=NoiseParams(prob=0.2), jpeg=JpegParams(prob=0.2))


def build(arch: str, size: int) -> nn.Module:
    return build_model(ModelParams(arch=arch), size, pretrained="none")


def timed(trainer: Trainer, net: nn.Module, batches, plan: dict | None, images: int) -> float:
    """Images per second over ``batches`` (an iterable of (uint8 images, labels, indices) or float
    inputs); ``plan`` augments the uint8 ones."""
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)
    start = time.perf_counter()
    loss_fn = nn.CrossEntropyLoss()
    net.train()
    for x, y, idx in batches:
        if x.dtype == torch.uint8:
            x = prepare_batch(trainer, x, {k: v[idx] for k, v in plan.items()} if plan else None)
        train_step(trainer, net, x, y, loss_fn)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)
    return images / (time.perf_counter() - start)


def measure(arch: str, device: torch.device, precision: str, compile_: bool, images: np.ndarray,
            labels: np.ndarray, batch_size: int, warmup: int, repeats: int) -> dict:
    params = TrainParams(batch_size=batch_size, precision=precision, compile=compile_, augment=AUGMENT)
    order = torch.randperm(len(images))
    batches = epoch_batches(order, batch_size, SINGLE)
    trainer = Trainer(build(arch, images.shape[1]), params, device, seed=0, world=SINGLE, steps_per_epoch=len(batches))
    net = torch.compile(trainer.model) if compile_ else trainer.model
    data = Batches(images, labels, device, resident_choice("auto", images.nbytes, device))
    plan = draw(params.augment, len(images), trainer.generator)

    def real(augmented: bool):
        reads = data.iterate(batches, jpeg_quality=plan["jpeg"] if augmented else None)
        return ((x, y, idx) for idx, (x, y) in zip(batches, reads))

    # Warm-up: cudnn autotuning, compilation, allocator; then the timed passes.
    timed(trainer, net, ((x, y, i) for i, (x, y) in zip(batches[:warmup], data.iterate(batches[:warmup]))),
          plan, warmup * batch_size)
    n = len(batches) * batch_size
    x, y = next(iter(data.iterate(batches[:1])))
    fixed = prepare_batch(trainer, x, None), y, None
    ways = {"real": lambda: timed(trainer, net, real(False), None, n),
            "real+aug": lambda: timed(trainer, net, real(True), plan, n),
            "synthetic": lambda: timed(trainer, net, [fixed] * len(batches), None, n)}
    # The ways take turns, `repeats` rounds, and each reports its median: a slow moment of a noisy
    # machine then hits all of them alike instead of one.
    rates: dict[str, list[float]] = {way: [] for way in ways}
    for _ in range(repeats):
        for way, run in ways.items():
            rates[way].append(run())
    return {"resident": data.resident, "dtype": trainer.precision,
            **{way: float(np.median(r)) for way, r in rates.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, nargs="+", default=[128], help="image sizes (px)")
    parser.add_argument("--images", type=int, default=1024, help="images per timed pass")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds; the median is reported")
    parser.add_argument("--archs", nargs="+", default=["cnn", "resnet18"])
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"], help="cuda is skipped when absent")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [torch.device(d) for d in args.devices if d != "cuda" or torch.cuda.is_available()]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no CUDA"))
    print(f"{'device':>6} {'arch':>9} {'px':>4} {'dtype':>8} {'compile':>7} {'resident':>8} "
          f"{'real':>9} {'real+aug':>9} {'synthetic':>9} {'ratio':>6} {'aug ratio':>9} {'100k epoch':>10}")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.size:
            # A memory-mapped split, as preprocess writes it and training reads it.
            path = Path(tmp) / f"images-{size}.npy"
            array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(args.images, size, size, 3))
            array[:] = rng.integers(0, 256, array.shape, dtype=np.uint8)
            array.flush()
            images = np.load(path, mmap_mode="r")
            labels = rng.integers(0, 2, args.images)
            for device in devices:
                # Autocast on and off (on a CPU only where it has bf16 instructions); compile on CUDA only.
                if device.type == "cpu":
                    settings = [(p, False) for p in (("bf16", "fp32") if cpu_has_bf16() else ("fp32",))]
                else:
                    settings = [(p, c) for p in ("auto", "fp32") for c in (False, True)]
                for arch in args.archs:
                    for precision, compile_ in settings:
                        r = measure(arch, device, precision, compile_, images, labels, args.batch_size, args.warmup,
                                    args.repeats)
                        print(f"{device.type:>6} {arch:>9} {size:>4} {r['dtype']:>8} "
                              f"{'on' if compile_ else 'off':>7} {'yes' if r['resident'] else 'no':>8} "
                              f"{r['real']:9.1f} {r['real+aug']:9.1f} {r['synthetic']:9.1f} "
                              f"{r['real'] / r['synthetic']:6.3f} {r['real+aug'] / r['synthetic']:9.3f} "
                              f"{100_000 / r['real']:9.0f}s", flush=True)


if __name__ == "__main__":
    main()
