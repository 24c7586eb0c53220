"""Batches drawn by index from a split held on the training device, and the rule for when a split goes there.

A split is copied to the device once per process (uint8 or uint16, as cached) and stays there for every later epoch,
fold and trial of that process; on the CPU "copying" is a view of the in-memory array. Batches are then indexed
where they will be used: no loader processes, no pinned copies, no transfer per batch.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from classifier.data.dataset import CachedImages, SplitArrays

DEVICE_MEMORY_SHARE = 0.5  # `auto`: the splits go to a GPU when they take at most this share of its free memory
KEPT_SPLITS = 4  # splits kept on a device, as many as `load_split` keeps decoded
_RESIDENT: dict[tuple[int, str], tuple[SplitArrays, torch.Tensor, torch.Tensor]] = {}


def on_device(arrays: SplitArrays, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The split's images and labels as tensors on `device`, copied once per process."""
    key = resident_key(arrays, device)
    if key not in _RESIDENT:
        if len(_RESIDENT) >= KEPT_SPLITS:
            _RESIDENT.pop(next(iter(_RESIDENT)))
        with warnings.catch_warnings():  # a read-only memory map: never written through the tensor
            warnings.simplefilter("ignore", UserWarning)
            images = torch.from_numpy(arrays.images)
        if images.dtype == torch.uint16:  # index kernels take int16, the same bits
            images = images.view(torch.int16)
        _RESIDENT[key] = (arrays, images.to(device), torch.from_numpy(arrays.labels).to(device))
    return _RESIDENT[key][1:]


def is_on_device(arrays: SplitArrays, device: torch.device) -> bool:
    return resident_key(arrays, device) in _RESIDENT


def resident_key(arrays: SplitArrays, device: torch.device) -> tuple[int, str]:
    """A split's key among those held on devices (its entry keeps `arrays` alive, so the id stays its own)."""
    return id(arrays), str(device)


def fits_on_device(setting: str, splits: list[SplitArrays], device: torch.device) -> bool:
    """Whether training draws its batches from `splits` held on `device`: `true`, `false`, or `auto`: on a GPU when
    those not there yet take at most half of its free memory, on the CPU when they are in memory (not memory-mapped:
    then loader processes read them)."""
    if setting != "auto":
        return setting == "true"
    missing = list({id(arrays): arrays for arrays in splits if not is_on_device(arrays, device)}.values())
    if device.type != "cuda":
        return not any(isinstance(arrays.images, np.memmap) for arrays in missing)
    needed = sum(arrays.images.nbytes + arrays.labels.nbytes for arrays in missing)
    free, _ = torch.cuda.mem_get_info(device)
    return needed <= DEVICE_MEMORY_SHARE * free


class DeviceBatches:
    """The batches of a `CachedImages` drawn from its split on `device`, in the order of `sampler` (positions in the
    dataset: a RandomSampler or WeightedRandomSampler with the run's generator, or none for the dataset's order)."""

    def __init__(
        self, dataset: CachedImages, batch_size: int, device: torch.device, sampler: Iterable[int] | None = None
    ) -> None:
        self.images, self.labels = on_device(dataset.arrays, device)
        self.rows = torch.as_tensor(dataset.indices, device=device)
        self.metadata = None if dataset.metadata is None else dataset.metadata.to(device)
        self.batch_size, self.device, self.sampler = batch_size, device, sampler
        self.positions = len(dataset) if sampler is None else len(sampler)  # type: ignore[arg-type]
        self.wide = self.images.dtype == torch.int16  # 16-bit data, indexed as int16

    def __len__(self) -> int:
        return math.ceil(self.positions / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Any, torch.Tensor]]:
        if self.sampler is None:
            order = torch.arange(self.positions, device=self.device)
        else:
            order = torch.as_tensor(list(self.sampler), dtype=torch.int64).to(self.device)
        for positions in order.split(self.batch_size):
            rows = self.rows[positions]
            images = self.images[rows]
            images = images.view(torch.uint16) if self.wide else images
            if self.metadata is None:
                yield images, self.labels[rows]
            else:
                yield (images, self.metadata[rows]), self.labels[rows]
