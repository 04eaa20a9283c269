"""hardware/stats.py: the 95% intervals of a median and of a speedup."""
import numpy as np
import pytest

from dlas_search.hardware.stats import coverage, median_ci, ratio_ci


@pytest.mark.parametrize("n, ranks", [(6, (1, 6)), (10, (2, 9)), (20, (6, 15)), (50, (18, 33))])
def test_median_interval_uses_the_textbook_order_statistics(n, ranks):
    assert median_ci(list(range(1, n + 1))) == ranks  # samples 1..n: the ranks themselves
    assert coverage(n) >= 0.95


def test_too_few_repeats_give_the_whole_range_and_say_how_sure():
    assert median_ci([3.0, 1.0, 2.0]) == (1.0, 3.0)
    assert coverage(3) == pytest.approx(0.75)


def test_median_interval_covers_the_true_median_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    true_median = np.log(2)  # of an exponential(1): skewed, like latencies
    hits = sum(low <= true_median <= high for low, high in
               (median_ci(rng.exponential(size=20)) for _ in range(2000)))
    assert 0.93 <= hits / 2000 <= 0.99


def test_speedup_interval_contains_the_ratio_and_narrows_with_less_noise():
    rng = np.random.default_rng(1)
    torch_ms, tvm_ms = 10 + rng.normal(0, 1, 20), 5 + rng.normal(0, 0.5, 20)
    low, high = ratio_ci(torch_ms, tvm_ms)
    assert low < np.median(torch_ms) / np.median(tvm_ms) < high
    quiet = ratio_ci(10 + rng.normal(0, 0.01, 20), 5 + rng.normal(0, 0.005, 20))
    assert quiet[1] - quiet[0] < (high - low) / 10
    assert ratio_ci(torch_ms, tvm_ms) == (low, high)  # seeded: the same numbers again

