"""Metrics, bootstrap intervals, class weights and losses against sklearn / PyTorch on known predictions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn import metrics

from classifier.losses import FocalLoss, class_weights, make_criterion
from classifier.metrics import bootstrap_intervals, classification_metrics


def test_binary_metrics_match_sklearn() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    positive = np.clip(labels * 0.3 + rng.uniform(0, 0.7, 200), 0, 1)
    probabilities = np.stack([1 - positive, positive], axis=1)
    predictions = probabilities.argmax(1)

    result = classification_metrics(labels, probabilities, ["normal", "pneumonia"])

    assert result["accuracy"] == pytest.approx(metrics.accuracy_score(labels, predictions))
    assert result["balanced_accuracy"] == pytest.approx(metrics.balanced_accuracy_score(labels, predictions))
    assert result["macro_f1"] == pytest.approx(metrics.f1_score(labels, predictions, average="macro"))
    assert result["roc_auc"] == pytest.approx(metrics.roc_auc_score(labels, positive))
    assert result["pr_auc"] == pytest.approx(metrics.average_precision_score(labels, positive))
    recalls = metrics.recall_score(labels, predictions, average=None)
    assert [result["recall_normal"], result["recall_pneumonia"]] == pytest.approx(list(recalls))


def test_multiclass_metrics_match_sklearn_one_vs_rest() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 300)
    logits = rng.normal(size=(300, 3)) + np.eye(3)[labels] * 1.5
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)

    result = classification_metrics(labels, probabilities, ["a", "b", "c"])

    assert result["roc_auc"] == pytest.approx(metrics.roc_auc_score(labels, probabilities, multi_class="ovr"))
    onehot = np.eye(3)[labels]
    assert result["pr_auc"] == pytest.approx(metrics.average_precision_score(onehot, probabilities, average="macro"))
    assert result["macro_f1"] == pytest.approx(metrics.f1_score(labels, probabilities.argmax(1), average="macro"))


def test_bootstrap_intervals_bracket_the_estimate_and_shrink_with_more_images() -> None:
    rng = np.random.default_rng(2)

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 2, n)
        positive = np.clip(labels * 0.4 + rng.uniform(0, 0.6, n), 0, 1)
        return labels, np.stack([1 - positive, positive], axis=1)

    small, large = sample(100), sample(800)
    widths = []
    for labels, probabilities in (small, large):
        point = classification_metrics(labels, probabilities, ["a", "b"])
        intervals = bootstrap_intervals(labels, probabilities, ["a", "b"], resamples=100, seed=0)
        for name, (low, high) in intervals.items():
            assert low <= point[name] <= high, name
        widths.append(intervals["accuracy"][1] - intervals["accuracy"][0])
    assert widths[1] < widths[0] / 2  # about 1/sqrt(8)


def test_class_weights_follow_inverse_counts() -> None:
    weights = class_weights(np.array([100, 300, 50]))

    assert weights.tolist() == pytest.approx([450 / (3 * 100), 450 / (3 * 300), 450 / (3 * 50)])
    assert class_weights(np.array([7, 7])).tolist() == [1.0, 1.0]
    criterion = make_criterion("cross_entropy", np.array([100, 300, 50]), True, 0.0, 2.0)
    assert torch.equal(criterion.weight, weights)


def test_focal_loss_is_cross_entropy_at_gamma_zero_and_down_weights_easy_examples() -> None:
    logits = torch.tensor([[4.0, -4.0], [0.2, 0.1], [-1.0, 1.0]])
    targets = torch.tensor([0, 0, 1])

    assert FocalLoss(gamma=0.0)(logits, targets) == pytest.approx(torch.nn.functional.cross_entropy(logits, targets))
    easy, hard = logits[:1], logits[1:2]
    ratio_easy = FocalLoss(2.0)(easy, targets[:1]) / torch.nn.functional.cross_entropy(easy, targets[:1])
    ratio_hard = FocalLoss(2.0)(hard, targets[:1]) / torch.nn.functional.cross_entropy(hard, targets[:1])
    assert ratio_easy < 1e-5 < ratio_hard < 1
