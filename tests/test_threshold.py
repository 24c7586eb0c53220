"""The binary decision threshold, checked against a PR curve worked out by hand."""

import numpy as np
import pytest

from classifier.errors import UserError
from classifier.measure.threshold import choose_threshold

# Seven validation images, sorted by score; predicting positive from threshold t gives:
#   t    predicted  TP FP  precision recall  F1
#   0.2      7       4  3    0.571    1.00   0.727
#   0.3      6       4  2    0.667    1.00   0.800  <- best F1
#   0.4      5       3  2    0.600    0.75   0.667
#   0.5      4       3  1    0.750    0.75   0.750  <- best precision with recall >= 0.7
#   0.6      3       2  1    0.667    0.50   0.571
#   0.7      2       1  1    0.500    0.25   0.333
#   0.8      1       1  0    1.000    0.25   0.400
Y_TRUE = [0, 1, 0, 1, 1, 0, 1]
SCORES = [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]


# The same images by sensitivity (of 4 positives) and specificity (of 3 negatives):
#   t    sensitivity specificity  sum
#   0.2     1.00       0.00      1.00
#   0.3     1.00       0.33      1.33
#   0.4     0.75       0.33      1.08
#   0.5     0.75       0.67      1.42  <- Youden (max sum), and the closest to sensitivity = specificity
#   0.6     0.50       0.67      1.17
#   0.7     0.25       0.67      0.92
#   0.8     0.25       1.00      1.25  <- the only threshold with specificity >= 0.9


def test_max_f1_picks_the_best_f1():
    assert choose_threshold(Y_TRUE, SCORES, "max_f1") == pytest.approx(0.3)


def test_the_default_rule_maximises_sensitivity_plus_specificity():
    assert choose_threshold(Y_TRUE, SCORES) == pytest.approx(0.5)
    assert choose_threshold(Y_TRUE, SCORES, "balanced") == pytest.approx(0.5)


@pytest.mark.parametrize(("target_recall", "expected"), [(0.7, 0.5), (0.95, 0.3), (0.5, 0.5), (0.25, 0.8)])
def test_target_recall_picks_the_most_precise_threshold_reaching_it(target_recall, expected):
    assert choose_threshold(Y_TRUE, SCORES, f"recall:{target_recall}") == pytest.approx(expected)


@pytest.mark.parametrize(("specificity", "expected"), [(0.9, 0.8), (0.6, 0.5), (0.3, 0.3)])
def test_target_specificity_picks_the_most_sensitive_threshold_reaching_it(specificity, expected):
    assert choose_threshold(Y_TRUE, SCORES, f"specificity:{specificity}") == pytest.approx(expected)


def test_youden_keeps_balanced_accuracy_where_max_f1_follows_prevalence():
    """Validation with 3 positives to 1 negative; the next patients the other way round: F1 rewards calling
    everything positive on validation, which the next (mostly negative) patients pay for."""
    rng = np.random.default_rng(0)
    negatives, positives = rng.normal(0.35, 0.12, 300), rng.normal(0.65, 0.12, 900)
    truth, scores = np.r_[np.zeros(300), np.ones(900)], np.r_[negatives, positives]
    next_truth = np.r_[np.zeros(900), np.ones(300)]
    next_scores = np.r_[rng.normal(0.35, 0.12, 900), rng.normal(0.65, 0.12, 300)]

    def next_balanced_accuracy(rule: str) -> float:
        called = next_scores >= choose_threshold(truth, scores, rule)
        return (called[next_truth == 1].mean() + (~called[next_truth == 0]).mean()) / 2

    assert next_balanced_accuracy("youden") > next_balanced_accuracy("max_f1") + 0.02


def test_threshold_needs_both_classes_and_a_valid_rule():
    with pytest.raises(UserError, match="both classes"):
        choose_threshold([1, 1, 1], [0.2, 0.5, 0.9])
    with pytest.raises(UserError, match=r"recall in 'recall:1.5' must be in \(0, 1\]"):
        choose_threshold(Y_TRUE, SCORES, "recall:1.5")
    with pytest.raises(UserError, match="unknown threshold rule 'f1'; use max_f1, youden, balanced"):
        choose_threshold(Y_TRUE, SCORES, "f1")
    with pytest.raises(UserError, match="'recall:high' needs a number"):
        choose_threshold(Y_TRUE, SCORES, "recall:high")
