"""Classification metrics from labels and predicted probabilities (sklearn), and bootstrap confidence intervals."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
from sklearn import metrics
from sklearn.preprocessing import label_binarize

from classifier.measure.calibration import calibration_metrics

FIXED_LEVELS = (0.90, 0.95)  # the specificities (and sensitivities) at which the other is read off the ROC curve
OPERATING_POINTS = (
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    *(f"sensitivity_at_specificity_{level:.2f}" for level in FIXED_LEVELS),
    *(f"specificity_at_sensitivity_{level:.2f}" for level in FIXED_LEVELS),
)
BOOTSTRAPPED = ("accuracy", "roc_auc", "macro_f1", "balanced_accuracy", *OPERATING_POINTS)
Thresholds = float | list[float] | np.ndarray | None  # a binary model's threshold, a multi-label model's per class


def classification_metrics(
    labels: np.ndarray,
    probabilities: np.ndarray,
    classes: list[str],
    thresholds: Thresholds = None,
    positive: int | None = None,
) -> dict[str, float]:
    """accuracy, balanced_accuracy, macro_f1, roc_auc, pr_auc (one-vs-rest macro for >2 classes), recall_<class>,
    ece, brier and log_loss (see `calibration.calibration_metrics`), with the model's decisions (see `decisions`; a
    binary model's threshold applies to its `positive` class, the second by default); two classes also get the
    `operating_points` of the positive class.

    A class without images in `labels` (see `absent_classes`) is left out, not scored 0: its recall is nan, and
    balanced accuracy, macro F1 and the AUCs average over the classes present. Multi-label data (`labels` an N x C
    multi-hot matrix) get `multilabel_metrics` at `thresholds` (0.5 by default).
    """
    labels = np.asarray(labels)
    if labels.ndim == 2:
        return multilabel_metrics(labels, probabilities, classes, thresholds)
    predictions = decisions(probabilities, False, thresholds, positive)
    # zero_division=nan: the recall of a class without images is undefined, not 0 (a present class never divides by 0)
    recalls = metrics.recall_score(
        labels, predictions, labels=list(range(len(classes))), average=None, zero_division=np.nan
    )
    result = {
        "accuracy": metrics.accuracy_score(labels, predictions),
        "balanced_accuracy": np.nanmean(recalls),  # as balanced_accuracy_score: the mean recall of the classes present
        "macro_f1": macro_f1(labels, predictions),
        "roc_auc": roc_auc(labels, probabilities, positive),
        "pr_auc": pr_auc(labels, probabilities, positive),
    }
    result.update({f"recall_{name}": recall for name, recall in zip(classes, recalls, strict=True)})
    if len(classes) == 2:
        positive = 1 if positive is None else positive
        result.update(operating_points(labels == positive, probabilities[:, positive], predictions == positive))
    result.update(calibration_metrics(labels, probabilities, positive))
    return {name: float(value) for name, value in result.items()}


def operating_points(truth: np.ndarray, scores: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """What a binary model's decisions mean clinically: sensitivity (recall of the positive class), specificity,
    PPV and NPV of the `predicted` positives (nan where a ratio has no cases), and from the ROC curve of `scores` the
    best sensitivity reached at specificity >= each of FIXED_LEVELS and the best specificity at sensitivity >= each
    (what other thresholds would have given; nan without both classes)."""
    truth, predicted = np.asarray(truth, dtype=bool), np.asarray(predicted, dtype=bool)
    tp, fn = np.sum(truth & predicted), np.sum(truth & ~predicted)
    fp, tn = np.sum(~truth & predicted), np.sum(~truth & ~predicted)
    result = {
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
    }
    if truth.all() or not truth.any():
        return {**result, **dict.fromkeys(OPERATING_POINTS[len(result) :], float("nan"))}
    false_positive_rate, sensitivity, _ = metrics.roc_curve(truth, scores, drop_intermediate=False)
    specificity = 1.0 - false_positive_rate
    for level in FIXED_LEVELS:  # the tolerance keeps 1 - 0.1 at specificity 0.90
        result[f"sensitivity_at_specificity_{level:.2f}"] = float(sensitivity[specificity >= level - 1e-12].max())
        result[f"specificity_at_sensitivity_{level:.2f}"] = float(specificity[sensitivity >= level - 1e-12].max())
    return result


def _ratio(numerator: int, denominator: int) -> float:
    return float(numerator / denominator) if denominator else float("nan")


def multilabel_metrics(
    labels: np.ndarray, probabilities: np.ndarray, classes: list[str], thresholds: Thresholds = None
) -> dict[str, float]:
    """accuracy (every label of an image right), hamming_accuracy, macro/micro/samples F1, macro ROC and PR AUC, ece
    and brier over every (image, class) cell, and per class f1_<class>, roc_auc_<class>, pr_auc_<class>.

    A class without positives in the split is left out: its F1 is nan and macro F1 averages the classes present;
    its AUCs (and those of a class present in every image) are nan and left out of the macro AUCs."""
    predictions = decisions(probabilities, True, thresholds)
    present = present_classes(labels)
    # zero_division=0 only where F1 is undefined: a class never present nor predicted (set to nan below), or for
    # micro/samples F1 an image with no label and none predicted, which prepare never writes (it refuses them)
    f1s = metrics.f1_score(labels, predictions, average=None, zero_division=0)
    result = {
        "accuracy": metrics.accuracy_score(labels, predictions),
        "hamming_accuracy": 1.0 - metrics.hamming_loss(labels, predictions),
        "macro_f1": macro_f1(labels, predictions),
        "micro_f1": metrics.f1_score(labels, predictions, average="micro", zero_division=0),
        "samples_f1": metrics.f1_score(labels, predictions, average="samples", zero_division=0),
        "roc_auc": roc_auc(labels, probabilities),
        "pr_auc": pr_auc(labels, probabilities),
    }
    for index, name in enumerate(classes):
        column = labels[:, index]
        both = 0 < column.sum() < len(column)
        result[f"f1_{name}"] = f1s[index] if index in present else np.nan
        result[f"roc_auc_{name}"] = metrics.roc_auc_score(column, probabilities[:, index]) if both else np.nan
        result[f"pr_auc_{name}"] = metrics.average_precision_score(column, probabilities[:, index]) if both else np.nan
    result.update(calibration_metrics(labels, probabilities))
    return {name: float(value) for name, value in result.items()}


def present_classes(labels: np.ndarray) -> list[int]:
    """The indices of the classes `labels` hold (multi-hot labels: the classes with at least one positive)."""
    labels = np.asarray(labels)
    if labels.ndim == 2:
        return np.flatnonzero(labels.sum(axis=0) > 0).tolist()
    return np.unique(labels).astype(int).tolist()


def absent_classes(labels: np.ndarray, classes: list[str]) -> list[str]:
    """The classes without any image in `labels` (multi-label: without a positive), which the metrics leave out."""
    present = set(present_classes(labels))
    return [name for index, name in enumerate(classes) if index not in present]


def macro_f1(labels: np.ndarray, predictions: np.ndarray) -> float:
    """The mean F1 of the classes present in `labels` (`labels=` them): a class absent from a split (or a bootstrap
    resample) has no F1 to average, rather than an F1 of 0. Predicting an absent class still costs: single-label,
    as a miss of the image's true class; multi-label, in accuracy, hamming accuracy and micro F1."""
    present = present_classes(labels)
    if not present:
        return float("nan")
    return float(metrics.f1_score(labels, predictions, labels=present, average="macro"))


def decisions(
    probabilities: np.ndarray, multi_label: bool, thresholds: Thresholds = None, positive: int | None = None
) -> np.ndarray:
    """What the model predicts: multi-hot rows, each class at its threshold (0.5 by default), for multi-label data;
    for two classes with a threshold, the `positive` class (the second by default) when its probability reaches it;
    else the argmax class. `thresholds` may also hold one threshold (one row of them) per image."""
    if multi_label:
        return (probabilities >= (0.5 if thresholds is None else np.asarray(thresholds, dtype=float))).astype(int)
    if thresholds is not None and probabilities.shape[1] == 2:
        positive = 1 if positive is None else positive
        chosen = probabilities[:, positive] >= np.asarray(thresholds, dtype=float)
        return np.where(chosen, positive, 1 - positive)
    return probabilities.argmax(axis=1)


def roc_auc(labels: np.ndarray, probabilities: np.ndarray, positive: int | None = None) -> float:
    """ROC AUC of the positive class (binary) or one-vs-rest macro; nan when only one class is present."""
    return _ranking_score(metrics.roc_auc_score, labels, probabilities, positive)


def pr_auc(labels: np.ndarray, probabilities: np.ndarray, positive: int | None = None) -> float:
    """Average precision of the positive class (binary) or the macro mean over classes present."""
    return _ranking_score(metrics.average_precision_score, labels, probabilities, positive)


def _ranking_score(
    score: Callable[..., float], labels: np.ndarray, probabilities: np.ndarray, positive: int | None = None
) -> float:
    """`score` of the `positive` class (binary; the second by default), its one-vs-rest macro mean over the classes
    present, or (multi-hot labels) its macro mean over the classes with both positives and negatives."""
    if labels.ndim == 2:
        both = (labels.sum(axis=0) > 0) & (labels.sum(axis=0) < len(labels))
        return float(score(labels[:, both], probabilities[:, both], average="macro")) if both.any() else float("nan")
    present = np.unique(labels)
    if len(present) < 2:
        return float("nan")
    if probabilities.shape[1] == 2:
        positive = 1 if positive is None else positive
        return float(score(labels == positive, probabilities[:, positive]))
    onehot = label_binarize(labels, classes=range(probabilities.shape[1]))[:, present]
    return float(score(onehot, probabilities[:, present], average="macro"))


def bootstrap_intervals(
    labels: np.ndarray,
    probabilities: np.ndarray,
    classes: list[str],
    resamples: int = 1000,
    seed: int = 0,
    thresholds: Thresholds = None,
    positive: int | None = None,
    groups: np.ndarray | list[str] | None = None,
) -> dict[str, tuple[float, float]]:
    """Percentile 95% intervals of accuracy, ROC AUC and macro F1 (and, single-label, balanced accuracy; two
    classes, the `operating_points` of the `positive` class) over `resamples` resamplings of the images, or of the
    `groups` (patients, lesions: one name per image, "" an image of its own) with all their images when given.

    Each resample scores the classes it holds, as `classification_metrics` does: one that misses a rare class has
    that class left out of its macro F1 and AUC, not counted as 0; resamples where a metric is nan are left out of
    its interval."""
    rng = np.random.default_rng(seed)
    scores: dict[str, list[float]] = {name: [] for name in BOOTSTRAPPED}
    multi_label = labels.ndim == 2
    predictions = decisions(probabilities, multi_label, thresholds, positive)
    binary = len(classes) == 2 and not multi_label
    positive = 1 if positive is None else positive
    draw = resampler(len(labels), groups)
    for _ in range(resamples):
        sample = draw(rng)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scores["accuracy"].append(metrics.accuracy_score(labels[sample], predictions[sample]))
            scores["roc_auc"].append(roc_auc(labels[sample], probabilities[sample], positive))
            scores["macro_f1"].append(macro_f1(labels[sample], predictions[sample]))
            if not multi_label:
                scores["balanced_accuracy"].append(metrics.balanced_accuracy_score(labels[sample], predictions[sample]))
            if binary:
                truth, chosen = labels[sample] == positive, predictions[sample] == positive
                for name, value in operating_points(truth, probabilities[sample, positive], chosen).items():
                    scores[name].append(value)
    return {
        name: (float(np.nanpercentile(values, 2.5)), float(np.nanpercentile(values, 97.5)))
        for name, values in scores.items()
        if not np.isnan(values).all()  # nan in every resample (no predicted positive: PPV): no interval
    }


def resampler(count: int, groups: np.ndarray | list[str] | None = None) -> Callable[[np.random.Generator], np.ndarray]:
    """A function drawing one bootstrap resample of `count` images as row indices: `count` images with replacement,
    or, with `groups`, as many groups as there are with replacement, each with every one of its images."""
    if groups is None:
        return lambda rng: rng.integers(0, count, count)
    names = np.array([str(name) if name else f"\0{row}" for row, name in enumerate(groups)], dtype=object)
    _, codes = np.unique(names, return_inverse=True)
    order = np.argsort(codes, kind="stable")  # the rows of each group, group after group
    sizes = np.bincount(codes)
    starts = np.cumsum(sizes) - sizes

    def draw(rng: np.random.Generator) -> np.ndarray:
        chosen = rng.integers(0, len(sizes), len(sizes))
        lengths = sizes[chosen]
        within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        return order[np.repeat(starts[chosen], lengths) + within]

    return draw
