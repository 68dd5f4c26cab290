"""The continual-learning metrics against hand-computed values."""

import pytest

from moram_cli.evaluation.cl_metrics import average_accuracy, backward_transfer, forgetting, forward_transfer

# R[i][j]: accuracy on task j after learning task i.
R = [[0.8], [0.6, 0.9], [0.5, 0.7, 0.95]]
BEFORE = [0.1, 0.2, 0.4]  # on task j just before learning it: R[j-1][j]
ZERO_SHOT = [0.1, 0.15, 0.3]


def test_average_accuracy_is_the_mean_of_the_last_row():
    result = average_accuracy(R)
    assert result["value"] == pytest.approx((0.5 + 0.7 + 0.95) / 3) and result["denominator"] == 3


def test_backward_transfer_is_gems_mean_over_the_earlier_tasks():
    result = backward_transfer(R)
    assert result["value"] == pytest.approx(((0.5 - 0.8) + (0.7 - 0.9)) / 2) and result["denominator"] == 2
    assert "1/(T-1)" in result["formula"]


def test_forward_transfer_compares_the_accuracy_before_learning_with_zero_shot():
    result = forward_transfer(BEFORE, ZERO_SHOT)
    assert result["value"] == pytest.approx(((0.2 - 0.15) + (0.4 - 0.3)) / 2) and result["denominator"] == 2


def test_forgetting_is_the_best_earlier_accuracy_minus_the_last():
    assert forgetting(R) == pytest.approx([0.8 - 0.5, 0.9 - 0.7, None])


def test_unmeasured_cells_are_skipped_and_the_denominator_says_so():
    holes = [[0.8], [None, 0.9], [0.5, None, 0.95]]
    bwt = backward_transfer(holes)
    assert (bwt["value"], bwt["denominator"]) == (pytest.approx(0.5 - 0.8), 1)
    assert average_accuracy(holes)["denominator"] == 2
    assert forgetting(holes) == pytest.approx([0.3, None, None])


def test_a_single_task_has_no_transfer_and_no_forgetting():
    assert average_accuracy([[0.7]])["value"] == 0.7
    for metric in (backward_transfer([[0.7]]), forward_transfer([0.1], [0.1])):
        assert (metric["value"], metric["denominator"]) == (None, 0)
    assert forgetting([[0.7]]) == [None]
