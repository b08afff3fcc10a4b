"""Train the detector on preprocessed splits: the epoch loop, resumable checkpoints, one or many processes.

Modelled on torchvision's classification references: :func:`train_one_epoch` and :func:`validate`
around a loop that writes a full checkpoint (model, optimizer, scheduler, scaler, history, best
weights, RNG states) at the end of every epoch, and mid-epoch when a signal asks it to stop.
Every random draw (shuffle, flips) comes from one generator on the main thread, so a run resumed
from a checkpoint ends with the same weights as one never stopped (bit-identical on the CPU).
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from deepfake_detector import augment, distributed
from deepfake_detector.atomic import write_text as atomic_write_text
from deepfake_detector.batches import Batches, resident_choice
from deepfake_detector.checkpoint import CheckpointStore
from deepfake_detector.distributed import SINGLE, World
from deepfake_detector.errors import Stopped, UserError
from deepfake_detector.heads import attach, fit_heads
from deepfake_detector.metrics import compute_metrics, per_fake_source
from deepfake_detector.model import build_model, save_checkpoint, to_input
from deepfake_detector.params import ModelParams, TrainParams, to_dict
from deepfake_detector.preprocess import load_split, read_index

EpochCallback = Callable[[int, dict[str, float]], None]
# Params that change how fast training runs, never what it computes: a checkpoint made with other
# values of these is still resumed (e.g. a preempted GPU run continued on another node).
SPEED_ONLY = ("device", "data_on_device", "compile")


def run_config(seed: int, model: ModelParams, params: TrainParams, data: dict[str, str]) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the params that shape the result, and the data."""
    train = {k: v for k, v in to_dict(params).items() if k not in SPEED_ONLY}
    return {"seed": seed, "model": to_dict(model), "train": train, "data": data}


def lr_factor(params: TrainParams, total_steps: int, step: int) -> float:
    """The learning rate at optimiser step ``step`` as a share of ``train.lr``: a linear warm-up over
    ``train.warmup_epochs``, then constant or a cosine decay to zero (which settles the weights
    late in training, where the best epoch is picked)."""
    warmup = round(params.warmup_epochs * total_steps / params.epochs)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if params.scheduler == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))


def ema_decay(time_constant_epochs: float, steps_per_epoch: int) -> float:
    """The per-step decay of a moving average whose time constant is that many epochs: the same
    average whatever the dataset and batch size."""
    return math.exp(-1.0 / (time_constant_epochs * steps_per_epoch))


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 instructions; oneDNN emulates bf16 on others, slower than fp32."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype ``train.precision`` asks for on ``device``; None: full precision.

    ``auto`` is bf16 on GPUs that support it (no loss scaling needed), fp16 on older GPUs, and fp32
    on CPUs: there bf16 speeds the small CNN up 1.6x but gained little and lost valid AUC
    fine-tuning Lite0 (README, "Devices and speed").
    """
    cuda = device.type == "cuda"
    if precision == "fp32" or (precision == "auto" and not cuda):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp16":
        if not cuda:
            raise UserError("train.precision fp16 needs a CUDA device; on a CPU use bf16 or fp32")
        return torch.float16
    if cuda and not torch.cuda.is_bf16_supported():
        raise UserError("train.precision bf16: this GPU does not support bf16; use auto (fp16) or fp32")
    if not cuda and not cpu_has_bf16():
        raise UserError("train.precision bf16 on a CPU needs bf16 instructions (AVX512-BF16 or AMX), "
                        "which this one lacks (emulated bf16 is slower than fp32); use fp32")
    return torch.bfloat16


class StopRequest(threading.Event):
    """Set by a signal handler; ``signum`` says which signal."""

    signum: int = signal.SIGTERM


@contextmanager
def stop_requests() -> Iterator[StopRequest]:
    """SIGTERM and SIGINT set the returned event: the loop checkpoints and stops at the next step.

    A second Ctrl-C interrupts at once. Outside the main thread (signals cannot be caught there)
    the event is never set.
    """
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: object) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.signum = signum
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@dataclass
class Position:
    """Where training stands: the next epoch and step, and the running sums of the epoch under way."""

    epoch: int = 1
    step: int = 0
    order: torch.Tensor | None = None  # this epoch's shuffled indices, once drawn
    plan: dict[str, torch.Tensor] = field(default_factory=dict)  # this epoch's augmentation, per image
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # loss_sum, correct, seen


def seed_everything(seed: int, world: World = SINGLE) -> None:
    """Seed the global generators (weight init, dropout); dropout masks differ per rank."""
    torch.manual_seed(seed + world.rank)
    random.seed(seed)
    np.random.seed(seed)


class Trainer:
    """Model, optimizer and everything else a checkpoint holds, for one training run.

    ``model`` takes float NCHW input in [0, 1] and returns two logits (real, fake). ``class_weights``
    weight the loss per class, ``image_weights`` (CPU, one per training image) per image instead.
    """

    def __init__(self, model: nn.Module, params: TrainParams, device: torch.device, seed: int, world: World,
                 steps_per_epoch: int, class_weights: torch.Tensor | None = None,
                 image_weights: torch.Tensor | None = None) -> None:
        self.params, self.device, self.world = params, device, world
        self.class_weights, self.image_weights = class_weights, image_weights
        self.steps_per_epoch = steps_per_epoch
        self.model = model.to(device)
        if params.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # Weight decay on weights only: decaying norm scales and biases only hurts (torchvision's references).
        decay = [p for p in self.model.parameters() if p.ndim > 1]
        no_decay = [p for p in self.model.parameters() if p.ndim <= 1]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": params.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=params.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, partial(lr_factor, params, steps_per_epoch * params.epochs))
        self.warmup_steps = round(params.warmup_epochs * steps_per_epoch)
        # Buffers too (BatchNorm statistics), as torchvision's references average them.
        self.ema = None if params.ema_epochs == 0 else AveragedModel(
            self.model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay(params.ema_epochs, steps_per_epoch)),
            use_buffers=True)
        self.dtype = autocast_dtype(device, params.precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.generator = torch.Generator().manual_seed(seed)
        self.position = Position()
        self.history: list[dict[str, float]] = []
        self.best: dict[str, float] | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.seconds = 0.0  # training time before this process, from the checkpoint

    @property
    def precision(self) -> str:
        """The dtype training steps run in: bfloat16, float16 or float32."""
        return str(self.dtype or torch.float32).removeprefix("torch.")

    @property
    def evaluated(self) -> nn.Module:
        """The weights that are validated and saved: the moving average if there is one."""
        return self.model if self.ema is None else self.ema.module

    def update_ema(self) -> None:
        """After an optimiser step: the average follows the weights through the warm-up (whose
        early weights are no use to average, as torchvision restarts it), then averages them."""
        if self.ema is not None:
            if self.scheduler.last_epoch <= self.warmup_steps:
                self.ema.n_averaged.zero_()  # the next update copies the weights
            self.ema.update_parameters(self.model)

    def state(self) -> dict[str, Any]:
        """The checkpoint: everything needed to go on exactly where training stands."""
        rng = distributed.gather(_local_rng(self.device), self.world)
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "generator": self.generator.get_state(), "rng": rng,
                "ema": None if self.ema is None else self.ema.state_dict(),
                "python_rng": random.getstate(), "numpy_rng": _numpy_rng_state(),
                "position": {"epoch": self.position.epoch, "step": self.position.step,
                             "order": self.position.order, "plan": self.position.plan,
                             "sums": {k: v.cpu() for k, v in self.position.sums.items()}},
                "history": self.history, "best": self.best, "best_state": self.best_state,
                "seconds": self.seconds}

    def load(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.generator.set_state(state["generator"])
        # Saved by a run with the same number of processes: each rank gets its own streams back.
        rng = state["rng"][self.world.rank] if len(state["rng"]) == self.world.size else state["rng"][0]
        torch.set_rng_state(rng["torch"])
        if self.device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        random.setstate(state["python_rng"])
        n = state["numpy_rng"]
        np.random.set_state(("MT19937", np.array(n["key"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
        pos = state["position"]
        self.position = Position(pos["epoch"], pos["step"], pos["order"], pos["plan"],
                                 {k: v.to(self.device) for k, v in pos["sums"].items()})
        self.history, self.best, self.best_state = state["history"], state["best"], state["best_state"]
        self.seconds = state["seconds"]


def fit(processed_dir: Path, out_dir: Path, model_params: ModelParams, params: TrainParams,
        device: torch.device, seed: int, on_epoch: EpochCallback | None = None, progress: bool = True,
        store: CheckpointStore | None = None, resume: dict[str, Any] | None = None,
        world: World = SINGLE, extra_state: dict[str, Any] | None = None, min_source_size: int = 1,
        image_fit: str = "resize") -> dict:
    """Train for ``params.epochs``; rank 0 writes ``model.pt`` (best epoch), ``history.csv`` and
    ``train.json`` to ``out_dir``.

    ``store`` receives a checkpoint at the end of every epoch (with ``extra_state``, e.g. the MLflow
    run id) and when SIGTERM/SIGINT arrives, which then raises :class:`Stopped`; ``resume`` (a
    checkpoint from it) continues that run. ``on_epoch(epoch, metrics)`` is called on rank 0 before
    each epoch's checkpoint (tracking hooks in here). ``min_source_size`` (the data's) is saved in
    ``model.pt`` for scorers of a model that has no decision settings yet, and ``image_fit``
    (``preprocess.fit``) so that every scorer fits images as the training data was. Returns the best epoch's
    metrics and the time.
    """
    out_dir = Path(out_dir)
    all_train, all_valid = load_split(processed_dir, "train"), load_split(processed_dir, "valid")
    train_x, train_y, train_sources = cnn_rows(processed_dir, "train", *all_train, model_params)
    valid_x, valid_y, valid_sources = cnn_rows(processed_dir, "valid", *all_valid, model_params)
    # With several sources of fakes, each one's valid AUC (its fakes against all reals) is logged per epoch.
    several = len({s for s, y in zip(valid_sources, valid_y) if y == 1}) > 1
    if len(train_x) == 0 or len(valid_x) == 0:
        raise UserError(f"{processed_dir}: train and valid splits need images "
                        f"(have {len(train_x)} and {len(valid_x)})")
    if params.batch_size < world.size:
        raise UserError(f"train.batch_size {params.batch_size} is smaller than the {world.size} processes")
    if device.type == "cuda":
        # TF32 matmuls and convolutions: full-range fp32 at tensor-core speed; cudnn picks the fastest kernels.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    seed_everything(seed, world)
    steps = len(epoch_batches(torch.arange(len(train_x)), params.batch_size, world))
    trainer = Trainer(build_model(model_params, train_x.shape[1]), params, device, seed, world, steps,
                      class_weights(train_y, params.balance, device),
                      source_weights(train_y, train_sources, params.balance))
    if resume is not None:
        trainer.load(resume)
    net: nn.Module = trainer.model
    if world.distributed:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)
    if params.compile:
        net = torch.compile(net)
    resident = resident_choice(params.data_on_device, train_x.nbytes + valid_x.nbytes, device)
    train_data = Batches(train_x, train_y, device, resident)
    valid_data = Batches(valid_x, valid_y, device, resident)
    sign = -1.0 if params.monitor == "loss" else 1.0
    monitored = {"auc": "valid_auc", "accuracy": "valid_accuracy", "loss": "valid_loss"}[params.monitor]
    extra = extra_state or {}
    with stop_requests() as stop:
        while trainer.position.epoch <= params.epochs:
            epoch = trainer.position.epoch
            started = time.perf_counter()
            # The schedule's rate at the epoch's first step, not the optimizer's now: a run resumed
            # mid-epoch logs what an uninterrupted one does.
            lr = params.lr * lr_factor(params, trainer.steps_per_epoch * params.epochs,
                                       (epoch - 1) * trainer.steps_per_epoch)
            finished = train_one_epoch(trainer, net, train_data, stop, progress)
            if not finished:
                trainer.seconds += time.perf_counter() - started
                state = trainer.state()
                if world.main and store is not None:
                    store.save({**state, **extra}, epoch, trainer.position.step)
                raise Stopped(stop.signum)
            sums = _reduce_sums(trainer.position.sums, world)
            distributed.sync_buffers(trainer.evaluated, world)
            p_valid = validate(trainer.evaluated, valid_data, params.batch_size * 2, world, params.channels_last)
            valid = compute_metrics(valid_y, p_valid)
            by_source = per_fake_source(valid_y, p_valid, valid_sources, 0.5) if several else {}
            trainer.seconds += time.perf_counter() - started
            row = {"epoch": epoch, "train_loss": sums["loss_sum"] / sums["seen"],
                   "train_accuracy": sums["correct"] / sums["seen"], "valid_loss": valid["log_loss"],
                   "valid_accuracy": valid["accuracy"], "valid_auc": valid["roc_auc"],
                   **{f"valid_auc.{name}": m["roc_auc"] for name, m in by_source.items()}, "lr": lr,
                   "epoch_seconds": time.perf_counter() - started}
            trainer.history.append(row)
            score = sign * monitor_score(trainer.history, monitored, params.monitor_window)
            if trainer.best is None or score > trainer.best["score"]:  # NaN AUC (one-class valid) never wins
                trainer.best = {"score": score, **row}
                trainer.best_state = {k: v.detach().to("cpu", copy=True)
                                      for k, v in trainer.evaluated.state_dict().items()}
            trainer.position = Position(epoch + 1)
            state = trainer.state()  # collective (RNG states of every rank): all ranks take part
            if world.main:
                if on_epoch:
                    on_epoch(epoch, {k: v for k, v in row.items() if k != "epoch"})
                if store is not None:
                    store.save({**state, **extra}, epoch)
                # One line per epoch, printed once its checkpoint is on disk (CI and `dvc repro` logs).
                tqdm.write(f"epoch {epoch}: train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.3f} | "
                           f"valid loss {row['valid_loss']:.4f} acc {row['valid_accuracy']:.3f} "
                           f"auc {row['valid_auc']:.3f} | {row['epoch_seconds']:.1f}s")
    best = trainer.best
    summary = {"best_epoch": best["epoch"], "best_valid_loss": best["valid_loss"],
               "best_valid_accuracy": best["valid_accuracy"], "best_valid_auc": best["valid_auc"],
               "train_seconds": trainer.seconds, "device": str(device), "processes": world.size,
               "data_on_device": resident, "precision": trainer.precision}
    if world.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        valid_at_best = {"roc_auc": best["valid_auc"], "accuracy": best["valid_accuracy"],
                         "log_loss": best["valid_loss"]}
        if model_params.spectrum or model_params.familiarity != "none":
            # The heads join the best epoch's network: fit on train, calibrated on valid (every source).
            trainer.model.load_state_dict(trainer.best_state)
            fitted = fit_heads(attach(trainer.model), (*all_train, split_sources(processed_dir, "train")),
                               (*all_valid, split_sources(processed_dir, "valid")), device, params.batch_size * 2,
                               seed)
            summary.update(fitted)
            trainer.best_state = {k: v.to("cpu", copy=True) for k, v in trainer.model.state_dict().items()}
            if "spectrum" in fitted:
                tqdm.write(f"spectrum branch: train auc {fitted['spectrum']['train_auc']:.3f} | "
                           f"valid auc {fitted['spectrum']['valid_auc']:.3f}")
            if "familiarity" in fitted:
                tqdm.write(f"familiarity head ({model_params.familiarity}): flags "
                           f"{fitted['familiarity']['valid_flagged']:.3f} of the valid images")
        save_checkpoint(trainer.model, out_dir / "model.pt", state_dict=trainer.best_state,
                        epoch=best["epoch"], valid=valid_at_best, min_source_size=min_source_size,
                        fit=image_fit)
        atomic_write_text(out_dir / "history.csv", _history_csv(trainer.history))
        atomic_write_text(out_dir / "train.json", json.dumps(summary, indent=2) + "\n")
    return summary


def cnn_rows(processed_dir: Path, split: str, images: np.ndarray, labels: np.ndarray, model: ModelParams
             ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images, labels and sources of the ``split`` rows the CNN trains or validates on: all but the fakes
    of ``model.spectrum_only`` (then copied into memory; otherwise the memory map itself)."""
    sources = split_sources(processed_dir, split)
    if not model.spectrum_only:
        return images, labels, sources
    if not model.spectrum:
        raise UserError("model.spectrum_only names sources for the spectrum branch: set model.spectrum true")
    named = set(json.loads((Path(processed_dir) / "meta.json").read_text()).get("sources") or sources)
    unknown = sorted(set(model.spectrum_only) - named)
    if unknown:
        raise UserError(f"model.spectrum_only: no source named {', '.join(unknown)} in the data "
                        f"(its sources: {', '.join(sorted(named))})")
    keep = np.flatnonzero(~(np.isin(sources, model.spectrum_only) & (labels == 1)))
    if not (labels[keep] == 1).any():
        raise UserError(f"model.spectrum_only leaves the CNN no fake {split} images: keep one fake source for it")
    return images[keep], labels[keep], [sources[i] for i in keep]


def split_sources(processed_dir: Path, split: str) -> list[str]:
    """The source of each image of a preprocessed split, in order."""
    return [row["source"] for row in read_index(processed_dir, split)[1]]


def prepared_as(meta: dict) -> dict[str, Any]:
    """:func:`fit`'s ``min_source_size`` and ``image_fit`` from the preprocessed data's ``meta.json``."""
    return {"min_source_size": meta["params"]["min_source_size"], "image_fit": meta["params"].get("fit", "resize")}


def class_weights(labels: np.ndarray, balance: str, device: torch.device) -> torch.Tensor | None:
    """Loss weights n / (2 n_class) that make real and fake count alike (``train.balance: auto``);
    None (a plain mean) when the classes are already equal or balance is not ``auto``."""
    counts = np.bincount(labels, minlength=2)
    if balance != "auto" or counts[0] == counts[1] or not counts.all():
        return None
    return torch.tensor(len(labels) / (2 * counts), dtype=torch.float32, device=device)


def source_weights(labels: np.ndarray, sources: list[str], balance: str) -> torch.Tensor | None:
    """Per-image loss weights n / (2 k_class n_group) (``train.balance: sources``): each class counts
    half and, within it, each of its k_class sources alike, so a small second source of reals is not
    drowned by a large one. None (a plain mean) when they are all equal or balance is not ``sources``."""
    if balance != "sources":
        return None
    groups = list(zip(np.asarray(labels).tolist(), sources))
    size = Counter(groups)
    per_class = Counter(label for label, _ in size)  # sources of each class
    weights = np.array([len(groups) / (2 * per_class[label] * size[label, source]) for label, source in groups])
    return None if np.all(weights == weights[0]) else torch.tensor(weights, dtype=torch.float32)


def monitor_score(history: list[dict[str, float]], key: str, window: int) -> float:
    """The mean of ``key`` over the last ``window`` epochs of ``history`` (fewer in the first ones):
    the figure that picks the best checkpoint. NaN (AUC of a one-class valid split) stays NaN."""
    return math.fsum(row[key] for row in history[-window:]) / len(history[-window:])


def epoch_batches(order: torch.Tensor, batch_size: int, world: World) -> list[torch.Tensor]:
    """This rank's batches of one epoch's shuffled ``order``, each sorted (sequential memmap reads).

    Under DDP step i of rank r takes every ``world.size``-th index of the global batch i, so the
    ranks together train on the same global batches as one process does; the tail that does not
    split evenly is dropped so every rank takes the same number of steps.
    """
    if world.distributed:
        usable = len(order) - len(order) % world.size
        order = order[:usable]
        batch_size //= world.size
        order = order[world.rank::world.size]
    return [order[i:i + batch_size].sort().values for i in range(0, len(order), batch_size)]


def train_one_epoch(trainer: Trainer, net: nn.Module, data: Batches, stop: StopRequest,
                    progress: bool) -> bool:
    """Train from ``trainer.position`` to the end of its epoch; False if stopped by a signal first.

    The loss and accuracy sums stay on the device: no host synchronisation per step.
    """
    params, device, pos, world = trainer.params, trainer.device, trainer.position, trainer.world
    if pos.order is None:
        pos.order = torch.randperm(len(data), generator=trainer.generator)
        pos.plan = augment.draw(params.augment, len(data), trainer.generator)
        pos.step = 0
        pos.sums = {"loss_sum": torch.zeros((), device=device), "correct": torch.zeros((), device=device,
                    dtype=torch.int64), "seen": torch.zeros((), device=device, dtype=torch.int64)}
    batches = epoch_batches(pos.order, params.batch_size, world)
    weighted = trainer.image_weights is not None
    loss_fn = nn.CrossEntropyLoss(weight=trainer.class_weights, label_smoothing=params.label_smoothing,
                                  reduction="none" if weighted else "mean")
    net.train()
    bar = tqdm(total=len(batches), initial=pos.step, desc=f"epoch {pos.epoch}/{params.epochs}",
               disable=not progress or not world.main, unit="batch", leave=False)
    with bar:
        todo = batches[pos.step:]
        for idx, (x, y) in zip(todo, data.iterate(todo, jpeg_quality=pos.plan["jpeg"])):
            if distributed.any_rank(stop.is_set(), world, device):
                return False
            plan = {k: v[idx] for k, v in pos.plan.items()}
            inputs, target = augment.mix(prepare_batch(trainer, x, plan), y, plan.get("mix"))
            batch_loss = partial(weighted_mean, loss_fn, batch_weights(trainer, idx, plan)) if weighted else loss_fn
            loss, logits = train_step(trainer, net, inputs, target, batch_loss)  # accuracy: each image's own label
            pos.sums["loss_sum"] += loss.detach() * len(y)
            pos.sums["correct"] += (logits.argmax(1) == y).sum()
            pos.sums["seen"] += len(y)
            pos.step += 1
            bar.update()
    return True


def batch_weights(trainer: Trainer, idx: torch.Tensor, plan: augment.Plan) -> torch.Tensor:
    """The per-image loss weights of the batch ``idx`` on the device; a MixUp blend weighs as its two
    images do, in their shares (paired as :func:`augment.mix` pairs them)."""
    weights = trainer.image_weights[idx]
    if "mix" in plan:
        weights = weights.roll(1, 0).lerp(weights, plan["mix"].to(weights.dtype))
    return weights.to(trainer.device, non_blocking=True)


def weighted_mean(per_image: nn.Module, weights: torch.Tensor, logits: torch.Tensor,
                  target: torch.Tensor) -> torch.Tensor:
    """sum(w l) / sum(w) of the per-image losses: the mean that CrossEntropyLoss takes under class weights."""
    return (weights * per_image(logits, target)).sum() / weights.sum()


def prepare_batch(trainer: Trainer, images: torch.Tensor, plan: augment.Plan | None) -> torch.Tensor:
    """uint8 NHWC images on the device to the model's float input, augmented per ``plan`` (this
    batch's rows of the epoch's plan; None: as they are)."""
    x = to_input(images)
    if plan is not None:
        x = augment.apply(x, plan)
    return x.contiguous(memory_format=torch.channels_last if trainer.params.channels_last else torch.contiguous_format)


def train_step(trainer: Trainer, net: nn.Module, x: torch.Tensor, y: torch.Tensor,
               loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on a prepared batch with class indices or (MixUp's) soft targets ``y``;
    returns the loss and logits (still on the device)."""
    with torch.autocast(trainer.device.type, dtype=trainer.dtype, enabled=trainer.dtype is not None):
        logits = net(x)
    loss = loss_fn(logits.float(), y)
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.scaler.scale(loss).backward()
    trainer.scaler.step(trainer.optimizer)
    trainer.scaler.update()
    trainer.scheduler.step()
    trainer.update_ema()
    return loss, logits


@torch.no_grad()
def validate(model: nn.Module, data: Batches, batch_size: int, world: World, channels_last: bool = True) -> np.ndarray:
    """P(fake) of every image of ``data``, in order, in full precision (as torchvision's references
    evaluate, and as the evaluate stage scores): the figures that pick the best epoch are those it
    reproduces. Under DDP each rank scores every ``world.size``-th image and all gather, so the
    result equals one process's (no padding)."""
    model.eval()
    mine = torch.arange(world.rank, len(data), world.size)
    out = []
    for x, _ in data.iterate([mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]):
        x = to_input(x).contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        out.append(torch.softmax(model(x).float(), dim=1)[:, 1])
    p_fake = torch.cat(out).cpu().numpy() if out else np.zeros(0, dtype=np.float32)
    if not world.distributed:
        return p_fake
    full = np.empty(len(data), dtype=np.float32)
    for idx, part in distributed.gather((mine.numpy(), p_fake), world):
        full[idx] = part
    return full


def _reduce_sums(sums: dict[str, torch.Tensor], world: World) -> dict[str, float]:
    """The epoch's loss and accuracy sums over every rank, read from the device once."""
    local = {k: float(v.item()) for k, v in sums.items()}
    return {k: sum(part[k] for part in distributed.gather(local, world)) for k in local}


def _local_rng(device: torch.device) -> dict[str, torch.Tensor | None]:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _numpy_rng_state() -> dict[str, Any]:
    _, key, pos, has_gauss, gauss = np.random.get_state()
    return {"key": key.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)}


def _history_csv(history: list[dict]) -> str:
    buffer = io.StringIO()
    # Every row's keys: a run resumed from a checkpoint of an older version may lack the newer columns.
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(k for row in history for k in row)), restval="")
    writer.writeheader()
    writer.writerows(history)
    return buffer.getvalue()
