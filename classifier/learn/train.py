"""fit(config, data): one tracked training run with AMP, two-stage fine-tuning, progressive resizing, early stopping
and resume; single-label (softmax) or multi-label (sigmoid) data, images alone or with metadata."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from timm.data import Mixup
from timm.utils import ModelEmaV3
from torch import nn
from torch.optim import lr_scheduler
from torch.utils.data import DataLoader, RandomSampler, WeightedRandomSampler

from classifier import processes, stopping, tracking
from classifier.config import TrainConfig, build_config
from classifier.console import progress
from classifier.data.batches import DeviceBatches, fits_on_device
from classifier.data.dataset import CachedImages, batched, class_counts, fit_indices, load_split
from classifier.data.layout import DatasetInfo, choose_positive_class, positive_index, read_info
from classifier.data.metadata import ColumnEncoding, encode, encoding_width, fit_encoding, to_plain
from classifier.data.transforms import Normalise, augmentation, tta_views, unit_range, uses_tta
from classifier.errors import UserError
from classifier.learn.device import amp_dtype, memory_format, resolve_device, use_fast_kernels
from classifier.learn.explained import log_test_grid
from classifier.learn.inference import predict_batches
from classifier.measure.calibration import calibration_metrics, fit_temperature
from classifier.measure.metrics import classification_metrics
from classifier.measure.plots import learning_curves, write_report
from classifier.measure.threshold import choose_threshold, choose_thresholds, few_images_warning, prevalence
from classifier.model.checkpoint import BEST
from classifier.model.pyfunc import log_classifier_model
from classifier.nets.losses import make_criterion
from classifier.nets.models import apply_model, create_model, frozen_backbone, head_and_backbone, with_temperature

LAST = "last.pt"  # the resume checkpoint, beside BEST
RESUME_TAG = "classifier.resume_key"
Batches = DataLoader | DeviceBatches  # what the epoch loop iterates
NOT_IN_RESUME_KEY = (
    "resume",
    "output_dir",
    "system_metrics",
    "num_workers",
    "cache",
    "data_on_device",
    "checkpoint_upload_minutes",
    "keep_outputs",
)


@dataclass
class FitResult:
    """What a finished fit hands back: its run, the best epoch and its validation metrics, the best checkpoint."""

    run_id: str
    best_epoch: int  # counting from 1, as the progress bar does (its metrics are logged at step best_epoch - 1)
    best_metrics: dict[str, float]
    epochs_run: int
    monitor: str
    model_uri: str | None
    checkpoint: Path


def discard_outputs(config: TrainConfig, run_ids: Iterable[str]) -> None:
    """Remove the local OUTPUT_DIR/RUN_ID folders of runs whose model (or a fold's best.pt) MLflow now holds, unless
    `config.keep_outputs`."""
    if config.keep_outputs:
        return
    for run_id in run_ids:
        shutil.rmtree(Path(config.output_dir) / run_id, ignore_errors=True)


def fit(
    config: TrainConfig,
    data: Path,
    *,
    parent_run_id: str | None = None,
    run_name: str | None = None,
    tags: dict | None = None,
    fold: int | None = None,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
    log_model: bool = True,
    warm_start: Path | None = None,
    validate: bool = True,
) -> FitResult:
    """Train `config.model` on the prepared dataset `data` in one MLflow run and return the best epoch's figures.

    `on_epoch_end(epoch, metrics)` may raise `optuna.TrialPruned`: the run then ends KILLED and the error propagates.
    A killed run resumes from its last checkpoint with `config.resume = RUN_ID`, or by running the same config again.
    One process at a time writes a run: it holds `OUTPUT_DIR/.RUN_ID.lock` (and, while it may resume a run of the same
    config, `OUTPUT_DIR/.train-KEY.lock`), so a live run is never joined and a dead one is resumed.
    `warm_start` is the output folder of another run of the same config (a dead trial's): a new run continues from
    its last checkpoint, its epochs logged again and passed to `on_epoch_end` first.
    Without `validate` (a search's full refit), it trains on every training image, every fold included, for
    `config.epochs` epochs: the last epoch is the model, its threshold left to the caller, a plateau schedule follows
    the training loss.
    """
    if not validate:
        config = dataclasses.replace(config, monitor="train_loss", patience=0)
    with contextlib.ExitStack() as locks:
        return _fit(
            config,
            Path(data),
            locks,
            parent_run_id,
            run_name,
            tags,
            fold,
            on_epoch_end,
            log_model,
            warm_start,
            validate,
        )


def _fit(
    config: TrainConfig,
    data: Path,
    locks: contextlib.ExitStack,
    parent_run_id: str | None,
    run_name: str | None,
    tags: dict | None,
    fold: int | None,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None,
    log_model: bool,
    warm_start: Path | None,
    validate: bool,
) -> FitResult:
    """`fit`, holding its locks in `locks`."""
    info = read_info(data)
    if len(info.classes) < 2:
        raise UserError(f"{data}: needs at least two classes to train, found {info.classes}")
    monitor = resolve_monitor(config.monitor, len(info.classes), info.task == "multi_label")
    check_metric(monitor, epoch_metric_names(info, config), "train: --monitor")
    tracking.connect()
    resume_key = _resume_key(config, data, info, fold if validate else "every training image")
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    if _auto_resumes(config, parent_run_id):
        busy = "train: another `classifier train` of this config and data is running"
        locks.enter_context(_owned(Path(config.output_dir) / f".train-{resume_key}.lock", busy))
    run_id, state = _resume_state(config, resume_key, parent_run_id)
    if run_id is not None:
        locks.enter_context(_run_lock(config, run_id))
        here = {name: getattr(config, name) for name in NOT_IN_RESUME_KEY}  # this machine's, not the stopped run's
        config = build_config(TrainConfig, state["config"], {**here, "resume": run_id}, origin=f"run {run_id}")
        if state["classes"] != info.classes:
            raise UserError(f"run {run_id} was trained on classes {state['classes']}, {data} has {info.classes}")
    elif warm_start is not None:
        state = _warm_state(Path(warm_start), resume_key)
    _seed_everything(config.seed)
    device = resolve_device(config.device)
    if config.progressive_sizes and max(config.progressive_sizes) > info.size:
        raise UserError(
            f"train: progressive_sizes {config.progressive_sizes} go beyond the {info.size} px of {data}; "
            f"use sizes up to {info.size} (the last stage normally is {info.size})"
        )
    generator = torch.Generator().manual_seed(config.seed)
    trainer, train_set, val_set, train_loader, val_loader = training_setup(
        config, data, info, fold, validate, device, generator
    )
    trainer.resume_key = resume_key
    trainer.resume_state_stored = run_id is not None  # it may have gone to the artifact store before the stop
    if state is not None:
        trainer.load_state(state, generator)
    run_tags = {**(tags or {}), RESUME_TAG: resume_key, "classifier.data": str(data.resolve())}
    if fold is not None:
        run_tags["classifier.fold"] = str(fold)
    if trainer.positive is not None:  # what sensitivity, the threshold and the AUCs of this run are about
        run_tags["classifier.positive_class"] = info.classes[trainer.positive]
    run_name = run_name or (None if parent_run_id else f"train {config.model}")
    with tracking.start_run(
        config.experiment, run_name, run_tags, parent_run_id, run_id=run_id, system_metrics=config.system_metrics
    ):
        if run_id is None:  # a new run (or the one `mlflow run` made): nobody else knows it yet
            run_id = tracking.active_run_id()
            locks.enter_context(_run_lock(config, run_id))
        folder = Path(config.output_dir) / run_id
        folder.mkdir(parents=True, exist_ok=True)
        if config.resume is None:
            tracking.log_params(_params(config, info, fold, len(train_set), len(val_set or ())))
        else:
            print(f"resuming run {run_id} after epoch {trainer.epoch}", file=sys.stderr)
        try:
            if state is not None and config.resume is None:  # warm start: the other run's files become this one's
                print(f"run {run_id} continues {warm_start} after epoch {trainer.epoch}", file=sys.stderr)
                for name in (BEST, LAST):
                    shutil.copyfile(Path(warm_start) / name, folder / name)
                trainer.replay(on_epoch_end)
            trainer.train(train_loader, val_loader, generator, folder, run_id, on_epoch_end)
            model_uri = trainer.finish(val_loader, folder, log_model)
        except stopping.Interrupted:
            done = "no epoch" if trainer.epoch < 0 else f"epoch {trainer.epoch}"
            print(f"run {run_id} stopped after {done} (KILLED); run the same command again to resume", file=sys.stderr)
            raise
        except torch.OutOfMemoryError as error:
            raise _out_of_memory(config, device) from error
        except RuntimeError as error:
            if "out of memory" in str(error) or "can't allocate memory" in str(error):
                raise _out_of_memory(config, device) from error
            raise
        if log_model and parent_run_id is None:  # a run of its own (no trial, no fold): evaluation/explained.png
            log_test_grid(folder / BEST, data, device, config.batch_size)
    return FitResult(
        run_id=run_id,
        best_epoch=trainer.best_epoch + 1,
        best_metrics=trainer.best_metrics,
        epochs_run=trainer.epoch + 1,
        monitor=trainer.monitor,
        model_uri=model_uri,
        checkpoint=folder / BEST,
    )


def training_setup(
    config: TrainConfig,
    data: Path,
    info: DatasetInfo,
    fold: int | None,
    validate: bool,
    device: torch.device,
    generator: torch.Generator,
) -> tuple[Trainer, CachedImages, CachedImages | None, Batches, Batches | None]:
    """The trainer of a new network with its criterion, the training and validation sets, and their loaders."""
    train_set, val_set, encodings = _datasets(config, data, info, fold, validate)
    model = create_model(
        config.model,
        len(info.classes),
        info.channels,
        config.pretrained,
        config.weights,
        encoding_width(encodings),
        config.drop_rate,
        config.drop_path_rate,
    )
    trainer = Trainer(config, info, model, device, encodings)
    counts = class_counts(train_set.labels, len(info.classes))
    if (counts == 0).any():
        missing = [name for name, count in zip(info.classes, counts, strict=True) if count == 0]
        raise UserError(f"{data}: no training images for classes {missing}; prepare the dataset with more images")
    trainer.set_criterion(counts, len(train_set))
    splits = [dataset.arrays for dataset in (train_set, val_set) if dataset is not None]
    resident = fits_on_device(config.data_on_device, splits, device)
    train_loader = make_loader(train_set, config, device, generator, shuffle=True, resident=resident)
    val_loader = None if val_set is None else make_loader(val_set, config, device, None, False, resident)
    return trainer, train_set, val_set, train_loader, val_loader


class Trainer:
    """The epoch loop's state: model, optimiser, schedule, scaler, best epoch; saved whole in `last.pt`."""

    def __init__(
        self,
        config: TrainConfig,
        info: DatasetInfo,
        model: nn.Module,
        device: torch.device,
        encodings: list[ColumnEncoding] | None = None,
    ) -> None:
        self.config, self.info, self.device = config, info, device
        self.multi_label = info.task == "multi_label"
        given = config.positive_class
        if given is not None:  # a positive class for this run, else the dataset's (the second class if it has none)
            choose_positive_class(info.classes, given, info.task)
        self.positive = positive_index(info.classes, given or info.positive_class, info.task)
        self.encodings = encodings or []
        self.amp_dtype = amp_dtype(config.amp, device)
        self.memory_format = memory_format(config.channels_last, device)
        use_fast_kernels(device)
        self.model = model.to(device, memory_format=self.memory_format)
        self.normalise = Normalise(info.mean, info.std).to(device)
        self.augment = augmentation(config.augment)
        self.monitor = resolve_monitor(config.monitor, len(info.classes), self.multi_label)
        self.maximise = not self.monitor.endswith("loss")
        self.optimizer = make_optimizer(model, config)
        self.scheduler = EpochScheduler(self.optimizer, config, self.maximise)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.criterion: nn.Module = nn.CrossEntropyLoss()
        self.mixup = make_mixup(config, len(info.classes), self.multi_label)
        self.ema = None if config.ema_decay is None else make_ema(self.model, config.ema_decay)
        self.ema_steps = 0  # optimizer steps the EMA has averaged (its decay warms up over them)
        if config.compile:  # in place: the state_dict keys (checkpoints, the EMA's copy) stay those of the network
            self.model.compile()
        self.epoch = -1
        self.best_epoch = -1
        self.best_metrics: dict[str, float] = {}
        self.stale_epochs = 0
        self.history: list[dict[str, float]] = []
        self.resume_key = ""  # recorded in last.pt: which config, data and fold it continues
        self.uploaded_at = time.monotonic()  # when best.pt and last.pt last went to the artifact store
        self.resume_state_stored = False  # whether the artifact store may hold last.pt (removed once finished)

    def set_criterion(self, counts: np.ndarray, images: int) -> None:
        """The training loss, given the training images per class (`counts`) out of `images`."""
        config = self.config
        criterion = make_criterion(
            config.loss,
            counts,
            config.class_weights,
            config.label_smoothing,
            config.focal_gamma,
            multi_label_total=images if self.multi_label else None,
        )
        self.criterion = criterion.to(self.device)

    def train(
        self,
        train_loader: Batches,
        val_loader: Batches | None,
        generator: torch.Generator,
        folder: Path,
        run_id: str,
        on_epoch_end: Callable[[int, dict[str, float]], None] | None,
    ) -> None:
        """Run the remaining epochs; log each epoch's metrics in one asynchronous call; checkpoint best and last.

        A stop request (see classifier.stopping) ends the loop between two batches with `stopping.Interrupted`."""
        config = self.config
        start = self.epoch + 1
        if config.patience and self.stale_epochs >= config.patience:
            return  # stopped early before a kill: resuming only finishes the run
        epochs = progress(range(start, config.epochs), desc="epochs", unit="epoch", initial=start, total=config.epochs)
        for epoch in epochs:
            lr = self.optimizer.param_groups[0]["lr"]
            size = self.image_size(epoch)
            frozen = frozen_backbone(self.model, self.optimizer) if epoch < config.freeze_epochs else nullcontext()
            try:
                with frozen:
                    train_loss, train_accuracy = self.train_one_epoch(train_loader, size, epoch >= config.freeze_epochs)
                if self.ema is not None and epoch < config.freeze_epochs:
                    self.ema.set(self.model)  # the head trained alone: the EMA takes the model as it is
                validated = None if val_loader is None else self.predict(val_loader)
            except Exception as error:  # e.g. a loader worker killed by the same SIGTERM: the stop, not a failure
                if stopping.requested():
                    raise stopping.Interrupted(stopping.requested()) from error
                raise
            shown_size = size if config.progressive_sizes else None
            metrics = epoch_metrics(train_loss, train_accuracy, lr, shown_size)
            if validated is not None:
                val_loss, labels, probabilities = validated
                scores = classification_metrics(labels, probabilities, self.info.classes, positive=self.positive)
                metrics.update(validation_metrics(val_loss, scores))
            self.scheduler.step(metrics[self.monitor])
            self.epoch = epoch
            self.history.append({"epoch": epoch, **metrics})
            tracking.log_metrics(metrics, step=epoch)  # queued now, stored before the checkpoints count (commit)
            checkpoint = self.checkpoint()
            written = {}
            kept, gained = (True, True)  # the first epoch, or any epoch without validation: the last one is the model
            if self.best_epoch >= 0 and validated is not None:
                kept, gained = compare_epochs(metrics, self.best_metrics, self.monitor, self.maximise)
            if kept:
                self.best_epoch, self.best_metrics = epoch, metrics
                written[folder / BEST] = checkpoint
            self.stale_epochs = 0 if gained else self.stale_epochs + 1
            written[folder / LAST] = {**checkpoint, **self.resume_state(generator, run_id, self.resume_key)}
            commit(written)
            self.upload_resume_state(folder, run_id)
            shown = ("train_loss", "val_loss", self.monitor) if validated is not None else ("train_loss",)
            epochs.set_postfix({key: f"{metrics[key]:.4f}" for key in shown})
            if on_epoch_end is not None:
                on_epoch_end(epoch, metrics)
            if config.patience and self.stale_epochs >= config.patience:
                break

    def upload_resume_state(self, folder: Path, run_id: str) -> None:
        """Every `checkpoint_upload_minutes`, copy best.pt and last.pt to the run's artifacts (checkpoints/), so that
        a run killed on one machine resumes on another."""
        minutes = self.config.checkpoint_upload_minutes
        if not minutes or time.monotonic() - self.uploaded_at < minutes * 60:
            return
        refused = tracking.try_log_artifacts(run_id, [folder / BEST, folder / LAST], "checkpoints")
        if refused:  # training goes on; the next upload tries again
            print(f"train: checkpoints not uploaded ({refused}); trying again in {minutes:g} min", file=sys.stderr)
        self.uploaded_at, self.resume_state_stored = time.monotonic(), True

    def replay(self, on_epoch_end: Callable[[int, dict[str, float]], None] | None) -> None:
        """Log the epochs of the checkpoint this run started from (another run's) and pass them to `on_epoch_end`."""
        for entry in self.history:
            metrics = {key: value for key, value in entry.items() if key != "epoch"}
            tracking.log_metrics(metrics, step=entry["epoch"])
            if on_epoch_end is not None:
                on_epoch_end(entry["epoch"], metrics)

    def image_size(self, epoch: int) -> int:
        """The training image size of `epoch`: `progressive_sizes` take equal shares of the epochs, in order."""
        sizes = self.config.progressive_sizes
        if not sizes:
            return self.info.size
        return sizes[min(len(sizes) - 1, epoch * len(sizes) // self.config.epochs)]

    def train_one_epoch(self, loader: Batches, size: int | None = None, average: bool = True) -> tuple[float, float]:
        """One pass over the training loader with images at `size` px; returns the mean loss and accuracy (per
        label, at probability 0.5, for multi-label data; against each mixed image's larger share with mixup).

        With `average`, the weight EMA (if any) is updated after each optimizer step; not while the backbone is frozen
        (timm's frozen BatchNorm layers hold other tensors than the EMA's copy)."""
        self.model.train()
        total_loss = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device)
        seen = 0
        batches = progress(
            stopping.checked(loader), desc="training", unit="batch", total=len(loader), leave=False, mininterval=1
        )
        for inputs, labels in batches:
            inputs, labels = self._inputs(inputs, size, augment=True), labels.to(self.device, non_blocking=True)
            if self.mixup is not None:
                inputs, labels = self._mixed(inputs, labels)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                logits = apply_model(self.model, inputs)
                loss = self.criterion(logits, labels)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.ema is not None and average:
                self.ema_steps += 1
                self.ema.update(self.model, step=self.ema_steps)
            total_loss += loss.detach() * len(labels)
            if self.multi_label:
                correct += ((logits.detach() > 0) == (labels > 0.5)).float().mean(1).sum()
            else:
                truth = labels.argmax(1) if labels.is_floating_point() else labels
                correct += (logits.detach().argmax(1) == truth).sum()
            seen += len(labels)
        return total_loss.item() / seen, correct.item() / seen

    def _mixed(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch mixed by timm's Mixup/CutMix, its labels as class probabilities. timm mixes image i with image
        n-1-i and needs an even batch: an odd batch's last image stays as it is (its own one-hot target)."""
        even = len(labels) - len(labels) % 2
        targets = F.one_hot(labels, len(self.info.classes)).float()
        if even == 0:
            return images, targets
        mixed, mixed_targets = self.mixup(images[:even], labels[:even])
        if even == len(labels):
            return mixed, mixed_targets
        return torch.cat([mixed, images[even:]]), torch.cat([mixed_targets, targets[even:]])

    @property
    def scored(self) -> nn.Module:
        """The network validation scores and checkpoints hold: the weight EMA with `ema_decay`, else the model."""
        return self.model if self.ema is None else self.ema.module

    def predict(
        self, loader: Batches, views: Callable[[torch.Tensor], list[torch.Tensor]] | None = None
    ) -> tuple[float, np.ndarray, np.ndarray]:
        """Mean loss (the training criterion, on the first view), labels and probabilities (softmax, or sigmoid;
        averaged over `views` of each batch) over `loader`, of the scored network."""
        labels, logits, probabilities = predict_batches(
            self.scored, stopping.checked(loader), self._inputs, views, multi_label=self.multi_label
        )
        loss = self.criterion(logits.to(self.device), torch.from_numpy(labels).to(self.device)).item()
        return loss, labels, probabilities

    def _inputs(self, inputs: Any, size: int | None = None, augment: bool = False) -> Any:
        """A batch's images on the device: downscaled to `size` px when smaller, then (`augment`) the training recipe,
        normalised last; its metadata moved there too."""
        images, metadata = inputs if isinstance(inputs, tuple) else (inputs, None)
        images = images.to(self.device, non_blocking=True)
        resize = size is not None and size < images.shape[-1]
        augment = augment and self.augment is not None
        if resize or augment:
            images = unit_range(images)
        if resize:
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        if augment:
            images = self.augment(images)
        images = self.normalise(images).contiguous(memory_format=self.memory_format)
        return images if metadata is None else (images, metadata.to(self.device, non_blocking=True))

    def checkpoint(self) -> dict[str, Any]:
        """The inference checkpoint: architecture, weights (the scored network's), classes, preprocessing (read by
        `model_from_checkpoint`)."""
        info = self.info
        return {
            "architecture": self.config.model,
            "num_classes": len(info.classes),
            "in_chans": info.channels,
            "state_dict": cpu_state_dict(self.scored),
            "classes": list(info.classes),
            "preprocessing": {
                "size": info.size,
                "channels": info.channels,
                "bit_depth": info.bit_depth,
                "mean": list(info.mean),
                "std": list(info.std),
                "resize": info.resize,
                **({"dicom": info.dicom} if info.dicom else {}),  # how DICOM inputs are read: window, frame
            },
            "config": config_dict(self.config),
            "threshold": None,
            "threshold_rule": None,
            "threshold_prevalence": None,  # the validation share of positives the threshold was tuned at
            "positive_class": None if self.positive is None else info.classes[self.positive],
            "temperature": None,
            "tta": self.config.tta,
            "task": info.task,
            "metadata": to_plain(self.encodings),
        }

    def resume_state(self, generator: torch.Generator, run_id: str, resume_key: str) -> dict[str, Any]:
        """What `last.pt` adds to continue exactly: optimiser, schedule, scaler, RNG states and the epoch record; with
        an EMA (then in `state_dict`) also the trained weights (`model_state_dict`) and the EMA's step count."""
        numpy_state = np.random.get_state()
        averaged = {}
        if self.ema is not None:
            averaged = {"model_state_dict": cpu_state_dict(self.model), "ema_steps": self.ema_steps}
        return {
            **averaged,
            "run_id": run_id,
            "resume_key": resume_key,
            "epoch": self.epoch,
            "best_epoch": self.best_epoch,
            "best_metrics": self.best_metrics,
            "stale_epochs": self.stale_epochs,
            "history": self.history,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].copy()), *numpy_state[2:]],
                "python": random.getstate(),
                "loader": generator.get_state(),
            },
        }

    def load_state(self, state: dict[str, Any], generator: torch.Generator) -> None:
        """Continue from a `last.pt` (see `resume_state`)."""
        if self.ema is not None:
            self.ema.module.load_state_dict(state["state_dict"])
            self.ema_steps = state["ema_steps"]
        self.model.load_state_dict(state.get("model_state_dict", state["state_dict"]))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        load_scaler_state(self.scaler, state["scaler"])
        self.epoch, self.best_epoch = state["epoch"], state["best_epoch"]
        self.best_metrics, self.stale_epochs, self.history = (
            state["best_metrics"],
            state["stale_epochs"],
            state["history"],
        )
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and self.device.type == "cuda":  # the GPUs this process sees: resumes on fewer or more
            for index, cuda_state in enumerate(rng["cuda"][: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(cuda_state, index)
        kind, keys, *rest = rng["numpy"]
        np.random.set_state((kind, keys.numpy(), *rest))
        random.setstate(_as_tuples(rng["python"]))
        generator.set_state(rng["loader"])

    def tune_on_validation(
        self, val_loader: Batches, best: dict[str, Any], folder: Path
    ) -> tuple[np.ndarray, np.ndarray, float | list[float] | None]:
        """Calibrate the best epoch (`calibrate`) and tune its thresholds on validation, writing both into `best`
        (re-saved); return the validation labels, probabilities and thresholds."""
        logged: dict[str, float] = {}
        if self.config.calibrate == "temperature":  # before the threshold, which is then tuned on what is served
            labels, logits, probabilities = predict_batches(
                self.scored, val_loader, self._inputs, multi_label=self.multi_label
            )
            uncalibrated = calibration_metrics(labels, probabilities, self.positive)
            logged.update({f"uncalibrated_val_{name}": value for name, value in uncalibrated.items()})
            temperature = fit_temperature(logits.numpy(), labels, self.multi_label)
            best["temperature"] = logged["calibration_temperature"] = temperature
            with_temperature(self.scored, temperature)
        views = tta_views(best) if uses_tta(best) else None
        _, labels, probabilities = self.predict(val_loader, views)  # as the logged model will predict
        thresholds: float | list[float] | None = None
        rule = self.config.threshold_rule
        if self.multi_label:
            thresholds = choose_thresholds(labels, probabilities, rule)
            best["threshold_prevalence"] = prevalence(labels)
            for name, value, share in zip(self.info.classes, thresholds, best["threshold_prevalence"], strict=True):
                logged[metric_name(f"decision_threshold_{name}")] = value
                logged[metric_name(f"val_prevalence_{name}")] = share
        elif self.positive is not None and np.unique(labels).size == 2:
            positive = self.positive
            thresholds = choose_threshold(labels == positive, probabilities[:, positive], rule)
            logged["decision_threshold"] = thresholds
            logged["val_prevalence"] = best["threshold_prevalence"] = prevalence(labels == positive)
        if logged:  # the model decides with these from now on: scores and plots say what it does
            warning = few_images_warning(labels, self.info.classes, thresholds) if thresholds is not None else None
            if warning:
                print(warning, file=sys.stderr)
            best["threshold"], best["threshold_rule"] = thresholds, rule
            save_atomically(best, folder / BEST)
            tuned = classification_metrics(labels, probabilities, self.info.classes, thresholds, self.positive)
            logged.update({metric_name(f"tuned_val_{name}"): value for name, value in tuned.items()})
            tracking.log_metrics(logged)
        return labels, probabilities, thresholds

    def finish(self, val_loader: Batches | None, folder: Path, log_model: bool) -> str | None:
        """Score the best epoch, calibrate it (`calibrate`) and tune its thresholds on validation (when there is
        one); upload report, plots, config and checkpoints in one call; log the servable model.

        A stop request between these steps ends the run KILLED; resuming it does them again."""
        stopping.check()
        best = torch.load(folder / BEST, map_location="cpu", weights_only=True)
        self.scored.load_state_dict(best["state_dict"])
        validated = None if val_loader is None else self.tune_on_validation(val_loader, best, folder)
        with tempfile.TemporaryDirectory(dir=folder) as scratch:
            upload = Path(scratch)
            report = upload / "evaluation"
            run = f"run {tracking.active_run_name()}"
            if validated is not None:
                labels, probabilities, thresholds = validated
                shows = f"validation split, {run} (best epoch {self.best_epoch + 1})"
                write_report(report, labels, probabilities, self.info.classes, thresholds, self.positive, shows)
            else:
                report.mkdir()
            learning_curves(report / "learning_curves.png", self.history, self.monitor, run)
            (report / "history.json").write_text(json.dumps(self.history, indent=2) + "\n")
            (upload / "config").mkdir()
            (upload / "config" / "train.yaml").write_text(yaml.safe_dump(config_dict(self.config), sort_keys=False))
            if not log_model:  # a fold of cv or of a search: no model of its own, so its best.pt is what is kept
                (upload / "checkpoints").mkdir()
                os.link(folder / BEST, upload / "checkpoints" / BEST)
            stopping.check()
            tracking.log_artifacts(upload)
        summary = {f"best_{key}": value for key, value in self.best_metrics.items() if key.startswith("val_")}
        summary["best_epoch"] = self.best_epoch + 1  # from 1, as the progress bar counts
        stopping.check()
        model_id = model_uri = None
        if log_model:
            # MLflow links the run's metrics of `step` to the model: those of the epoch whose weights it holds
            model = log_classifier_model(folder / BEST, name="model", step=self.best_epoch)
            model_id, model_uri = model.model_id, model.model_uri
        tracking.log_metrics(summary, model_id=model_id)  # with a model: its scores in the UI's Models view
        if self.resume_state_stored:  # a finished run never resumes: one copy of its best weights stays
            uploaded = [f"checkpoints/{LAST}"] + ([f"checkpoints/{BEST}"] if log_model else [])
            for path in uploaded:
                refused = tracking.try_delete_artifact(tracking.active_run_id(), path)
                if refused:
                    print(f"train: {path} stays in the run's artifacts ({refused})", file=sys.stderr)
        return model_uri


class EpochScheduler:
    """Linear warm-up for `warmup_epochs`, then cosine, step or reduce-on-plateau; stepped once per epoch."""

    def __init__(self, optimizer: torch.optim.Optimizer, config: TrainConfig, maximise: bool) -> None:
        self.warmup_epochs = config.warmup_epochs
        self.plateau = None
        main: lr_scheduler.LRScheduler | None = None
        if config.scheduler == "cosine":
            main = lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, config.epochs - config.warmup_epochs))
        elif config.scheduler == "step":
            main = lr_scheduler.StepLR(optimizer, config.step_size, config.gamma)
        elif config.scheduler == "plateau":
            mode = "max" if maximise else "min"
            self.plateau = lr_scheduler.ReduceLROnPlateau(
                optimizer, mode, factor=config.gamma, patience=config.plateau_patience
            )
        warmup = None
        if config.warmup_epochs:
            warmup = lr_scheduler.LinearLR(optimizer, 1 / (config.warmup_epochs + 1), total_iters=config.warmup_epochs)
        if warmup is not None and main is not None:
            self.schedule = lr_scheduler.SequentialLR(optimizer, [warmup, main], milestones=[config.warmup_epochs])
        else:
            self.schedule = warmup or main
        self.epochs_stepped = 0

    def step(self, monitored: float) -> None:
        if self.plateau is not None and self.epochs_stepped >= self.warmup_epochs:
            self.plateau.step(monitored)
        elif self.schedule is not None:
            self.schedule.step()
        self.epochs_stepped += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "epochs_stepped": self.epochs_stepped,
            "schedule": self.schedule.state_dict() if self.schedule else {},
            "plateau": self.plateau.state_dict() if self.plateau else {},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epochs_stepped = state["epochs_stepped"]
        if self.schedule is not None:
            self.schedule.load_state_dict(state["schedule"])
        if self.plateau is not None:
            self.plateau.load_state_dict(state["plateau"])


def make_mixup(config: TrainConfig, num_classes: int, multi_label: bool) -> Mixup | None:
    """timm's Mixup/CutMix of training batches, or None when `config` mixes nothing. Label smoothing stays the
    criterion's (timm's is off here): smoothing the mixed targets is the same and is not done twice."""
    if not config.mixes:
        return None
    if multi_label:
        raise UserError("train: options 'mixup_alpha'/'cutmix_alpha' need single-label data; leave them 0 here")
    return Mixup(
        mixup_alpha=config.mixup_alpha,
        cutmix_alpha=config.cutmix_alpha,
        prob=config.mixup_prob,
        label_smoothing=0.0,
        num_classes=num_classes,
    )


def load_scaler_state(scaler: torch.amp.GradScaler, state: dict[str, Any]) -> None:
    """Continue an fp16 run's loss scale; a run whose scaler was off (bf16, CPU) left no state, and an fp16 scaler
    then starts afresh: a bf16 run resumes on a GPU without bf16."""
    if state and scaler.is_enabled():
        scaler.load_state_dict(state)


def make_ema(model: nn.Module, decay: float) -> ModelEmaV3:
    """timm's EMA of `model`'s weights (and buffers); its decay warms up towards `decay` over the first steps."""
    return ModelEmaV3(model, decay=decay, use_warmup=True)


def cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s weights and buffers as contiguous CPU tensors, as checkpoints hold them."""
    return {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or SGD with momentum; with `freeze_epochs`, the backbone gets `lr * backbone_lr_scale`."""
    head, backbone = head_and_backbone(model)
    backbone_lr = config.lr * (config.backbone_lr_scale if config.freeze_epochs else 1.0)
    groups = [{"params": head, "lr": config.lr}, {"params": backbone, "lr": backbone_lr}]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def compare_epochs(
    metrics: dict[str, float], best: dict[str, float], monitor: str, maximise: bool
) -> tuple[bool, bool]:
    """(kept, gained) for an epoch's `metrics` against the best epoch's: kept when it becomes the best epoch, gained
    when the monitored metric itself improved (what early stopping's patience waits for).

    A tie on the monitored metric (a validation macro F1 of 1.0 epoch after epoch) keeps the epoch with the lower
    validation loss, and the later epoch when that ties too; a tie is no gain."""
    value, held = metrics[monitor], best[monitor]
    if not math.isclose(value, held, rel_tol=1e-9, abs_tol=1e-12):
        gained = value > held if maximise else value < held
        return gained, gained
    return metrics["val_loss"] <= best["val_loss"], False


def resolve_monitor(monitor: str, num_classes: int, multi_label: bool = False) -> str:
    if monitor == "auto":
        return "val_roc_auc" if num_classes == 2 and not multi_label else "val_macro_f1"
    return monitor if monitor.startswith(("val_", "train_")) else f"val_{monitor}"


def epoch_metrics(train_loss: float, train_accuracy: float, lr: float, size: int | None = None) -> dict[str, float]:
    """What one epoch logs of its training: loss and accuracy, lr, and the image size of a progressive schedule."""
    metrics = {"train_loss": train_loss, "train_accuracy": train_accuracy, "lr": lr}
    if size is not None:
        metrics["image_size"] = size
    return metrics


def validation_metrics(val_loss: float, scores: dict[str, float]) -> dict[str, float]:
    """What one epoch logs of its validation: the loss and `scores`, named val_*."""
    return {"val_loss": val_loss, **{metric_name(f"val_{name}"): value for name, value in scores.items()}}


def epoch_metric_names(info: DatasetInfo, config: TrainConfig) -> list[str]:
    """The names of the metrics each epoch logs on `info`'s data (what --monitor and --metric may name), taken from
    the metrics of a stand-in validation set holding every class."""
    count = len(info.classes)
    if info.task == "multi_label":
        labels = np.eye(count, dtype=np.float32)
        probabilities = 0.2 + 0.6 * labels
    else:
        labels = np.arange(count)
        probabilities = np.full((count, count), 0.2 / count) + 0.8 * np.eye(count)
    scores = classification_metrics(labels, probabilities, info.classes)
    size = 0 if config.progressive_sizes else None
    return list(epoch_metrics(0.0, 0.0, 0.0, size)) + list(validation_metrics(0.0, scores))


def check_metric(name: str, names: list[str], option: str) -> None:
    """Refuse (one line, before any epoch) a metric name that training does not log."""
    if name not in names:
        raise UserError(f"{option} {name}: not a metric training logs on this data; use one of {', '.join(names)}")


def metric_name(name: str) -> str:
    """MLflow metric names allow letters, digits, `_ - . / `; anything else in a class name becomes `_`."""
    return re.sub(r"[^\w\-. /]", "_", name)


def config_dict(config: TrainConfig) -> dict[str, Any]:
    """The config as plain values (paths as strings), as stored in checkpoints and logged as params."""
    values = dataclasses.asdict(config)
    return {key: str(value) if isinstance(value, Path) else value for key, value in values.items()}


def save_atomically(values: dict[str, Any], path: Path) -> None:
    commit({path: values})


def commit(files: dict[Path, dict[str, Any]]) -> None:
    """Write each checkpoint beside its place, wait until the queued metrics are stored, then rename the files into
    place: an epoch counts as done (a resume starts after it) only once its metrics are in the run."""
    partials = {}
    for path, values in files.items():
        partials[path] = path.with_suffix(".partial")
        torch.save(values, partials[path])
    tracking.flush()
    for path, partial in partials.items():
        os.replace(partial, path)


def _datasets(
    config: TrainConfig, data: Path, info: DatasetInfo, fold: int | None, validate: bool = True
) -> tuple[CachedImages, CachedImages | None, list[ColumnEncoding]]:
    """Training and validation sets (the held-out fold, or the validation split; none without `validate`: every
    training image is trained on) and the metadata encoding fitted on the training rows (empty without
    `config.metadata`)."""
    training = load_split(data, "training", config.cache)
    train_rows, val_rows = fit_indices(info, training, fold)
    if not validate:
        train_rows = np.arange(len(training.labels))
    validation = training
    if val_rows is None and validate:
        validation = load_split(data, "validation", config.cache)
        if len(validation.labels) == 0:
            raise UserError(f"{data}: no validation images; prepare it with a validation fraction or with --folds K")
    encodings, train_metadata, val_metadata = [], None, None
    if config.metadata:
        absent = [column for column in config.metadata if column not in info.metadata_columns]
        if absent:
            raise UserError(
                f"train: metadata columns {', '.join(absent)} are not in {data} (it has "
                f"{', '.join(info.metadata_columns) or 'none'}); prepare from a CSV with them or change --metadata"
            )
        encodings = fit_encoding(training.rows.iloc[train_rows], config.metadata)
        train_metadata = encode(training.rows, encodings)
        val_metadata = train_metadata if validation is training else encode(validation.rows, encodings)
    validation_set = CachedImages(validation, val_rows, val_metadata) if validate else None
    return CachedImages(training, train_rows, train_metadata), validation_set, encodings


def make_loader(
    dataset: CachedImages,
    config: TrainConfig,
    device: torch.device,
    generator: torch.Generator | None,
    shuffle: bool,
    resident: bool,
) -> Batches:
    """Batches in the sampler's order (shuffled with `generator`, or class-balanced): drawn on the device from the
    split held there (`resident`), else by a DataLoader over the decoded cache, with loader processes (persistent,
    prefetching, into pinned memory) when the images are memory-mapped or go to a GPU, one per core of this process's
    share but the one that trains."""
    batch_size = config.batch_size if shuffle else config.batch_size * 2
    sampler = None
    if shuffle and config.sampler == "weighted":
        weights = torch.as_tensor(sample_weights(dataset.labels), dtype=torch.double)
        sampler = WeightedRandomSampler(weights, len(dataset), replacement=True, generator=generator)
    elif shuffle:
        sampler = RandomSampler(dataset, generator=generator)
    if resident:
        return DeviceBatches(dataset, batch_size, device, sampler)
    workers = config.num_workers
    if workers is None:
        in_memory = not isinstance(dataset.arrays.images, np.memmap)
        share = min(processes.available_cores(), torch.get_num_threads())
        workers = 0 if in_memory and device.type != "cuda" else max(1, share - 1)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        generator=generator,
        num_workers=workers,
        collate_fn=batched,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers else None,
    )


def sample_weights(labels: np.ndarray) -> np.ndarray:
    """Class-balancing draw weights: 1 / (images of the class); multi-label, that of the image's rarest label."""
    if labels.ndim == 1:
        return 1.0 / np.bincount(labels)[labels]
    inverse = 1.0 / np.maximum(labels.sum(axis=0), 1.0)
    weights = (labels * inverse).max(axis=1)
    return np.where(weights > 0, weights, 1.0 / len(labels))


def _params(config: TrainConfig, info: DatasetInfo, fold: int | None, n_train: int, n_val: int) -> dict[str, Any]:
    return {
        **config_dict(config),
        "data_fingerprint": info.fingerprint,
        "data_size": info.size,
        "data_channels": info.channels,
        "classes": ",".join(info.classes),
        "fold": fold,
        "train_images": n_train,
        "val_images": n_val,
    }


def _resume_key(config: TrainConfig, data: Path, info: DatasetInfo, fold: int | None) -> str:
    """Same config + same data + same fold = the same run, for `classifier train` run again after a kill."""
    values = {key: value for key, value in config_dict(config).items() if key not in NOT_IN_RESUME_KEY}
    text = json.dumps([values, str(data.resolve()), info.fingerprint, fold], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _auto_resumes(config: TrainConfig, parent_run_id: str | None) -> bool:
    """Whether fit looks for an unfinished run of the same config to continue: not in a search, `cv` or `mlflow run`,
    nor when told which run to resume."""
    return config.resume is None and parent_run_id is None and not os.environ.get("MLFLOW_RUN_ID")


@contextmanager
def _owned(path: Path, busy: str) -> Iterator[None]:
    """Hold the lock file `path` for the block; `busy` says what its holder does when another process holds it."""
    try:
        descriptor = processes.lock(path)
    except processes.Held as held:
        raise UserError(
            f"{busy} by {processes.describe(held.holder)}; wait for it to end or stop it (run again, it resumes)"
        ) from None
    try:
        yield
    finally:
        processes.unlock(descriptor, path)


def _run_lock(config: TrainConfig, run_id: str) -> contextlib.AbstractContextManager[None]:
    """The lock beside the run's output folder, held by the process writing the run."""
    return _owned(Path(config.output_dir) / f".{run_id}.lock", f"train: run {run_id} is being written")


def _resume_state(config: TrainConfig, key: str, parent_run_id: str | None) -> tuple[str | None, dict | None]:
    """(run id, last checkpoint) to continue: `config.resume`, else an unfinished run of the same config."""
    run_id = config.resume
    if run_id is None:
        if not _auto_resumes(config, parent_run_id):
            return None, None
        if not any(Path(config.output_dir).glob(f"*/{LAST}")):  # nothing here to resume: skip the tracking query
            return None, None
        run_id = tracking.unfinished_run(config.experiment, {RESUME_TAG: key})
        if run_id is None or not (Path(config.output_dir) / run_id / LAST).is_file():
            return None, None
    _, status, _ = tracking.run_info(run_id)
    if status == "FINISHED":
        raise UserError(f"run {run_id} already finished; nothing to resume (leave out --resume to train a new run)")
    path = Path(config.output_dir) / run_id / LAST
    if not path.is_file() and not _fetch_checkpoints(run_id, path.parent):
        raise UserError(f"run {run_id} has no checkpoint to resume from (not in {path.parent} nor its artifacts)")
    return run_id, torch.load(path, map_location="cpu", weights_only=True)  # all epochs done: resuming finishes it


def _warm_state(folder: Path, key: str) -> dict | None:
    """The last checkpoint in another run's output `folder` when it continues the same config, data and fold (the
    resume key), else None (a note says why)."""
    path = folder / LAST
    if not path.is_file():
        _fetch_checkpoints(folder.name, folder)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as error:
        print(f"train: not continuing {path} ({type(error).__name__}); starting afresh", file=sys.stderr)
        return None
    if state.get("resume_key") != key or not (folder / BEST).is_file():
        print(f"train: {path} is of another config or data; starting afresh", file=sys.stderr)
        return None
    return state


def _fetch_checkpoints(run_id: str, folder: Path) -> bool:
    """Put best.pt and last.pt of `run_id`, as it last uploaded them (killed on another machine), in `folder`;
    False when its artifacts hold no such pair."""
    with tempfile.TemporaryDirectory(dir=folder.parent) as scratch:  # the same disk: moved, not copied
        downloaded = [tracking.download_artifact(run_id, f"checkpoints/{name}", Path(scratch)) for name in (BEST, LAST)]
        if None in downloaded:
            return False
        folder.mkdir(parents=True, exist_ok=True)
        for file in downloaded:
            os.replace(file, folder / file.name)
    return True


def _out_of_memory(config: TrainConfig, device: torch.device) -> UserError:
    return UserError(
        f"out of memory on {device.type} at batch size {config.batch_size}; lower --batch-size "
        "(or use a smaller model / --amp bf16 on a GPU)"
    )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _as_tuples(value: Any) -> Any:
    return tuple(_as_tuples(item) for item in value) if isinstance(value, list | tuple) else value
