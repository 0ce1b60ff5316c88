import math

import pytest

from mpq.additivity import additivity_check, spearman


def test_spearman_on_known_cases():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # one swapped pair of five: 1 - 6 * 2 / (5 * 24) = 0.9
    assert spearman([1, 2, 3, 4, 5], [1, 2, 4, 3, 5]) == pytest.approx(0.9)
    assert spearman([1, 1, 2], [3, 3, 4]) == pytest.approx(1.0)  # ties take average ranks
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_additivity_check_flags_weak_correlation():
    good = additivity_check([0.1, 0.2, 0.3, 0.4], [0.11, 0.19, 0.33, 0.41])
    assert not good["weak"] and good["median_relative_error"] == pytest.approx(0.075, abs=0.03)
    bad = additivity_check([0.1, 0.2, 0.3, 0.4], [0.4, 0.1, 0.3, 0.2])
    assert bad["weak"]


def test_additivity_check_of_two_configs_reports_no_correlation():
    check = additivity_check([0.1, 0.2], [0.1, 0.4])
    assert check["spearman"] is None and check["weak"] is None and check["configs"] == 2
    assert check["median_relative_error"] == 0.25  # |0.1-0.1|/0.1 = 0, |0.2-0.4|/0.4 = 0.5
