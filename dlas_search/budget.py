"""A study's budget, in the units a user thinks in: trials, hours, and tuning measurements.

    budget:
      trials: 40            # trials that run (a sample pruned before any work does not count)
      hours: 2              # wall time of this run of the study (or timeout_s)
      tuning_trials: 5000   # MetaSchedule measurements for the whole study (gates.py caps each)

`Budget` is the Optuna callback that stops the study after its trials (or when the sampler
only proposes what already ran); the time limit is Optuna's `timeout`; the tuning budget is
kept by the objective (`Objective.tuning_left`). `estimate` is the line printed when a study
starts: how long the trials asked for will take, from the wall time of the study's earlier
trials once there are some.
"""
from __future__ import annotations

import statistics
import sys

import optuna

from .console import say

__all__ = ["Budget", "grid_left", "estimate"]


def grid_left(space, study: optuna.Study, trials: int) -> int:
    """How many trials a grid study will still run: its configurations not completed yet
    (the progress bar's length and time estimate; the budget is usually far larger)."""
    size = space.size()
    if size is None:
        return trials
    from .objective import config_of, same_config
    done = {same_config(config_of(t)) for t in study.get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))}
    return max(0, min(trials, size - len(done - {None})))


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def estimate(study: optuna.Study, trials: int, workers: int = 1,
             timeout_s: float | None = None) -> str:
    """How long `trials` more trials will take on `workers` processes, from the wall time
    (`trial_s`) of the study's earlier trials that ran (a gate's stopped ones included: the
    same mix comes again); or why there is no estimate yet."""
    times = sorted(t.user_attrs["trial_s"] for t in study.get_trials(deepcopy=False)
                   if isinstance(t.user_attrs.get("trial_s"), (int, float)))
    limit = f"; the time budget stops it at {_duration(timeout_s)}" if timeout_s else ""
    if not times:
        return (f"estimate: none yet (no earlier trial of this study to learn from); "
                f"{trials} trial(s) to run{limit}")
    median = statistics.median(times)
    low, high = times[len(times) // 4], times[(3 * len(times)) // 4]
    rounds = -(-trials // max(1, workers))  # trials one worker runs, rounded up
    total = rounds * median
    return (f"estimate: {trials} trial(s) x {_duration(median)} (median of {len(times)} "
            f"earlier trial(s); middle half {_duration(low)} to {_duration(high)})"
            f"{f' on {workers} workers' if workers > 1 else ''} = about {_duration(total)}"
            f"{limit}{' (sooner)' if timeout_s and timeout_s < total else ''}")


class Budget:
    """Stops the study after `trials` trials that ran (complete, failed, or stopped by a
    gate), or when the sampler only proposes configurations that already ran or that the
    space rules out (`max_skipped` in a row: a small space is exhausted; None for the grid
    sampler, which stops by itself once every grid point was proposed: conditional parameters
    make many points repeat one configuration). Skipped samples do not count against the
    budget."""

    def __init__(self, trials: int, max_skipped: int | None = 30, bar: bool = True,
                 expected: int | None = None):
        from tqdm import tqdm
        self.trials, self.max_skipped = trials, max_skipped
        self.ran = self.skipped = 0
        self.exhausted = False
        # the bar's length: trials expected to run (a grid's configurations not run yet)
        self.bar = tqdm(total=trials if expected is None else expected, desc="study",
                        unit="trial", file=sys.stderr) if bar else None

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if {"duplicate_of", "infeasible"} & set(trial.user_attrs):
            self.skipped += 1
            self.exhausted = self.max_skipped is not None and self.skipped >= self.max_skipped
        else:
            self.ran += 1
            self.skipped = 0
            if self.bar is not None:
                self.bar.update(1)
            else:  # several workers: one line each instead of bars tearing each other
                say(f"{self.ran}/{self.trials} of this worker's trials done")
        if self.ran >= self.trials or self.exhausted:
            study.stop()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
