"""Pareto dominance and hypervolume over plain arrays: which points no other beats, and how
much of the objective space a front covers. Apart from pareto.py (which reads studies from
MLflow) so that the plots and the report can ask it without importing the export.

    front = non_dominated(values, ["maximize", "minimize"])   # boolean mask
"""
from __future__ import annotations

import numpy as np

__all__ = ["non_dominated", "hypervolume", "normalised_hypervolume"]


def non_dominated(values, directions: list[str]) -> np.ndarray:
    """Mask of the points no other point dominates (at least as good in every objective and
    better in one). Ties and duplicates are all kept, as in Optuna's `best_trials`."""
    points = np.asarray(values, dtype=float).reshape(len(values), len(directions))
    signs = np.array([-1.0 if d == "maximize" else 1.0 for d in directions])
    costs = points * signs  # minimise everything
    better_or_equal = (costs[:, None, :] <= costs[None, :, :]).all(axis=2)
    strictly_better = (costs[:, None, :] < costs[None, :, :]).any(axis=2)
    dominated = (better_or_equal & strictly_better).any(axis=0)  # [i, j]: i dominates j
    return ~dominated


def hypervolume(costs: np.ndarray, reference: np.ndarray) -> float:
    """Volume dominated by `costs` (all minimised) up to `reference`, exactly: slice along
    the first objective and recurse on the rest (fine for the few objectives and the fronts of
    a study)."""
    costs = np.asarray(costs, dtype=float)
    costs = costs[(costs < reference).all(axis=1)]
    if len(costs) == 0:
        return 0.0
    if costs.shape[1] == 1:
        return float(reference[0] - costs[:, 0].min())
    order = np.argsort(costs[:, 0])
    costs = costs[order]
    volume = 0.0
    for i in range(len(costs)):
        upper = costs[i + 1, 0] if i + 1 < len(costs) else reference[0]
        if upper > costs[i, 0]:
            volume += (upper - costs[i, 0]) * hypervolume(costs[: i + 1, 1:], reference[1:])
    return volume


def normalised_hypervolume(values: np.ndarray, front: np.ndarray,
                           directions: list[str]) -> float:
    """The front's hypervolume with every objective scaled to [0, 1] over all the trials
    (best 0, worst 1) and the reference point at 1.1: comparable across studies of the same
    objectives, 1.21 ** (objectives / 2) would be a perfect corner."""
    signs = np.array([-1.0 if d == "maximize" else 1.0 for d in directions])
    costs, front_costs = values * signs, front * signs
    low, high = costs.min(axis=0), costs.max(axis=0)
    span = np.where(high > low, high - low, 1.0)
    return hypervolume((front_costs - low) / span, np.full(len(directions), 1.1))
