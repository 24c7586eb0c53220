"""Decision thresholds chosen on the validation split from precision-recall curves: the positive class of a binary
classifier, or each class of a multi-label one."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import precision_recall_curve

from classifier.errors import UserError


def choose_threshold(y_true: ArrayLike, scores: ArrayLike, target_recall: float | None = None) -> float:
    """The probability of the positive class from which to predict it.

    `y_true` holds 1 for the positive (second) class and 0 otherwise, `scores` its predicted probabilities. By default
    the threshold maximises F1; with `target_recall` (screening, e.g. 0.95) it is the one with the best precision
    among those reaching that recall (the highest such threshold on ties).
    """
    y_true = np.asarray(y_true).astype(int).ravel()
    if np.unique(y_true).size != 2:
        raise UserError("validation split: a decision threshold needs both classes in it; add images of each class")
    if target_recall is not None and not 0 < target_recall <= 1:
        raise UserError(f"target_recall={target_recall}: must be in (0, 1], e.g. 0.95")
    precision, recall, thresholds = precision_recall_curve(y_true, np.asarray(scores, dtype=float).ravel())
    # The last point (precision 1, recall 0) has no threshold; thresholds ascend, so reversing prefers higher ones.
    precision, recall = precision[:-1][::-1], recall[:-1][::-1]
    thresholds = thresholds[::-1]
    if target_recall is None:
        denominator = precision + recall
        f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
        return float(thresholds[np.argmax(f1)])
    reaching = recall >= target_recall  # the lowest threshold reaches recall 1, so some always do
    return float(thresholds[np.argmax(np.where(reaching, precision, -1.0))])


def choose_thresholds(
    labels: np.ndarray, probabilities: np.ndarray, target_recall: float | None = None, default: float = 0.5
) -> list[float]:
    """Per-class thresholds of a multi-label model, each chosen on its own column as `choose_threshold` does; a class
    without both positives and negatives in the validation split keeps `default`."""
    labels = np.asarray(labels)
    return [
        choose_threshold(labels[:, index], probabilities[:, index], target_recall)
        if 0 < labels[:, index].sum() < len(labels)
        else default
        for index in range(labels.shape[1])
    ]
