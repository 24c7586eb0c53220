"""How long one epoch of a training config takes here, timed on a few of its batches (a search's budget uses it)."""

from __future__ import annotations

import dataclasses
import itertools
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from classifier.config import TrainConfig
from classifier.data.layout import read_info
from classifier.learn.device import resolve_device
from classifier.learn.train import training_setup

PROBE_BATCHES = 4  # timed in each round, after one batch that warms up (allocator, cuDNN's autotuner)
PROBE_ROUNDS = 3  # the median round counts: one round of a few batches varied 2x from run to run
VALIDATION_COST = 1 / 3  # of a training image's time: validation runs the forward pass alone


class FirstBatches:
    """The first `count` batches of a loader, as a loader."""

    def __init__(self, loader: Any, count: int) -> None:
        self.loader, self.count = loader, count

    def __len__(self) -> int:
        return min(self.count, len(self.loader))

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.loader), self.count)


def epoch_seconds(config: TrainConfig, data: Path, fold: int | None = None) -> float:
    """Seconds one epoch of `config` on `data` (fold `fold` held out, with k-fold data) takes on this machine: the
    time per image of a few training batches (the median of a few rounds), over the training images and (at a third
    of the cost) the validation images. The splits stay off the device (the probe runs in a search's launcher, not in
    a worker)."""
    config = dataclasses.replace(config, data_on_device="false", num_workers=0)
    info = read_info(data)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    trainer, train_set, val_set, loader, _ = training_setup(config, data, info, fold, True, device, generator)
    trainer.train_one_epoch(FirstBatches(loader, 1))
    timed = FirstBatches(loader, PROBE_BATCHES)
    rounds = []
    for _ in range(PROBE_ROUNDS):
        started = time.perf_counter()
        trainer.train_one_epoch(timed)  # its loss is read back: the device has finished
        rounds.append(time.perf_counter() - started)
    per_image = statistics.median(rounds) / min(len(train_set), len(timed) * config.batch_size)
    del trainer, loader
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return per_image * (len(train_set) + VALIDATION_COST * len(val_set or ()))
