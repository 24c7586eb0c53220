"""Metrics, bootstrap intervals, class weights and losses against sklearn / PyTorch on known predictions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn import metrics
from sklearn.calibration import calibration_curve

from classifier.measure.calibration import calibration_metrics, expected_calibration_error
from classifier.measure.metrics import (
    OPERATING_POINTS,
    bootstrap_intervals,
    classification_metrics,
    decisions,
    resampler,
)
from classifier.nets.losses import FocalLoss, class_weights, make_criterion


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


def known_binary(n: int = 300, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    positive = np.clip(labels * 0.35 + rng.uniform(0, 0.65, n), 0, 1)
    return labels, np.stack([1 - positive, positive], axis=1)


@pytest.mark.parametrize("positive", [0, 1])
def test_operating_points_match_sklearn_at_the_threshold_of_either_positive_class(positive: int) -> None:
    labels, probabilities = known_binary()
    threshold = 0.4

    result = classification_metrics(labels, probabilities, ["a", "b"], threshold, positive=positive)

    predicted = np.where(probabilities[:, positive] >= threshold, positive, 1 - positive)
    negative = 1 - positive
    assert result["sensitivity"] == pytest.approx(metrics.recall_score(labels, predicted, pos_label=positive))
    assert result["specificity"] == pytest.approx(metrics.recall_score(labels, predicted, pos_label=negative))
    assert result["ppv"] == pytest.approx(metrics.precision_score(labels, predicted, pos_label=positive))
    assert result["npv"] == pytest.approx(metrics.precision_score(labels, predicted, pos_label=negative))
    assert result["balanced_accuracy"] == pytest.approx(metrics.balanced_accuracy_score(labels, predicted))
    assert result["accuracy"] == pytest.approx(metrics.accuracy_score(labels, predicted))
    truth, scores = labels == positive, probabilities[:, positive]
    assert result["roc_auc"] == pytest.approx(metrics.roc_auc_score(truth, scores))
    assert result["pr_auc"] == pytest.approx(metrics.average_precision_score(truth, scores))
    # every threshold tried by brute force, each scored by sklearn's confusion matrix
    points = []
    for cut in np.unique(np.concatenate([scores, [np.inf]])):
        tn, fp, fn, tp = metrics.confusion_matrix(truth, scores >= cut, labels=[False, True]).ravel()
        points.append((tp / (tp + fn), tn / (tn + fp)))
    for level in (0.90, 0.95):
        best_sensitivity = max(sens for sens, spec in points if spec >= level)
        best_specificity = max(spec for sens, spec in points if sens >= level)
        assert result[f"sensitivity_at_specificity_{level:.2f}"] == pytest.approx(best_sensitivity)
        assert result[f"specificity_at_sensitivity_{level:.2f}"] == pytest.approx(best_specificity)


def test_operating_points_without_cases_are_nan_not_zero() -> None:
    labels = np.zeros(5, dtype=int)
    probabilities = np.tile([0.8, 0.2], (5, 1))

    result = classification_metrics(labels, probabilities, ["normal", "cancer"], 0.5)

    assert np.isnan(result["sensitivity"]) and np.isnan(result["ppv"])
    assert result["specificity"] == 1.0 and result["npv"] == 1.0
    assert np.isnan(result["sensitivity_at_specificity_0.90"])


def test_calibration_metrics_match_sklearn() -> None:
    labels, probabilities = known_binary()

    for positive in (0, 1):
        result = classification_metrics(labels, probabilities, ["a", "b"], positive=positive)
        truth, scores = labels == positive, probabilities[:, positive]
        assert result["brier"] == pytest.approx(metrics.brier_score_loss(truth, scores))
        # ECE from sklearn's reliability curve: |observed - predicted| per bin, weighted by the bin's share
        observed, predicted = calibration_curve(truth, scores, n_bins=10)
        shares = np.bincount(np.searchsorted(np.linspace(0, 1, 11)[1:-1], scores), minlength=10)
        shares = shares[shares > 0] / len(scores)
        assert result["ece"] == pytest.approx(np.sum(shares * np.abs(observed - predicted)))

    rng = np.random.default_rng(4)
    three = rng.dirichlet([1, 1, 1], 200)
    truth = rng.integers(0, 3, 200)
    result = classification_metrics(truth, three, ["x", "y", "z"])
    assert result["brier"] == pytest.approx(np.mean(np.sum((three - np.eye(3)[truth]) ** 2, axis=1)))
    correct, confidence = three.argmax(1) == truth, three.max(1)
    observed, predicted = calibration_curve(correct, confidence, n_bins=10)
    shares = np.bincount(np.searchsorted(np.linspace(0, 1, 11)[1:-1], confidence), minlength=10)
    assert result["ece"] == pytest.approx(np.sum(shares[shares > 0] / 200 * np.abs(observed - predicted)))

    present = (rng.random((200, 3)) < 0.3).astype(int)  # multi-label: every (image, class) cell
    result = calibration_metrics(present, three)
    per_class = [metrics.brier_score_loss(present[:, index], three[:, index]) for index in range(3)]
    assert result["brier"] == pytest.approx(np.mean(per_class))
    observed, predicted = calibration_curve(present.ravel(), three.ravel(), n_bins=10)
    shares = np.bincount(np.searchsorted(np.linspace(0, 1, 11)[1:-1], three.ravel()), minlength=10)
    assert result["ece"] == pytest.approx(np.sum(shares[shares > 0] / 600 * np.abs(observed - predicted)))


def test_expected_calibration_error_by_hand() -> None:
    # bin [0.1, 0.2): predicted 0.15 twice, observed 1 of 2 -> |0.5 - 0.15| = 0.35 for 2 of 4 predictions
    # bin [0.9, 1.0]: predicted 0.95 twice, observed 2 of 2 -> |1 - 0.95| = 0.05 for 2 of 4
    assert expected_calibration_error([0, 1, 1, 1], [0.15, 0.15, 0.95, 0.95]) == pytest.approx(0.2)
    assert expected_calibration_error([1, 0], [1.0, 0.0]) == 0.0


def test_grouped_bootstrap_is_wider_than_image_bootstrap_when_groups_repeat() -> None:
    rng = np.random.default_rng(5)
    lesions, images = 40, 8
    labels = np.repeat(rng.integers(0, 2, lesions), images)
    # each lesion's images are read alike: right or wrong together, as several views of one lesion are
    right = np.repeat(rng.random(lesions) < 0.75, images)
    positive = np.where(right == (labels == 1), 0.8, 0.2) + rng.normal(0, 0.02, len(labels))
    probabilities = np.stack([1 - positive, positive], axis=1)
    groups = np.repeat([f"lesion{index}" for index in range(lesions)], images)

    by_image = bootstrap_intervals(labels, probabilities, ["a", "b"], 400, 0, 0.5)
    by_lesion = bootstrap_intervals(labels, probabilities, ["a", "b"], 400, 0, 0.5, groups=groups)

    for name in ("accuracy", "sensitivity", "specificity", "roc_auc", "macro_f1", "balanced_accuracy"):
        width_image = by_image[name][1] - by_image[name][0]
        width_lesion = by_lesion[name][1] - by_lesion[name][0]
        assert width_lesion > 1.8 * width_image, name  # about sqrt(8) wider
    point = classification_metrics(labels, probabilities, ["a", "b"], 0.5)
    assert set(OPERATING_POINTS) <= set(by_lesion)
    for name, (low, high) in by_lesion.items():
        assert low <= point[name] <= high, name


def test_a_group_resample_takes_whole_groups() -> None:
    groups = ["p1", "p1", "p1", "", "p2", "p2", ""]  # "" an image of its own
    draw = resampler(len(groups), groups)
    rng = np.random.default_rng(0)
    for _ in range(50):
        rows = draw(rng)
        drawn = [groups[row] for row in rows]
        for name in ("p1", "p2"):
            assert drawn.count(name) % groups.count(name) == 0
        assert len({groups[row] or row for row in rows}) <= 4


def test_per_image_thresholds_decide_each_row_on_the_positive_class() -> None:
    probabilities = np.array([[0.3, 0.7], [0.3, 0.7], [0.9, 0.1]])

    assert decisions(probabilities, False, np.array([0.5, 0.8, 0.5])).tolist() == [1, 0, 0]
    assert decisions(probabilities, False, 0.5, positive=0).tolist() == [1, 1, 0]
    assert decisions(probabilities, False, np.array([0.2, 0.5, 0.95]), positive=0).tolist() == [0, 1, 1]


@pytest.mark.parametrize(
    ("loss", "multi_label"), [("cross_entropy", False), ("focal", False), ("cross_entropy", True), ("focal", True)]
)
def test_class_weights_change_every_loss(loss: str, multi_label: bool) -> None:
    torch.manual_seed(0)
    logits = torch.randn(16, 3)
    if multi_label:
        targets = (torch.rand(16, 3) < torch.tensor([0.6, 0.2, 0.1])).float()
        counts, total = targets.sum(0).numpy().astype(int), 16
    else:
        targets = torch.tensor([0] * 10 + [1] * 4 + [2] * 2)
        counts, total = np.bincount(targets.numpy(), minlength=3), None

    plain = make_criterion(loss, counts, False, 0.0, 2.0, multi_label_total=total)(logits, targets)
    weighted = make_criterion(loss, counts, True, 0.0, 2.0, multi_label_total=total)(logits, targets)

    assert not torch.isclose(plain, weighted)
    if multi_label:  # the positives of rare classes weigh (negatives / positives) times more, as BCE's pos_weight
        pos_weight = torch.clamp((total - torch.tensor(counts)) / torch.tensor(counts), min=1.0).float()
        gamma = 2.0 if loss == "focal" else 0.0
        probability = logits.sigmoid()
        p_true = probability * targets + (1 - probability) * (1 - targets)
        elementwise = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        expected = (elementwise * (1 - p_true) ** gamma * (1 + (pos_weight - 1) * targets)).mean()
        assert weighted == pytest.approx(expected.item(), rel=1e-5)
