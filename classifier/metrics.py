"""Classification metrics from labels and predicted probabilities (sklearn), and bootstrap confidence intervals."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
from sklearn import metrics
from sklearn.preprocessing import label_binarize

BOOTSTRAPPED = ("accuracy", "roc_auc", "macro_f1")


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> dict[str, float]:
    """accuracy, balanced_accuracy, macro_f1, roc_auc, pr_auc (one-vs-rest macro for >2 classes), recall_<class>."""
    labels = np.asarray(labels)
    predictions = probabilities.argmax(axis=1)
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


def roc_auc(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """ROC AUC of the positive class (binary) or one-vs-rest macro; nan when only one class is present."""
    return _ranking_score(metrics.roc_auc_score, labels, probabilities)


def pr_auc(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Average precision of the positive class (binary) or the macro mean over classes present."""
    return _ranking_score(metrics.average_precision_score, labels, probabilities)


def _ranking_score(score: Callable[..., float], labels: np.ndarray, probabilities: np.ndarray) -> float:
    """`score` of the positive class (binary) or its one-vs-rest macro mean over the classes present."""
    present = np.unique(labels)
    if len(present) < 2:
        return float("nan")
    if probabilities.shape[1] == 2:
        return float(score(labels, probabilities[:, 1]))
    onehot = label_binarize(labels, classes=range(probabilities.shape[1]))[:, present]
    return float(score(onehot, probabilities[:, present], average="macro"))


def bootstrap_intervals(
    labels: np.ndarray, probabilities: np.ndarray, classes: list[str], resamples: int = 1000, seed: int = 0
) -> dict[str, tuple[float, float]]:
    """Percentile 95% intervals of accuracy, ROC AUC and macro F1 over `resamples` resamplings of the images."""
    rng = np.random.default_rng(seed)
    scores: dict[str, list[float]] = {name: [] for name in BOOTSTRAPPED}
    predictions = probabilities.argmax(axis=1)
    everyone = list(range(len(classes)))
    for _ in range(resamples):
        sample = rng.integers(0, len(labels), len(labels))
        scores["accuracy"].append(float(np.mean(predictions[sample] == labels[sample])))
        scores["roc_auc"].append(roc_auc(labels[sample], probabilities[sample]))
        scores["macro_f1"].append(
            metrics.f1_score(labels[sample], predictions[sample], labels=everyone, average="macro", zero_division=0)
        )
    return {
        name: (float(np.nanpercentile(values, 2.5)), float(np.nanpercentile(values, 97.5)))
        for name, values in scores.items()
    }
