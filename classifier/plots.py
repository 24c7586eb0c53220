"""Evaluation figures and reports written as files: confusion matrices, ROC/PR curves, learning curves."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    ConfusionMatrixDisplay,
    PrecisionRecallDisplay,
    RocCurveDisplay,
    classification_report,
    multilabel_confusion_matrix,
)

from classifier.metrics import Thresholds, decisions  # noqa: E402


def write_report(
    folder: Path,
    labels: np.ndarray,
    probabilities: np.ndarray,
    classes: list[str],
    thresholds: Thresholds = None,
) -> list[Path]:
    """Confusion matrix (counts and row-normalised), ROC and PR curves, and the classification report.

    Predictions are the model's decisions at `thresholds` (see `metrics.decisions`); multi-label data (multi-hot
    `labels`) get one 2x2 confusion matrix per class.
    """
    folder.mkdir(parents=True, exist_ok=True)
    multi_label = labels.ndim == 2
    predictions = decisions(probabilities, multi_label, thresholds)
    everyone = None if multi_label else list(range(len(classes)))
    if multi_label:
        written = [per_class_confusion_png(folder / "confusion_matrix_per_class.png", labels, predictions, classes)]
    else:
        written = [
            confusion_matrix_png(folder / "confusion_matrix.png", labels, predictions, classes, None),
            confusion_matrix_png(folder / "confusion_matrix_normalised.png", labels, predictions, classes, "true"),
        ]
    if len(np.unique(labels)) > 1:
        written += [
            _curves(folder / "roc_curve.png", RocCurveDisplay, labels, probabilities, classes),
            _curves(folder / "pr_curve.png", PrecisionRecallDisplay, labels, probabilities, classes),
        ]
    report = classification_report(
        labels, predictions, labels=everyone, target_names=classes, zero_division=0, output_dict=True
    )
    (folder / "classification_report.json").write_text(json.dumps(report, indent=2) + "\n")
    text = classification_report(labels, predictions, labels=everyone, target_names=classes, zero_division=0)
    (folder / "classification_report.txt").write_text(text)
    return [*written, folder / "classification_report.json", folder / "classification_report.txt"]


def confusion_matrix_png(
    path: Path, labels: np.ndarray, predictions: np.ndarray, classes: list[str], normalize: str | None
) -> Path:
    figure, axes = plt.subplots(figsize=(2 + 0.8 * len(classes), 1.5 + 0.8 * len(classes)))
    ConfusionMatrixDisplay.from_predictions(
        labels,
        predictions,
        labels=list(range(len(classes))),
        display_labels=classes,
        normalize=normalize,
        values_format=".2f" if normalize else "d",
        ax=axes,
        colorbar=False,
        xticks_rotation=45,
    )
    axes.set_title("Confusion matrix" + (" (normalised by true class)" if normalize else " (counts)"))
    return _save(figure, path)


def per_class_confusion_png(path: Path, labels: np.ndarray, predictions: np.ndarray, classes: list[str]) -> Path:
    """Multi-label: one 2x2 matrix (absent/present) per class, from sklearn's multilabel_confusion_matrix."""
    matrices = multilabel_confusion_matrix(labels, predictions)
    columns = min(4, len(classes))
    rows = -(-len(classes) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3 * columns, 2.8 * rows), squeeze=False)
    for index, (matrix, name) in enumerate(zip(matrices, classes, strict=True)):
        display = ConfusionMatrixDisplay(matrix, display_labels=["absent", "present"])
        display.plot(ax=axes.flat[index], colorbar=False, values_format="d")
        axes.flat[index].set_title(name)
    for unused in axes.flat[len(classes) :]:
        unused.axis("off")
    return _save(figure, path)


def _curves(path: Path, display, labels: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> Path:
    """One curve for the positive class (binary) or one per class, one-vs-rest (or per label, multi-label)."""
    figure, axes = plt.subplots(figsize=(6, 5))
    shown = [1] if len(classes) == 2 and labels.ndim == 1 else range(len(classes))
    for index in shown:
        truth = labels[:, index] == 1 if labels.ndim == 2 else labels == index
        if np.any(truth) and not np.all(truth):
            display.from_predictions(truth, probabilities[:, index], name=classes[index], ax=axes)
    axes.set_title(f"{'ROC' if display is RocCurveDisplay else 'Precision-recall'} curve")
    return _save(figure, path)


def learning_curves(path: Path, history: list[dict[str, float]], monitor: str) -> Path:
    """Train/validation loss and the monitored metric per epoch."""
    epochs = [row["epoch"] for row in history]
    figure, (loss_axes, metric_axes) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("train_loss", "val_loss"):
        loss_axes.plot(epochs, [row.get(key, np.nan) for row in history], marker="o", label=key)
    loss_axes.set(xlabel="epoch", ylabel="loss", title="Loss")
    loss_axes.legend()
    for key in dict.fromkeys(("train_accuracy", "val_accuracy", monitor)):
        metric_axes.plot(epochs, [row.get(key, np.nan) for row in history], marker="o", label=key)
    metric_axes.set(xlabel="epoch", title="Metrics")
    metric_axes.legend()
    return _save(figure, path)


def tsne_png(path: Path, points: np.ndarray, labels: np.ndarray, classes: list[str]) -> Path:
    """A 2-D embedding (one row of `points` per image) as a scatter coloured by class, with a legend."""
    figure, axes = plt.subplots(figsize=(7.5, 6))
    colours = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    size = float(np.clip(3000 / max(len(points), 1), 4, 30))
    for index, name in enumerate(classes):
        shown = labels == index
        if np.any(shown):
            axes.scatter(*points[shown].T, s=size, alpha=0.7, color=colours(index % colours.N), label=name)
    axes.set(xticks=[], yticks=[], title=f"t-SNE of penultimate-layer embeddings ({len(points)} images)")
    axes.legend(loc="center left", bbox_to_anchor=(1, 0.5), markerscale=2, fontsize="small")
    return _save(figure, path)


def _save(figure: plt.Figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
