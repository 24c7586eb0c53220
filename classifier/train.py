"""fit(config, data): one tracked training run with AMP, two-stage fine-tuning, progressive resizing, early stopping
and resume; single-label (softmax) or multi-label (sigmoid) data, images alone or with metadata."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import random
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.optim import lr_scheduler
from torch.utils.data import DataLoader, WeightedRandomSampler
from tqdm import tqdm

from classifier import tracking
from classifier.config import TrainConfig, build_config
from classifier.data.dataset import CachedImages, batched, class_counts, fit_indices, load_split
from classifier.data.layout import DatasetInfo, read_info
from classifier.data.metadata import ColumnEncoding, encode, encoding_width, fit_encoding, to_plain
from classifier.data.transforms import Normalise, augmentation
from classifier.errors import UserError
from classifier.losses import make_criterion
from classifier.metrics import classification_metrics
from classifier.models import apply_model, create_model, head_and_backbone, set_backbone_trainable
from classifier.plots import learning_curves, write_report
from classifier.threshold import choose_threshold, choose_thresholds

BEST, LAST = "best.pt", "last.pt"
RESUME_TAG = "classifier.resume_key"
NOT_IN_RESUME_KEY = ("resume", "output_dir", "system_metrics", "num_workers", "cache")


@dataclass
class FitResult:
    """What a finished fit hands back: its run, the best epoch and its validation metrics, the best checkpoint."""

    run_id: str
    best_epoch: int
    best_metrics: dict[str, float]
    epochs_run: int
    monitor: str
    model_uri: str | None
    checkpoint: Path


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
) -> FitResult:
    """Train `config.model` on the prepared dataset `data` in one MLflow run and return the best epoch's figures.

    `on_epoch_end(epoch, metrics)` may raise `optuna.TrialPruned`: the run then ends KILLED and the error propagates.
    A killed run resumes from its last checkpoint with `config.resume = RUN_ID`, or by running the same config again.
    """
    data = Path(data)
    info = read_info(data)
    if len(info.classes) < 2:
        raise UserError(f"{data}: needs at least two classes to train, found {info.classes}")
    tracking.connect()
    resume_key = _resume_key(config, data, info, fold)
    run_id, state = _resume_state(config, resume_key, parent_run_id)
    if state is not None:
        config = build_config(TrainConfig, state["config"], {"resume": run_id}, origin=f"run {run_id}")
        if state["classes"] != info.classes:
            raise UserError(f"run {run_id} was trained on classes {state['classes']}, {data} has {info.classes}")
    _seed_everything(config.seed)
    device = resolve_device(config.device)
    if config.progressive_sizes and max(config.progressive_sizes) > info.size:
        raise UserError(
            f"train: progressive_sizes {config.progressive_sizes} go beyond the {info.size} px of {data}; "
            f"use sizes up to {info.size} (the last stage normally is {info.size})"
        )
    train_set, val_set, encodings = _datasets(config, data, info, fold)
    model = create_model(
        config.model, len(info.classes), info.channels, config.pretrained, config.weights, encoding_width(encodings)
    )
    trainer = Trainer(config, info, model, device, encodings)
    counts = class_counts(train_set.labels, len(info.classes))
    if (counts == 0).any():
        missing = [name for name, count in zip(info.classes, counts, strict=True) if count == 0]
        raise UserError(f"{data}: no training images for classes {missing}; prepare the dataset with more images")
    trainer.set_criterion(counts, len(train_set))
    generator = torch.Generator().manual_seed(config.seed)
    train_loader = make_loader(train_set, config, device, generator, shuffle=True)
    val_loader = make_loader(val_set, config, device, None, shuffle=False)
    if state is not None:
        trainer.load_state(state, generator)
    run_tags = {**(tags or {}), RESUME_TAG: resume_key, "classifier.data": str(data.resolve())}
    if fold is not None:
        run_tags["classifier.fold"] = str(fold)
    with tracking.start_run(
        config.experiment, run_name, run_tags, parent_run_id, run_id=run_id, system_metrics=config.system_metrics
    ):
        run_id = tracking.active_run_id()
        folder = Path(config.output_dir) / run_id
        folder.mkdir(parents=True, exist_ok=True)
        if state is None:
            tracking.log_params(_params(config, info, fold, len(train_set), len(val_set)))
        else:
            print(f"resuming run {run_id} after epoch {trainer.epoch}", file=sys.stderr)
        try:
            trainer.train(train_loader, val_loader, generator, folder, run_id, on_epoch_end)
        except torch.OutOfMemoryError as error:
            raise _out_of_memory(config, device) from error
        except RuntimeError as error:
            if "out of memory" in str(error) or "can't allocate memory" in str(error):
                raise _out_of_memory(config, device) from error
            raise
        model_uri = trainer.finish(val_loader, folder, log_model)
    return FitResult(
        run_id=run_id,
        best_epoch=trainer.best_epoch,
        best_metrics=trainer.best_metrics,
        epochs_run=trainer.epoch + 1,
        monitor=trainer.monitor,
        model_uri=model_uri,
        checkpoint=folder / BEST,
    )


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
        self.encodings = encodings or []
        self.amp_dtype = amp_dtype(config.amp, device)
        self.memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        self.model = model.to(device, memory_format=self.memory_format)
        self.normalise = Normalise(info.mean, info.std).to(device)
        self.monitor = resolve_monitor(config.monitor, len(info.classes), self.multi_label)
        self.maximise = not self.monitor.endswith("loss")
        self.optimizer = make_optimizer(model, config)
        self.scheduler = EpochScheduler(self.optimizer, config, self.maximise)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.criterion: nn.Module = nn.CrossEntropyLoss()
        self.epoch = -1
        self.best_epoch = -1
        self.best_metrics: dict[str, float] = {}
        self.stale_epochs = 0
        self.history: list[dict[str, float]] = []

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
        train_loader: DataLoader,
        val_loader: DataLoader,
        generator: torch.Generator,
        folder: Path,
        run_id: str,
        on_epoch_end: Callable[[int, dict[str, float]], None] | None,
    ) -> None:
        """Run the remaining epochs; log each epoch's metrics in one asynchronous call; checkpoint best and last."""
        config = self.config
        start = self.epoch + 1
        epochs = tqdm(range(start, config.epochs), desc="epochs", unit="epoch", initial=start, total=config.epochs)
        for epoch in epochs:
            set_backbone_trainable(self.model, epoch >= config.freeze_epochs)
            lr = self.optimizer.param_groups[0]["lr"]
            size = self.image_size(epoch)
            train_loss, train_accuracy = self.train_one_epoch(train_loader, size)
            val_loss, labels, probabilities = self.predict(val_loader)
            metrics = {"train_loss": train_loss, "train_accuracy": train_accuracy, "val_loss": val_loss}
            scores = classification_metrics(labels, probabilities, self.info.classes)
            metrics.update({metric_name(f"val_{name}"): value for name, value in scores.items()})
            metrics["lr"] = lr
            if config.progressive_sizes:
                metrics["image_size"] = size
            self.scheduler.step(metrics[self.monitor])
            self.epoch = epoch
            self.history.append({"epoch": epoch, **metrics})
            checkpoint = self.checkpoint()
            if self.best_epoch < 0 or self._better(metrics[self.monitor], self.best_metrics[self.monitor]):
                self.best_epoch, self.best_metrics, self.stale_epochs = epoch, metrics, 0
                save_atomically(checkpoint, folder / BEST)
            else:
                self.stale_epochs += 1
            save_atomically({**checkpoint, **self.resume_state(generator, run_id)}, folder / LAST)
            tracking.log_metrics(metrics, step=epoch)  # after the checkpoint: a resumed run logs no epoch twice
            epochs.set_postfix({key: f"{metrics[key]:.4f}" for key in ("train_loss", "val_loss", self.monitor)})
            if on_epoch_end is not None:
                on_epoch_end(epoch, metrics)
            if config.patience and self.stale_epochs >= config.patience:
                break

    def image_size(self, epoch: int) -> int:
        """The training image size of `epoch`: `progressive_sizes` take equal shares of the epochs, in order."""
        sizes = self.config.progressive_sizes
        if not sizes:
            return self.info.size
        return sizes[min(len(sizes) - 1, epoch * len(sizes) // self.config.epochs)]

    def train_one_epoch(self, loader: DataLoader, size: int | None = None) -> tuple[float, float]:
        """One pass over the training loader with images at `size` px; returns the mean loss and accuracy (per
        label, at probability 0.5, for multi-label data)."""
        self.model.train()
        total_loss = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device)
        seen = 0
        for inputs, labels in tqdm(loader, desc="training", unit="batch", leave=False, mininterval=1):
            inputs, labels = self._inputs(inputs, size), labels.to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                logits = apply_model(self.model, inputs)
                loss = self.criterion(logits, labels)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            total_loss += loss.detach() * len(labels)
            if self.multi_label:
                correct += ((logits.detach() > 0) == (labels > 0.5)).float().mean(1).sum()
            else:
                correct += (logits.detach().argmax(1) == labels).sum()
            seen += len(labels)
        return total_loss.item() / seen, correct.item() / seen

    def predict(self, loader: DataLoader) -> tuple[float, np.ndarray, np.ndarray]:
        """Mean loss (the training criterion), labels and probabilities (softmax, or sigmoid) over `loader`."""
        labels, logits, probabilities = predict_batches(
            self.model, loader, self._inputs, self.amp_dtype, multi_label=self.multi_label
        )
        loss = self.criterion(logits.to(self.device), torch.from_numpy(labels).to(self.device)).item()
        return loss, labels, probabilities

    def _inputs(self, inputs: Any, size: int | None = None) -> Any:
        """A batch's images normalised on the device (downscaled to `size` px when smaller), metadata moved there."""
        images, metadata = inputs if isinstance(inputs, tuple) else (inputs, None)
        images = self.normalise(images.to(self.device, non_blocking=True))
        if size is not None and size < images.shape[-1]:
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        images = images.contiguous(memory_format=self.memory_format)
        return images if metadata is None else (images, metadata.to(self.device, non_blocking=True))

    def _better(self, value: float, best: float) -> bool:
        return value > best if self.maximise else value < best

    def checkpoint(self) -> dict[str, Any]:
        """The inference checkpoint: architecture, weights, classes, preprocessing (read by `model_from_checkpoint`)."""
        info = self.info
        return {
            "architecture": self.config.model,
            "num_classes": len(info.classes),
            "in_chans": info.channels,
            "state_dict": {key: value.detach().cpu().contiguous() for key, value in self.model.state_dict().items()},
            "classes": list(info.classes),
            "preprocessing": {
                "size": info.size,
                "channels": info.channels,
                "bit_depth": info.bit_depth,
                "mean": list(info.mean),
                "std": list(info.std),
                "resize": info.resize,
            },
            "config": config_dict(self.config),
            "threshold": None,
            "task": info.task,
            "metadata": to_plain(self.encodings),
        }

    def resume_state(self, generator: torch.Generator, run_id: str) -> dict[str, Any]:
        """What `last.pt` adds to continue exactly: optimiser, schedule, scaler, RNG states and the epoch record."""
        numpy_state = np.random.get_state()
        return {
            "run_id": run_id,
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
        self.model.load_state_dict(state["state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.best_epoch = state["epoch"], state["best_epoch"]
        self.best_metrics, self.stale_epochs, self.history = (
            state["best_metrics"],
            state["stale_epochs"],
            state["history"],
        )
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        kind, keys, *rest = rng["numpy"]
        np.random.set_state((kind, keys.numpy(), *rest))
        random.setstate(_as_tuples(rng["python"]))
        generator.set_state(rng["loader"])

    def finish(self, val_loader: DataLoader, folder: Path, log_model: bool) -> str | None:
        """Score the best epoch; upload report, plots, config and checkpoints in one call; log the servable model."""
        best = torch.load(folder / BEST, map_location=self.device, weights_only=True)
        self.model.load_state_dict(best["state_dict"])
        _, labels, probabilities = self.predict(val_loader)
        thresholds: float | list[float] | None = None
        if self.multi_label:
            thresholds = choose_thresholds(labels, probabilities, self.config.target_recall)
            logged = {
                metric_name(f"decision_threshold_{name}"): value
                for name, value in zip(self.info.classes, thresholds, strict=True)
            }
        elif len(self.info.classes) == 2 and np.unique(labels).size == 2:
            thresholds = choose_threshold(labels == 1, probabilities[:, 1], self.config.target_recall)
            logged = {"decision_threshold": thresholds}
        if thresholds is not None:  # the model decides with it from now on: scores and plots say what it does
            best["threshold"] = thresholds
            torch.save(best, folder / BEST)
            tuned = classification_metrics(labels, probabilities, self.info.classes, thresholds)
            logged.update({metric_name(f"tuned_val_{name}"): value for name, value in tuned.items()})
            tracking.log_metrics(logged)
        with tempfile.TemporaryDirectory(dir=folder) as scratch:
            upload = Path(scratch)
            report = upload / "evaluation"
            write_report(report, labels, probabilities, self.info.classes, thresholds)
            learning_curves(report / "learning_curves.png", self.history, self.monitor)
            (report / "history.json").write_text(json.dumps(self.history, indent=2) + "\n")
            (upload / "config").mkdir()
            (upload / "config" / "train.yaml").write_text(yaml.safe_dump(config_dict(self.config), sort_keys=False))
            (upload / "checkpoints").mkdir()
            for name in (BEST, LAST):
                os.link(folder / name, upload / "checkpoints" / name)
            tracking.log_artifacts(upload)
        summary = {f"best_{key}": value for key, value in self.best_metrics.items() if key.startswith("val_")}
        tracking.log_metrics({**summary, "best_epoch": self.best_epoch})
        if not log_model:
            return None
        from classifier.pyfunc import log_classifier_model  # the servable model is the inference module's job

        return log_classifier_model(folder / BEST, name="model").model_uri


@torch.no_grad()
def predict_batches(
    model: nn.Module,
    loader: DataLoader,
    inputs: Callable[[Any], Any],
    amp: torch.dtype | None = None,
    views: Callable[[torch.Tensor], list[torch.Tensor]] | None = None,
    multi_label: bool = False,
) -> tuple[np.ndarray, torch.Tensor, np.ndarray]:
    """Labels, logits (first view) and probabilities (softmax, or sigmoid when `multi_label`) averaged over
    `views(images)` for a whole loader; `inputs` prepares a batch's inputs (images, or images and metadata)."""
    model.eval()
    device = next(model.parameters()).device
    activation = torch.sigmoid if multi_label else functools.partial(torch.softmax, dim=1)
    all_labels, all_logits, all_probabilities = [], [], []
    for batch_inputs, labels in loader:
        batch = inputs(batch_inputs)
        images, metadata = batch if isinstance(batch, tuple) else (batch, None)
        shown = views(images) if views else [images]
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = [apply_model(model, view if metadata is None else (view, metadata)).float() for view in shown]
        all_probabilities.append(torch.stack([activation(view) for view in logits]).mean(0).cpu())
        all_logits.append(logits[0].cpu())
        all_labels.append(labels)
    return torch.cat(all_labels).numpy(), torch.cat(all_logits), torch.cat(all_probabilities).numpy()


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


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or SGD with momentum; with `freeze_epochs`, the backbone gets `lr * backbone_lr_scale`."""
    head, backbone = head_and_backbone(model)
    backbone_lr = config.lr * (config.backbone_lr_scale if config.freeze_epochs else 1.0)
    groups = [{"params": head, "lr": config.lr}, {"params": backbone, "lr": backbone_lr}]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' requested but no CUDA GPU is available; use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """Mixed precision on CUDA only: bf16 where supported (auto), else fp16; full precision on CPU."""
    if mode == "off" or device.type != "cuda":
        return None
    if mode == "fp16" or (mode == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


def resolve_monitor(monitor: str, num_classes: int, multi_label: bool = False) -> str:
    if monitor == "auto":
        return "val_roc_auc" if num_classes == 2 and not multi_label else "val_macro_f1"
    return monitor if monitor.startswith(("val_", "train_")) else f"val_{monitor}"


def metric_name(name: str) -> str:
    """MLflow metric names allow letters, digits, `_ - . / `; anything else in a class name becomes `_`."""
    return re.sub(r"[^\w\-. /]", "_", name)


def config_dict(config: TrainConfig) -> dict[str, Any]:
    """The config as plain values (paths as strings), as stored in checkpoints and logged as params."""
    values = dataclasses.asdict(config)
    return {key: str(value) if isinstance(value, Path) else value for key, value in values.items()}


def save_atomically(values: dict[str, Any], path: Path) -> None:
    partial = path.with_suffix(".partial")
    torch.save(values, partial)
    os.replace(partial, path)


def _datasets(
    config: TrainConfig, data: Path, info: DatasetInfo, fold: int | None
) -> tuple[CachedImages, CachedImages, list[ColumnEncoding]]:
    """Training and validation sets (the held-out fold, or the validation split) and the metadata encoding fitted
    on the training rows (empty without `config.metadata`)."""
    training = load_split(data, "training", config.cache)
    train_rows, val_rows = fit_indices(info, training, fold)
    validation = training
    if val_rows is None:
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
    transform = augmentation(config.augment, info.size)
    return (
        CachedImages(training, train_rows, transform, train_metadata),
        CachedImages(validation, val_rows, None, val_metadata),
        encodings,
    )


def make_loader(
    dataset: CachedImages, config: TrainConfig, device: torch.device, generator: torch.Generator | None, shuffle: bool
) -> DataLoader:
    """Batches straight from the decoded cache; worker processes when images are augmented or memory-mapped."""
    workers = config.num_workers
    if workers is None:
        in_memory = not isinstance(dataset.arrays.images, np.memmap)
        workers = 0 if (dataset.transform is None and in_memory) else min(4, max(1, (os.cpu_count() or 1) - 1))
    sampler = None
    if shuffle and config.sampler == "weighted":
        weights = torch.as_tensor(sample_weights(dataset.labels), dtype=torch.double)
        sampler = WeightedRandomSampler(weights, len(dataset), replacement=True, generator=generator)
    return DataLoader(
        dataset,
        batch_size=config.batch_size if shuffle else config.batch_size * 2,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        generator=generator,
        num_workers=workers,
        collate_fn=batched,
        pin_memory=device.type == "cuda",
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


def _resume_state(config: TrainConfig, key: str, parent_run_id: str | None) -> tuple[str | None, dict | None]:
    """(run id, last checkpoint) to continue: `config.resume`, else an unfinished run of the same config."""
    run_id = config.resume
    if run_id is None:
        if parent_run_id is not None or os.environ.get("MLFLOW_RUN_ID"):
            return None, None
        if not any(Path(config.output_dir).glob(f"*/{LAST}")):  # nothing here to resume: skip the tracking query
            return None, None
        run_id = tracking.unfinished_run(config.experiment, {RESUME_TAG: key})
        if run_id is None or not (Path(config.output_dir) / run_id / LAST).is_file():
            return None, None
    tracking.run_info(run_id)
    path = Path(config.output_dir) / run_id / LAST
    if not path.is_file():
        downloaded = tracking.download_artifact(run_id, f"checkpoints/{LAST}", path.parent)
        if downloaded is None:
            raise UserError(f"run {run_id} has no checkpoint to resume from (not in {path.parent} nor its artifacts)")
        os.replace(downloaded, path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["epoch"] + 1 >= state["config"]["epochs"]:
        raise UserError(f"run {run_id} already trained all {state['config']['epochs']} epochs; nothing to resume")
    return run_id, state


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
