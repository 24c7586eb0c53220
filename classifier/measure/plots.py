"""Evaluation figures and reports written as files: confusion matrices, ROC/PR curves, learning curves."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from sklearn.calibration import CalibrationDisplay  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    ConfusionMatrixDisplay,
    PrecisionRecallDisplay,
    RocCurveDisplay,
    classification_report,
    multilabel_confusion_matrix,
)

from classifier.measure.calibration import BINS, calibration_pairs, expected_calibration_error  # noqa: E402
from classifier.measure.metrics import Thresholds, absent_classes, decisions, present_classes  # noqa: E402


def write_report(
    folder: Path,
    labels: np.ndarray,
    probabilities: np.ndarray,
    classes: list[str],
    thresholds: Thresholds = None,
    positive: int | None = None,
    shows: str = "",
) -> list[Path]:
    """Confusion matrix (counts and row-normalised), ROC and PR curves, reliability diagram and the classification
    report.

    Predictions are the model's decisions at `thresholds` (see `metrics.decisions`; a binary model's curves are those
    of its `positive` class, the second by default); multi-label data (multi-hot `labels`) get one 2x2 confusion
    matrix per class. `shows` says what the figures are of (the split and the model, e.g. "test split, run
    bold-cat-12"), under each title.
    """
    folder.mkdir(parents=True, exist_ok=True)
    multi_label = labels.ndim == 2
    predictions = decisions(probabilities, multi_label, thresholds, positive)
    if multi_label:
        per_class = folder / "confusion_matrix_per_class.png"
        written = [per_class_confusion_png(per_class, labels, predictions, classes, shows)]
    else:
        written = [
            confusion_matrix_png(folder / name, labels, predictions, classes, normalize, shows)
            for name, normalize in (("confusion_matrix.png", None), ("confusion_matrix_normalised.png", "true"))
        ]
    if len(np.unique(labels)) > 1:
        written += [
            _curves(folder / "roc_curve.png", RocCurveDisplay, labels, probabilities, classes, positive, shows),
            _curves(folder / "pr_curve.png", PrecisionRecallDisplay, labels, probabilities, classes, positive, shows),
        ]
    reliability = folder / "reliability_diagram.png"
    written.append(reliability_png(reliability, labels, probabilities, classes, positive, shows))
    # the classes present only, as the metrics score them: a class without images here has no recall (nor F1) to
    # report or average; zero_division=0 is then only the precision of a present class never predicted
    present = present_classes(labels)
    named = {"labels": present, "target_names": [classes[index] for index in present], "zero_division": 0}
    report = classification_report(labels, predictions, output_dict=True, **named)
    text = classification_report(labels, predictions, **named)
    absent = absent_classes(labels, classes)
    if absent:
        report["left_out"] = absent
        text += f"\nleft out (no images of them here): {', '.join(absent)}\n"
    (folder / "classification_report.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / "classification_report.txt").write_text(text)
    return [*written, folder / "classification_report.json", folder / "classification_report.txt"]


def confusion_matrix_png(
    path: Path, labels: np.ndarray, predictions: np.ndarray, classes: list[str], normalize: str | None, shows: str = ""
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
    title = "Confusion matrix" + (" (normalised by true class)" if normalize else " (counts)")
    axes.set_title(titled(title, shows, figure))
    return _save(figure, path)


def per_class_confusion_png(
    path: Path, labels: np.ndarray, predictions: np.ndarray, classes: list[str], shows: str = ""
) -> Path:
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
    figure.suptitle(titled("Confusion matrix per class", shows, figure))
    return _save(figure, path)


def _curves(
    path: Path,
    display,
    labels: np.ndarray,
    probabilities: np.ndarray,
    classes: list[str],
    positive: int | None = None,
    shows: str = "",
) -> Path:
    """One curve for the positive class (binary) or one per class, one-vs-rest (or per label, multi-label)."""
    figure, axes = plt.subplots(figsize=(6, 5))
    shown = [1 if positive is None else positive] if len(classes) == 2 and labels.ndim == 1 else range(len(classes))
    for index in shown:
        truth = labels[:, index] == 1 if labels.ndim == 2 else labels == index
        if np.any(truth) and not np.all(truth):
            display.from_predictions(truth, probabilities[:, index], name=classes[index], ax=axes)
    axes.set_title(titled(f"{'ROC' if display is RocCurveDisplay else 'Precision-recall'} curve", shows, figure))
    return _save(figure, path)


def reliability_png(
    path: Path,
    labels: np.ndarray,
    probabilities: np.ndarray,
    classes: list[str],
    positive: int | None = None,
    shows: str = "",
) -> Path:
    """Observed frequency against mean predicted probability in BINS equal-width bins (scikit-learn's
    CalibrationDisplay) of what `calibration.calibration_pairs` compares, with the expected calibration error."""
    outcomes, predicted = calibration_pairs(labels, probabilities, positive)
    if labels.ndim == 2:
        what = "P(class present), every class"
    elif len(classes) == 2:
        what = f"P({classes[1 if positive is None else positive]})"
    else:
        what = "top-class confidence"
    figure, axes = plt.subplots(figsize=(6, 5))
    ece = expected_calibration_error(outcomes, predicted)
    CalibrationDisplay.from_predictions(outcomes, predicted, n_bins=BINS, ax=axes, name=f"{what}, ECE {ece:.3f}")
    axes.set_title(titled("Reliability diagram", shows, figure))
    return _save(figure, path)


def learning_curves(path: Path, history: list[dict[str, float]], monitor: str, shows: str = "") -> Path:
    """Train/validation loss and the monitored metric per epoch (counted from 1, as the progress bar does)."""
    epochs = [row["epoch"] + 1 for row in history]
    figure, (loss_axes, metric_axes) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("train_loss", "val_loss"):
        loss_axes.plot(epochs, [row.get(key, np.nan) for row in history], marker="o", label=key)
    loss_axes.set(xlabel="epoch", ylabel="loss", title="Loss")
    loss_axes.legend()
    for key in dict.fromkeys(("train_accuracy", "val_accuracy", monitor)):
        metric_axes.plot(epochs, [row.get(key, np.nan) for row in history], marker="o", label=key)
    metric_axes.set(xlabel="epoch", title="Metrics")
    metric_axes.legend()
    for axes in (loss_axes, metric_axes):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    if shows:
        figure.suptitle(shows)
    return _save(figure, path)


def tsne_png(
    path: Path,
    points: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    shows: str = "",
    silhouette: float | None = None,
) -> Path:
    """A 2-D embedding (one row of `points` per image) as a scatter coloured by class, with a legend; the title
    names what it shows (split and model) and the embeddings' silhouette score by class."""
    figure, axes = plt.subplots(figsize=(7.5, 6))
    colours = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    size = float(np.clip(3000 / max(len(points), 1), 4, 30))
    for index, name in enumerate(classes):
        shown = labels == index
        if np.any(shown):
            axes.scatter(*points[shown].T, s=size, alpha=0.7, color=colours(index % colours.N), label=name)
    title = f"t-SNE of penultimate-layer embeddings ({len(points)} images)"
    if silhouette is not None:
        title += f", silhouette {silhouette:.3f}"
    axes.set(xticks=[], yticks=[], title=titled(title, shows, figure))
    axes.legend(loc="center left", bbox_to_anchor=(1, 0.5), markerscale=2, fontsize="small")
    return _save(figure, path)


def titled(title: str, shows: str, figure: plt.Figure) -> str:
    """`title`, with what the figure shows (split, model) below it, wrapped to the figure's width (a long model
    path or URI would be cut off at the edges)."""
    if not shows:
        return title
    return "\n".join([title, *textwrap.wrap(shows, width=max(20, int(figure.get_figwidth() * 7)))])


def _save(figure: plt.Figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
