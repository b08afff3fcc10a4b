"""Multi-process training under ``torchrun``: who this process is, and how to launch several.

``torchrun --nproc_per_node N -m deepfake_detector.cli train ...`` starts N copies of the train
stage; each reads its rank from the environment torchrun sets. Rank 0 alone logs, checkpoints
and writes outputs; gradients are all-reduced by DDP. One process (no torchrun) is world size 1
and needs no process group.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


SINGLE = World()


def from_env() -> World:
    """The world torchrun describes in ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; one process otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return SINGLE
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))


def init(world: World, device: torch.device) -> None:
    """Join the process group (NCCL on CUDA, gloo on CPU); nothing to do for one process."""
    if world.distributed and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device
                                if device.type == "cuda" else None)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast(value: Any, world: World) -> Any:
    """Rank 0's ``value`` on every rank (a picklable object, e.g. a resume checkpoint)."""
    if not world.distributed:
        return value
    box = [value if world.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any, world: World) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    if not world.distributed:
        return [value]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, value)
    return out


def any_rank(flag: bool, world: World, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on at least one (e.g. a stop signal)."""
    if not world.distributed:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def sync_buffers(model: torch.nn.Module, world: World) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank, as DDP does before each
    training forward, so that every rank validates the same model."""
    if world.distributed:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def train_command(nproc: int, params_file: Path, data: Path, out: Path, checkpoint_dir: Path | str | None = None,
                  overrides: Sequence[str] = ()) -> list[str]:
    """``deepfake train`` on this node under ``torchrun``, ``nproc`` processes (one per GPU)."""
    args = ["train", "--params", str(params_file), *[f"--set={o}" for o in overrides], "--data", str(data),
            "--out", str(out)]
    if checkpoint_dir:
        args += ["--checkpoint-dir", str(checkpoint_dir)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "deepfake_detector.cli", *args]
