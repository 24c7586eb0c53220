"""A grid of explained images for a run: per class, the most confident right and the most confident wrong
prediction, each with its Grad-CAM overlay. Logged by training (test split) and `evaluate` (the scored split).

A handful of images, so it costs seconds; it never fails the run: a network Grad-CAM cannot explain gets a warning.
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from classifier import tracking
from classifier.data.dataset import SplitArrays
from classifier.data.layout import positive_index
from classifier.data.metadata import encode, from_plain
from classifier.data.transforms import Normalise
from classifier.errors import UserError
from classifier.measure.metrics import decisions
from classifier.model.checkpoint import network_from_checkpoint
from classifier.model.gradcam import explained_grid, grad_cam, overlay

GRID = "explained.png"
MAX_CLASSES = 8  # rows of the grid: two images each
SKIPPED = (UserError, RuntimeError, ValueError, ImportError, OSError)  # what leaves the grid out instead of the run


def choose_examples(
    labels: np.ndarray,
    probabilities: np.ndarray,
    classes: list[str],
    thresholds: Any = None,
    positive: int | None = None,
) -> list[tuple[int, int, str]]:
    """(row, class explained, title) of the most confident right and most confident wrong image of each class.

    Single-label: among the images of class c, the right one with the highest probability of c, and the wrong one
    with the highest probability of the class it was taken for. Multi-label: the true positive of c with the
    highest probability of c, and the false positive of c with the highest. Predictions are the model's decisions
    (a binary model's threshold on its `positive` class)."""
    multi_label = labels.ndim == 2
    predicted = decisions(probabilities, multi_label, thresholds, positive)
    chosen = []
    for index, name in enumerate(classes[:MAX_CLASSES]):
        if multi_label:
            truth, guess = labels[:, index] > 0.5, predicted[:, index] == 1
            score = probabilities[:, index]
            groups = [("right", truth & guess), ("wrong", ~truth & guess)]
        else:
            score = probabilities[np.arange(len(predicted)), predicted]
            groups = [
                ("right", (labels == index) & (predicted == index)),
                ("wrong", (labels == index) & (predicted != index)),
            ]
        for verdict, members in groups:
            if not members.any():
                continue
            row = int(np.flatnonzero(members)[np.argmax(score[members])])
            target = index if multi_label else int(predicted[row])
            taken = classes[target] if not multi_label else f"{name} (not labelled)" if verdict == "wrong" else name
            chosen.append((row, target, f"{verdict}: {name} -> {taken} {probabilities[row, target]:.2f}"))
    return chosen


def log_explained_grid(
    checkpoint: dict[str, Any],
    arrays: SplitArrays,
    labels: np.ndarray,
    probabilities: np.ndarray,
    device: torch.device,
    artifact_path: str = "evaluation",
) -> bool:
    """Log `artifact_path/explained.png` to the active run; warn and return False when it cannot be made."""
    try:
        classes = list(checkpoint["classes"])
        positive = positive_index(classes, checkpoint.get("positive_class"), checkpoint.get("task"))
        chosen = choose_examples(labels, probabilities, classes, checkpoint.get("threshold"), positive)
        if not chosen:
            return False
        rows = np.array([row for row, _, _ in chosen])
        images = torch.from_numpy(np.asarray(arrays.images[rows]))
        images = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        preprocessing = checkpoint["preprocessing"]
        normalise = Normalise(preprocessing["mean"], preprocessing["std"]).to(device)
        encodings = from_plain(checkpoint.get("metadata"))
        metadata = None
        if encodings:
            metadata = torch.from_numpy(encode(arrays.rows.iloc[rows], encodings, "manifest.csv")).to(device)
        network = network_from_checkpoint(checkpoint).to(device)
        heat = grad_cam(network, normalise(images.to(device)), [target for _, target, _ in chosen], metadata)
        overlays = [overlay(image, maps) for image, maps in zip(images, heat, strict=True)]
        with tempfile.TemporaryDirectory() as scratch:
            explained_grid(Path(scratch) / GRID, overlays, [title for _, _, title in chosen])
            tracking.log_artifacts(Path(scratch), artifact_path)
    except SKIPPED as error:
        return _skipped(str(checkpoint.get("architecture")), error)
    return True


def _skipped(architecture: str, error: Exception) -> bool:
    """Warn (and say on stderr) why the grid was left out; the run goes on."""
    reason = error.message if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
    message = f"explained grid skipped for {architecture}: {' '.join(reason.split())[:300]}"
    warnings.warn(message, stacklevel=3)
    print(f"warning: {message}", file=sys.stderr)
    return False


def log_test_grid(checkpoint_path: Path, data: Path, device: torch.device, batch_size: int) -> bool:
    """Training's grid: the best checkpoint's explained images of the test split (none when it is empty)."""
    from classifier.data.dataset import load_split
    from classifier.learn.inference import predict_split

    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    try:
        arrays = load_split(data, "test")
        if len(arrays.labels) == 0:
            return False
        labels, probabilities = predict_split(checkpoint, arrays, batch_size, device)
    except SKIPPED as error:
        return _skipped(str(checkpoint.get("architecture")), error)
    return log_explained_grid(checkpoint, arrays, labels, probabilities, device)
