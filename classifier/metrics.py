"""Classification metrics from labels and predicted probabilities (sklearn), and bootstrap confidence intervals."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
from sklearn import metrics
from sklearn.preprocessing import label_binarize

BOOTSTRAPPED = ("accuracy", "roc_auc", "macro_f1")
Thresholds = float | list[float] | np.ndarray | None  # a binary model's threshold, a multi-label model's per class


def classification_metrics(
    labels: np.ndarray, probabilities: np.ndarray, classes: list[str], thresholds: Thresholds = None
) -> dict[str, float]:
    """accuracy, balanced_accuracy, macro_f1, roc_auc, pr_auc (one-vs-rest macro for >2 classes), recall_<class>,
    with the model's decisions (see `decisions`; a binary model's threshold applies).

    Multi-label data (`labels` an N x C multi-hot matrix) get `multilabel_metrics` at `thresholds` (0.5 by default).
    """
    labels = np.asarray(labels)
    if labels.ndim == 2:
        return multilabel_metrics(labels, probabilities, classes, thresholds)
    predictions = decisions(probabilities, False, thresholds)
    everyone = list(range(len(classes)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a class absent from a small split: sklearn warns, we report 0 or nan
        result = {
            "accuracy": metrics.accuracy_score(labels, predictions),
            "balanced_accuracy": metrics.balanced_accuracy_score(labels, predictions),
            "macro_f1": metrics.f1_score(labels, predictions, labels=everyone, average="macro", zero_division=0),
            "roc_auc": roc_auc(labels, probabilities),
            "pr_auc": pr_auc(labels, probabilities),
        }
        recalls = metrics.recall_score(labels, predictions, labels=everyone, average=None, zero_division=0)
    result.update({f"recall_{name}": recall for name, recall in zip(classes, recalls, strict=True)})
    return {name: float(value) for name, value in result.items()}


def multilabel_metrics(
    labels: np.ndarray, probabilities: np.ndarray, classes: list[str], thresholds: Thresholds = None
) -> dict[str, float]:
    """accuracy (every label of an image right), hamming_accuracy, macro/micro/samples F1, macro ROC and PR AUC, and
    per class f1_<class>, roc_auc_<class>, pr_auc_<class> (nan where the split lacks a positive or a negative)."""
    predictions = decisions(probabilities, True, thresholds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = {
            "accuracy": metrics.accuracy_score(labels, predictions),
            "hamming_accuracy": 1.0 - metrics.hamming_loss(labels, predictions),
            "macro_f1": metrics.f1_score(labels, predictions, average="macro", zero_division=0),
            "micro_f1": metrics.f1_score(labels, predictions, average="micro", zero_division=0),
            "samples_f1": metrics.f1_score(labels, predictions, average="samples", zero_division=0),
            "roc_auc": roc_auc(labels, probabilities),
            "pr_auc": pr_auc(labels, probabilities),
        }
        f1s = metrics.f1_score(labels, predictions, average=None, zero_division=0)
    for index, name in enumerate(classes):
        column = labels[:, index]
        both = 0 < column.sum() < len(column)
        result[f"f1_{name}"] = f1s[index]
        result[f"roc_auc_{name}"] = metrics.roc_auc_score(column, probabilities[:, index]) if both else np.nan
        result[f"pr_auc_{name}"] = metrics.average_precision_score(column, probabilities[:, index]) if both else np.nan
    return {name: float(value) for name, value in result.items()}


def decisions(probabilities: np.ndarray, multi_label: bool, thresholds: Thresholds = None) -> np.ndarray:
    """What the model predicts: multi-hot rows, each class at its threshold (0.5 by default), for multi-label data;
    for two classes with a threshold, the second class when its probability reaches it; else the argmax class."""
    if multi_label:
        return (probabilities >= (0.5 if thresholds is None else np.asarray(thresholds, dtype=float))).astype(int)
    if thresholds is not None and probabilities.shape[1] == 2:
        return (probabilities[:, 1] >= float(thresholds)).astype(int)
    return probabilities.argmax(axis=1)


def roc_auc(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """ROC AUC of the positive class (binary) or one-vs-rest macro; nan when only one class is present."""
    return _ranking_score(metrics.roc_auc_score, labels, probabilities)


def pr_auc(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Average precision of the positive class (binary) or the macro mean over classes present."""
    return _ranking_score(metrics.average_precision_score, labels, probabilities)


def _ranking_score(score: Callable[..., float], labels: np.ndarray, probabilities: np.ndarray) -> float:
    """`score` of the positive class (binary), its one-vs-rest macro mean over the classes present, or (multi-hot
    labels) its macro mean over the classes with both positives and negatives."""
    if labels.ndim == 2:
        both = (labels.sum(axis=0) > 0) & (labels.sum(axis=0) < len(labels))
        return float(score(labels[:, both], probabilities[:, both], average="macro")) if both.any() else float("nan")
    present = np.unique(labels)
    if len(present) < 2:
        return float("nan")
    if probabilities.shape[1] == 2:
        return float(score(labels, probabilities[:, 1]))
    onehot = label_binarize(labels, classes=range(probabilities.shape[1]))[:, present]
    return float(score(onehot, probabilities[:, present], average="macro"))


def bootstrap_intervals(
    labels: np.ndarray,
    probabilities: np.ndarray,
    classes: list[str],
    resamples: int = 1000,
    seed: int = 0,
    thresholds: Thresholds = None,
) -> dict[str, tuple[float, float]]:
    """Percentile 95% intervals of accuracy, ROC AUC and macro F1 over `resamples` resamplings of the images."""
    rng = np.random.default_rng(seed)
    scores: dict[str, list[float]] = {name: [] for name in BOOTSTRAPPED}
    multi_label = labels.ndim == 2
    predictions = decisions(probabilities, multi_label, thresholds)
    everyone = None if multi_label else list(range(len(classes)))
    for _ in range(resamples):
        sample = rng.integers(0, len(labels), len(labels))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scores["accuracy"].append(metrics.accuracy_score(labels[sample], predictions[sample]))
            scores["roc_auc"].append(roc_auc(labels[sample], probabilities[sample]))
            scores["macro_f1"].append(
                metrics.f1_score(labels[sample], predictions[sample], labels=everyone, average="macro", zero_division=0)
            )
    return {
        name: (float(np.nanpercentile(values, 2.5)), float(np.nanpercentile(values, 97.5)))
        for name, values in scores.items()
    }
