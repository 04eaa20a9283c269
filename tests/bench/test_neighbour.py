"""bench/neighbour.py's comparison of two fronts: membership (Jaccard), the order of the
pairs on both, and disagreements among the pairs whose intervals separate them."""
from __future__ import annotations

import importlib.util

from conftest import ROOT

spec = importlib.util.spec_from_file_location("bench_neighbour", ROOT / "bench" / "neighbour.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def point(latency, low, high):
    return {"latency": latency, "ci": (low, high)}


def test_fronts_that_agree_on_separated_pairs_and_differ_on_a_tie():
    quiet = {"a": point(4.0, 3.9, 4.1), "b": point(4.05, 3.95, 4.2), "c": point(9.0, 8.8, 9.2)}
    noisy = {"a": point(4.2, 4.0, 4.4), "b": point(4.1, 3.9, 4.3), "c": point(9.5, 9.1, 9.9),
             "d": point(20.0, 19.0, 21.0)}
    out = bench.compare(quiet, noisy)
    assert out["jaccard"] == 3 / 4 and out["only_noisy"] == ["d"] and out["only_quiet"] == []
    assert out["order_agree"] == "2/3"          # a and b swapped: they are tied
    assert out["separated_disagree"] == "0/2"   # a-c and b-c: separated, same order


def test_a_separated_pair_in_the_wrong_order_is_counted():
    quiet = {"a": point(4.0, 3.9, 4.1), "c": point(9.0, 8.8, 9.2)}
    noisy = {"a": point(9.6, 9.5, 9.7), "c": point(9.0, 8.8, 9.2)}
    assert bench.compare(quiet, noisy)["separated_disagree"] == "1/1"
