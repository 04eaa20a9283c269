"""How sure the front is: each objective of a trial as an interval, and what follows from them.

A trial's metrics are single numbers, but two of its objectives are estimates:

- `latency_ms` (and `speedup_vs_torch`) is a median of timed repeats: its 95% interval is
  `latency_ci_low_ms` / `latency_ci_high_ms`, or the confirmed one (`latency_confirmed_*`,
  from `dlas confirm`) where it exists;
- `accuracy` is measured on `val_images` images: its 95% interval is Wilson's score interval;
- the rest (`size_mb`, `macs`, ...) are exact.

From these intervals:

- `certainly_dominated(row, rows)`: another trial is better or equal on every objective even
  when its timed ones (`TIMED`: what timing again can change) are read at their least
  favourable bounds, and better on one: no re-timing can put `row` on the front. Every other
  feasible trial is a `candidate` for confirmation.
- `ties(front)`: front points whose intervals overlap on every objective; they are
  statistically tied: the data cannot say which is better, so a user may pick either.
"""
from __future__ import annotations

import math

__all__ = ["INTERVALS", "TIMED", "interval", "wilson", "overlap", "certainly_dominated", "candidates",
           "ties"]

# objective -> [(low, high) metric names], the first pair a row has wins
INTERVALS = {
    "latency_ms": [("latency_confirmed_ci_low_ms", "latency_confirmed_ci_high_ms"),
                   ("latency_ci_low_ms", "latency_ci_high_ms")],
    "speedup_vs_torch": [("speedup_vs_torch_confirmed_ci_low", "speedup_vs_torch_confirmed_ci_high"),
                         ("speedup_vs_torch_ci_low", "speedup_vs_torch_ci_high")],
}
TIMED = tuple(INTERVALS)  # the objectives that timing again measures anew
Z95 = 1.959963984540054


def wilson(p: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson's 95% score interval of a proportion p measured on n items."""
    if n <= 0:
        return p, p
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def interval(metrics: dict[str, float], objective: str) -> tuple[float, float]:
    """The 95% interval of one objective of a trial (a point for exact objectives)."""
    value = metrics[objective]
    if objective == "accuracy" and metrics.get("val_images"):
        return wilson(value, metrics["val_images"])
    for low, high in INTERVALS.get(objective, ()):
        if low in metrics and high in metrics:
            return min(metrics[low], value), max(metrics[high], value)
    return value, value


def _surely_at_least(a: dict, b: dict, objective: str, direction: str) -> tuple[bool, bool]:
    """(a is at least as good as b, a is better than b) on `objective`, reading a timed
    objective of a at its least favourable bound and of b at its most favourable."""
    if objective in TIMED:
        (a_low, a_high), (b_low, b_high) = interval(a, objective), interval(b, objective)
    else:  # as measured: timing again does not change it
        a_low = a_high = a[objective]
        b_low = b_high = b[objective]
    if direction == "maximize":
        return a_low >= b_high, a_low > b_high
    return a_high <= b_low, a_high < b_low


def certainly_dominated(row: dict, rows: list[dict], objectives: dict[str, str]) -> bool:
    """Whether some other row of `rows` dominates `row` at every bound (see the module)."""
    for other in rows:
        if other is row:
            continue
        checks = [_surely_at_least(other["metrics"], row["metrics"], m, d)
                  for m, d in objectives.items()]
        if all(ok for ok, _ in checks) and any(better for _, better in checks):
            return True
    return False


def candidates(rows: list[dict], objectives: dict[str, str]) -> list[dict]:
    """The rows (feasible ones, as the caller gives) that a re-measurement could put on the
    front: those no other row certainly dominates."""
    return [row for row in rows if not certainly_dominated(row, rows, objectives)]


def ties(front: list[dict], objectives: dict[str, str]) -> dict[int, list[int]]:
    """For each front row's trial number, the other front trials it is statistically tied
    with (intervals overlapping on every objective); rows tied with none are left out."""
    out: dict[int, list[int]] = {}
    for row in front:
        tied = [other["trial"] for other in front if other is not row and all(
            overlap(interval(row["metrics"], m), interval(other["metrics"], m))
            for m in objectives)]
        if tied:
            out[row["trial"]] = tied
    return out


def overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether the intervals a and b share a value."""
    return a[0] <= b[1] and b[0] <= a[1]
