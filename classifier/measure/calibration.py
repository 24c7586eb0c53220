"""How far predicted probabilities are from observed frequencies (expected calibration error, Brier score, the pairs a
reliability diagram plots) and temperature scaling fitted to logits."""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_expit, log_softmax
from sklearn import metrics

BINS = 10  # equal-width probability bins of the ECE and of the reliability diagram
INVERSE_TEMPERATURES = (0.01, 100.0)  # the bracket searched by `fit_temperature` (temperatures 0.01 to 100)


def calibration_pairs(
    labels: np.ndarray, probabilities: np.ndarray, positive: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(outcome, predicted probability) per prediction: for two classes whether the image is of the `positive` class
    and that class's probability; for more classes whether the top class is right and its probability (top-label
    confidence); for multi-label data whether each class is present and its probability, every (image, class) cell."""
    labels = np.asarray(labels)
    if labels.ndim == 2:
        return labels.ravel().astype(int), probabilities.ravel()
    if probabilities.shape[1] == 2:
        positive = 1 if positive is None else positive
        return (labels == positive).astype(int), probabilities[:, positive]
    return (probabilities.argmax(axis=1) == labels).astype(int), probabilities.max(axis=1)


def expected_calibration_error(outcomes: np.ndarray, predicted: np.ndarray, bins: int = BINS) -> float:
    """Sum over equal-width bins of (share of predictions in the bin) x |observed frequency - mean prediction|, the
    bins as scikit-learn's `calibration_curve` draws them; nan without predictions."""
    outcomes, predicted = np.asarray(outcomes, dtype=float), np.asarray(predicted, dtype=float)
    if len(outcomes) == 0:
        return float("nan")
    index = np.searchsorted(np.linspace(0.0, 1.0, bins + 1)[1:-1], predicted)
    counts = np.bincount(index, minlength=bins)
    filled = counts > 0
    observed = np.bincount(index, outcomes, minlength=bins)[filled] / counts[filled]
    mean_predicted = np.bincount(index, predicted, minlength=bins)[filled] / counts[filled]
    return float(np.sum(counts[filled] * np.abs(observed - mean_predicted)) / len(outcomes))


def brier_score(labels: np.ndarray, probabilities: np.ndarray, positive: int | None = None) -> float:
    """scikit-learn's Brier score: of the positive class's probability (two classes), summed over the classes (more
    classes), or averaged over the (image, class) cells (multi-label)."""
    labels = np.asarray(labels)
    if labels.ndim == 2:
        return float(metrics.brier_score_loss(labels.ravel(), probabilities.ravel(), pos_label=1))
    if probabilities.shape[1] == 2:
        positive = 1 if positive is None else positive
        return float(metrics.brier_score_loss(labels == positive, probabilities[:, positive], pos_label=True))
    return float(metrics.brier_score_loss(labels, probabilities, labels=list(range(probabilities.shape[1]))))


def log_loss(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """scikit-learn's log-loss (the mean negative log-likelihood of the true class; multi-label: of each (image,
    class) cell). Unlike a run's val_loss it does not depend on the training loss (focal, class weights, label
    smoothing), so it ranks any two models: what a search minimises by default."""
    labels = np.asarray(labels)
    if labels.ndim == 2:
        return float(metrics.log_loss(labels.ravel(), probabilities.ravel(), labels=[0, 1]))
    probabilities = np.asarray(probabilities, dtype=np.float64)  # float32 softmax rows sum to 1 only nearly
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    return float(metrics.log_loss(labels, probabilities, labels=list(range(probabilities.shape[1]))))


def calibration_metrics(labels: np.ndarray, probabilities: np.ndarray, positive: int | None = None) -> dict[str, float]:
    """ece (expected calibration error over `calibration_pairs`), brier and log_loss."""
    outcomes, predicted = calibration_pairs(labels, probabilities, positive)
    return {
        "ece": expected_calibration_error(outcomes, predicted),
        "brier": brier_score(labels, probabilities, positive),
        "log_loss": log_loss(labels, probabilities),
    }


def fit_temperature(logits: np.ndarray, labels: np.ndarray, multi_label: bool = False) -> float:
    """The temperature T minimising the negative log-likelihood of softmax(logits / T) (sigmoid for multi-label
    data, one T for every class) on `labels`: Guo et al. 2017. The likelihood is convex in 1/T, so a bounded scalar
    search finds its minimum."""
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)

    def loss(inverse: float) -> float:
        scaled = logits * inverse
        if multi_label:
            return -float(np.mean(labels * log_expit(scaled) + (1 - labels) * log_expit(-scaled)))
        return -float(np.mean(log_softmax(scaled, axis=1)[np.arange(len(labels)), labels]))

    found = minimize_scalar(loss, bounds=INVERSE_TEMPERATURES, method="bounded", options={"xatol": 1e-6})
    return float(1.0 / found.x)
