"""The training data path: uint8 batches of a memory-mapped split, on the training device.

Two ways, one interface (:meth:`Batches.iterate` over lists of indices, in order):

- **resident**: the whole split is copied to the device once and batches are gathered there, so
  a GPU never waits on the host (used when it fits ``train.data_on_device``'s budget);
- **prefetch**: a background thread gathers each batch from the memory map into pinned memory
  and starts its copy to the device on a side stream, a few batches ahead, so reading overlaps
  compute.

Both hand the model the same uint8 NHWC tensors (conversion to float, normalisation and
augmentation happen on the device, in the training loop), so the choice changes speed, never
results. No random draw happens here: indices come from the caller's generator on the main thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from deepfake_detector import augment

PREFETCH = 3  # batches read ahead: enough to hide a slow read, little memory
DEVICE_BUDGET = 0.5  # share of the free device memory a resident split may take (auto)
CHUNK = 2048  # images per host-to-device copy when loading a split resident


def fits_on_device(nbytes: int, device: torch.device) -> bool:
    """Whether ``nbytes`` fits the device-memory budget; on the CPU the memory map stays on disk."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= DEVICE_BUDGET * free


def resident_choice(setting: str, nbytes: int, device: torch.device) -> bool:
    """``train.data_on_device``: ``true``/``false``, or ``auto`` (the budget decides)."""
    return fits_on_device(nbytes, device) if setting == "auto" else setting == "true"


class Batches:
    """uint8 (B, S, S, 3) images and int64 labels of one split, on ``device``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, device: torch.device, resident: bool) -> None:
        self.images, self.device, self.resident = images, device, resident
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        if resident:
            self.on_device = torch.empty(images.shape, dtype=torch.uint8, device=device)
            for start in range(0, len(images), CHUNK):
                chunk = torch.from_numpy(np.array(images[start:start + CHUNK]))  # a writable copy of the map
                self.on_device[start:start + len(chunk)].copy_(chunk)
            self.labels = self.labels.to(device)

    def __len__(self) -> int:
        return len(self.images)

    def iterate(self, index_batches: Sequence[torch.Tensor], jpeg_quality: torch.Tensor | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, labels) on the device for each tensor of indices, in the given order; images whose
        ``jpeg_quality`` (per image index) is above 0 are JPEG re-compressed on the CPU first."""
        if self.resident:
            for idx in index_batches:
                x = self.on_device[idx.to(self.device, non_blocking=True)]
                if jpeg_quality is not None and bool((jpeg_quality[idx] > 0).any()):
                    x = augment.jpeg(x.cpu(), jpeg_quality[idx]).to(self.device)
                yield x, self.labels[idx.to(self.device, non_blocking=True)]
        else:
            yield from _prefetched(self, index_batches, jpeg_quality)

    def host_batch(self, idx: torch.Tensor,
                   jpeg_quality: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch read from the memory map into host memory (pinned when a GPU will take it)."""
        # Sorted indices read the memory map front to back; the order inside a batch does not matter
        # to the loss, and the resident path sorts the same way, so both give the same batches.
        x = torch.from_numpy(np.take(self.images, idx.numpy(), axis=0))
        if jpeg_quality is not None:
            x = augment.jpeg(x, jpeg_quality[idx])
        y = self.labels[idx]
        if self.device.type == "cuda":
            x, y = x.pin_memory(), y.pin_memory()
        return x, y


def _prefetched(source: Batches, index_batches: Sequence[torch.Tensor], jpeg_quality: torch.Tensor | None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Read and copy batches in a background thread, ``PREFETCH`` ahead of the consumer."""
    cuda = source.device.type == "cuda"
    stream = torch.cuda.Stream(source.device) if cuda else None
    ready: queue.Queue = queue.Queue(maxsize=PREFETCH)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for idx in index_batches:
                if stop.is_set():
                    return
                x, y = source.host_batch(idx, jpeg_quality)
                event = None
                if cuda:
                    with torch.cuda.stream(stream):
                        x, y = x.to(source.device, non_blocking=True), y.to(source.device, non_blocking=True)
                        event = torch.cuda.Event()
                        event.record(stream)
                ready.put((x, y, event))
            ready.put(done)
        except BaseException as exc:  # handed to the consumer, which re-raises it on its thread
            ready.put(exc)

    worker = threading.Thread(target=produce, name="batch-prefetch", daemon=True)
    worker.start()
    try:
        while (item := ready.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            x, y, event = item
            if event is not None:
                # Compute waits for this batch's copy only; the allocator must not reuse its memory
                # for the side stream until compute is done with it.
                current = torch.cuda.current_stream(source.device)
                current.wait_event(event)
                x.record_stream(current)
                y.record_stream(current)
            yield x, y
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            try:
                ready.get(timeout=0.05)
            except queue.Empty:
                pass
        worker.join()
