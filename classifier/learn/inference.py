"""A network or checkpoint run over a prepared split: labels and probabilities, batch by batch."""

from __future__ import annotations

import functools
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from classifier import tracking
from classifier.data.dataset import CachedImages, SplitArrays, batched, load_split
from classifier.data.layout import DatasetInfo, read_info
from classifier.data.metadata import encode, from_plain
from classifier.data.transforms import Normalise, tta_views
from classifier.errors import UserError
from classifier.model.checkpoint import BEST, check_fits, network_from_checkpoint
from classifier.nets.models import apply_model

RUN_ID = re.compile(r"[0-9a-f]{32}")


@torch.no_grad()
def predict_batches(
    model: nn.Module,
    loader: DataLoader,
    inputs: Callable[[Any], Any],
    views: Callable[[torch.Tensor], list[torch.Tensor]] | None = None,
    multi_label: bool = False,
) -> tuple[np.ndarray, torch.Tensor, np.ndarray]:
    """Labels, logits (first view) and probabilities (softmax, or sigmoid when `multi_label`) averaged over
    `views(images)` for a whole loader; `inputs` prepares a batch's inputs (images, or images and metadata).

    Always in full precision, as predict, serve and the logged model run: the validation that tunes the threshold,
    evaluate and the served model give the same image the same decision (mixed precision is for training steps)."""
    model.eval()
    activation = torch.sigmoid if multi_label else functools.partial(torch.softmax, dim=1)
    all_labels, all_logits, all_probabilities = [], [], []
    for batch_inputs, labels in loader:
        batch = inputs(batch_inputs)
        images, metadata = batch if isinstance(batch, tuple) else (batch, None)
        shown = views(images) if views else [images]
        logits = [apply_model(model, view if metadata is None else (view, metadata)).float() for view in shown]
        all_probabilities.append(torch.stack([activation(view) for view in logits]).mean(0).cpu())
        all_logits.append(logits[0].cpu())
        all_labels.append(labels)
    return torch.cat(all_labels).numpy(), torch.cat(all_logits), torch.cat(all_probabilities).numpy()


def checkpoint_and_split(model: str, data: Path, split: str) -> tuple[DatasetInfo, dict[str, Any], SplitArrays]:
    """The prepared `data`'s description, the checkpoint of `model` (checked to fit the data) and `split`'s images."""
    info = read_info(data)
    tracking.connect()
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = load_checkpoint(model, Path(scratch))
    check_fits(checkpoint, model, data, info)
    return info, checkpoint, read_split(data, split)


def read_split(data: Path, split: str) -> SplitArrays:
    """The images of `split`, refusing an empty split."""
    arrays = load_split(data, split)
    if len(arrays.labels) == 0:
        raise UserError(f"{data}: the {split} split is empty; pick another with --split")
    return arrays


def checkpoint_loader(
    checkpoint: dict[str, Any],
    arrays: SplitArrays,
    batch_size: int,
    device: torch.device,
    rows: np.ndarray | None = None,
) -> tuple[nn.Module, DataLoader, Callable[[Any], Any]]:
    """The checkpoint's network on `device`, a loader over `rows` of a split (all by default) with the metadata the
    network takes (encoded as in training), and the function that prepares a batch's inputs on the device."""
    preprocessing = checkpoint["preprocessing"]
    network = network_from_checkpoint(checkpoint).to(device)
    normalise = Normalise(preprocessing["mean"], preprocessing["std"]).to(device)
    encodings = from_plain(checkpoint.get("metadata"))
    metadata = encode(arrays.rows, encodings, "manifest.csv") if encodings else None
    loader = DataLoader(CachedImages(arrays, rows, metadata=metadata), batch_size=batch_size, collate_fn=batched)

    def inputs(batch: Any) -> Any:
        if isinstance(batch, tuple):
            return normalise(batch[0].to(device)), batch[1].to(device)
        return normalise(batch.to(device))

    return network, loader, inputs


def predict_split(
    checkpoint: dict[str, Any],
    arrays: SplitArrays,
    batch_size: int,
    device: torch.device,
    tta: bool = False,
    rows: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Labels and the checkpoint's probabilities (softmax, or sigmoid for multi-label models; averaged over the
    training recipe's flips with `tta`) for `rows` of a split (all by default)."""
    network, loader, inputs = checkpoint_loader(checkpoint, arrays, batch_size, device, rows)
    views = tta_views(checkpoint) if tta else None
    multi_label = checkpoint.get("task") == "multi_label"
    labels, _, probabilities = predict_batches(network, loader, inputs, views, multi_label=multi_label)
    return labels, probabilities


def load_checkpoint(model: str, scratch: Path) -> dict[str, Any]:
    """The checkpoint dict behind `model`: a file, a training run's best checkpoint, or a logged model's."""
    if Path(model).is_file():
        path = Path(model)
    elif RUN_ID.fullmatch(model):
        path = tracking.download_artifact(model, f"checkpoints/{BEST}", scratch)  # a fold's: it logs no model
        if path is None:  # a finished run keeps its weights only in its logged model
            try:
                path = _logged_checkpoint(f"runs:/{model}/model", scratch)
            except UserError:
                unlogged = f"run {model} has no checkpoints/{BEST} nor model"
                raise UserError(f"{unlogged}; pass a checkpoint file or a model URI") from None
    elif ":/" in model:
        path = _logged_checkpoint(model, scratch)
    else:
        raise UserError(f"{model}: not a checkpoint file, run id or MLflow model URI (models:/NAME@alias, runs:/...)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"{model}: not a checkpoint written by `classifier train` ({type(error).__name__})") from error


def _logged_checkpoint(model_uri: str, scratch: Path) -> Path:
    """The checkpoint file inside the logged model at `model_uri`."""
    found = sorted(tracking.download_model(model_uri, scratch).rglob("*.pt"))
    if not found:
        raise UserError(
            f"{model_uri}: holds no checkpoint (.pt); pass a checkpoint file or a model logged by `classifier train`"
        )
    return found[0]
