"""The binary decision threshold, checked against a PR curve worked out by hand."""

import pytest

from classifier.errors import UserError
from classifier.threshold import choose_threshold

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


def test_default_threshold_maximises_f1():
    assert choose_threshold(Y_TRUE, SCORES) == pytest.approx(0.3)


@pytest.mark.parametrize(("target_recall", "expected"), [(0.7, 0.5), (0.95, 0.3), (0.5, 0.5), (0.25, 0.8)])
def test_target_recall_picks_the_most_precise_threshold_reaching_it(target_recall, expected):
    assert choose_threshold(Y_TRUE, SCORES, target_recall=target_recall) == pytest.approx(expected)


def test_threshold_needs_both_classes_and_a_valid_recall():
    with pytest.raises(UserError, match="both classes"):
        choose_threshold([1, 1, 1], [0.2, 0.5, 0.9])
    with pytest.raises(UserError, match="target_recall=1.5"):
        choose_threshold(Y_TRUE, SCORES, target_recall=1.5)
