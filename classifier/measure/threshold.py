"""Decision thresholds chosen on the validation split by a rule (max F1, Youden, balanced, a target recall or
specificity): the positive class of a binary classifier, or each class of a multi-label one."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import precision_recall_curve, roc_curve

from classifier.config import DEFAULT_THRESHOLD_RULE, ThresholdRule
from classifier.errors import UserError

FEW_IMAGES = 30  # validation images of a class (or without it) below which a tuned threshold is noisy


def choose_threshold(y_true: ArrayLike, scores: ArrayLike, rule: str | ThresholdRule = DEFAULT_THRESHOLD_RULE) -> float:
    """The probability of the positive class from which to predict it, chosen by `rule` (see `ThresholdRule`).

    `y_true` holds 1 for the positive class (the model's `positive_class`) and 0 otherwise, `scores` its predicted
    probabilities. `youden` and `balanced` depend on sensitivity and specificity only, so they hold when the next
    patients' prevalence differs from validation's; `max_f1` and `recall:R` (the highest such threshold on ties)
    depend on precision, hence on validation's prevalence. Ties go to the higher threshold.
    """
    rule = rule if isinstance(rule, ThresholdRule) else ThresholdRule.parse(rule)
    y_true = np.asarray(y_true).astype(int).ravel()
    scores = np.asarray(scores, dtype=float).ravel()
    if np.unique(y_true).size != 2:
        raise UserError("validation split: a decision threshold needs both classes in it; add images of each class")
    if rule.name in ("max_f1", "recall"):
        return _precision_recall_threshold(y_true, scores, rule)
    false_positive_rate, sensitivity, thresholds = roc_curve(y_true, scores, drop_intermediate=False)
    # The first point (nothing called positive) has threshold inf; the others ascend in sensitivity.
    specificity, sensitivity, thresholds = 1 - false_positive_rate[1:], sensitivity[1:], thresholds[1:]
    if rule.name == "youden":
        return float(thresholds[np.argmax(sensitivity + specificity)])
    if rule.name == "balanced":
        return float(thresholds[np.argmin(np.abs(sensitivity - specificity))])
    reaching = specificity >= rule.target
    if not reaching.any():  # even the highest score is a negative's: call nothing positive
        return float(np.nextafter(scores.max(), np.inf))
    return float(thresholds[np.flatnonzero(reaching)[-1]])  # the most sensitive threshold reaching it


def _precision_recall_threshold(y_true: np.ndarray, scores: np.ndarray, rule: ThresholdRule) -> float:
    """max_f1, or the most precise threshold reaching recall R."""
    precision, recall, thresholds = precision_recall_curve(y_true, scores)
    # The last point (precision 1, recall 0) has no threshold; thresholds ascend, so reversing prefers higher ones.
    precision, recall = precision[:-1][::-1], recall[:-1][::-1]
    thresholds = thresholds[::-1]
    if rule.name == "max_f1":
        denominator = precision + recall
        f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
        return float(thresholds[np.argmax(f1)])
    reaching = recall >= rule.target  # the lowest threshold reaches recall 1, so some always do
    return float(thresholds[np.argmax(np.where(reaching, precision, -1.0))])


def choose_thresholds(
    labels: np.ndarray,
    probabilities: np.ndarray,
    rule: str | ThresholdRule = DEFAULT_THRESHOLD_RULE,
    default: float = 0.5,
) -> list[float]:
    """Per-class thresholds of a multi-label model, each chosen on its own column as `choose_threshold` does; a class
    without both positives and negatives in the validation split keeps `default`."""
    labels = np.asarray(labels)
    return [
        choose_threshold(labels[:, index], probabilities[:, index], rule)
        if 0 < labels[:, index].sum() < len(labels)
        else default
        for index in range(labels.shape[1])
    ]


def prevalence(labels: ArrayLike) -> float | list[float]:
    """The share of positives among `labels` (1 for the positive class, else 0), or per column of multi-hot labels:
    beside a threshold it says what mix of patients the threshold was tuned on."""
    labels = np.asarray(labels, dtype=float)
    return float(labels.mean()) if labels.ndim == 1 else labels.mean(axis=0).tolist()


def few_images_warning(labels: ArrayLike, classes: list[str], thresholds: float | list[float]) -> str | None:
    """A warning line, naming the counts, when `thresholds` were tuned on fewer than FEW_IMAGES validation images of
    either class (binary `labels`), or of images with or without a class (multi-hot `labels`); else None."""
    labels = np.asarray(labels).astype(int)
    advice = "it moves with a few images: use a larger validation split, or check it on the test split"
    if labels.ndim == 1:
        counts = np.bincount(labels, minlength=2)
        if counts.min() >= FEW_IMAGES:
            return None
        return (
            f"warning: decision threshold {thresholds:.4g} tuned on {len(labels)} validation images ({counts[0]} "
            f"{classes[0]}, {counts[1]} {classes[1]}), fewer than {FEW_IMAGES} of a class; {advice}"
        )
    positives = labels.sum(axis=0)
    thin = [
        f"{name} ({with_it} with, {len(labels) - with_it} without)"
        for name, with_it in zip(classes, positives, strict=True)
        if 0 < with_it < len(labels) and min(with_it, len(labels) - with_it) < FEW_IMAGES
    ]
    if not thin:
        return None
    return (
        f"warning: decision thresholds tuned on fewer than {FEW_IMAGES} validation images with or without the class: "
        f"{', '.join(thin)}; {advice.replace('it moves', 'they move')}"
    )
