"""confidence.py: objectives as intervals; candidates for confirmation; statistical ties."""
import pytest

from dlas_search.confidence import candidates, certainly_dominated, interval, ties, wilson

OBJECTIVES = {"accuracy": "maximize", "latency_ms": "minimize", "size_mb": "minimize"}


def trial(number, accuracy, latency, low, high, size=10.0, val=450):
    return {"trial": number, "metrics": {
        "accuracy": accuracy, "val_images": val, "size_mb": size, "latency_ms": latency,
        "latency_ci_low_ms": low, "latency_ci_high_ms": high}}


def test_overlapping_intervals_on_every_objective_are_reported_tied():
    # the same model in two layouts: same accuracy and size, latencies 4.1 and 4.2 ms with
    # intervals that overlap: the data cannot tell them apart
    a, b = trial(1, 0.93, 4.1, 3.9, 4.3), trial(2, 0.93, 4.2, 4.0, 4.4)
    assert ties([a, b], OBJECTIVES) == {1: [2], 2: [1]}


def test_a_clear_winner_is_not_tied():
    # the same accuracy and size, but 4.1 ms [4.0, 4.2] against 9.0 ms [8.8, 9.3]
    fast, slow = trial(1, 0.93, 4.1, 4.0, 4.2), trial(2, 0.93, 9.0, 8.8, 9.3)
    assert ties([fast, slow], OBJECTIVES) == {}
    assert certainly_dominated(slow, [fast, slow], OBJECTIVES)
    assert candidates([fast, slow], OBJECTIVES) == [fast]


def test_a_trial_slower_only_within_noise_stays_a_candidate():
    fast, close = trial(1, 0.93, 4.1, 3.8, 4.4), trial(2, 0.93, 4.3, 4.0, 4.6)
    assert not certainly_dominated(close, [fast, close], OBJECTIVES)
    assert candidates([fast, close], OBJECTIVES) == [fast, close]


def test_accuracy_is_an_interval_on_its_validation_images():
    low, high = interval({"accuracy": 0.9, "val_images": 450}, "accuracy")
    assert low < 0.9 < high and high - low == pytest.approx(0.055, abs=0.005)
    assert interval({"accuracy": 0.9}, "accuracy") == (0.9, 0.9)  # an older run: exact
    assert wilson(0.0, 100)[0] == pytest.approx(0.0) and wilson(1.0, 100)[1] == pytest.approx(1.0)


def test_the_confirmed_interval_wins_over_the_search_one():
    metrics = {"latency_ms": 5.0, "latency_ci_low_ms": 4.0, "latency_ci_high_ms": 6.0,
               "latency_confirmed_ci_low_ms": 4.9, "latency_confirmed_ci_high_ms": 5.1}
    assert interval(metrics, "latency_ms") == (4.9, 5.1)
    assert interval({"size_mb": 3.0}, "size_mb") == (3.0, 3.0)
