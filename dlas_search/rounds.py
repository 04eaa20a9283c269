"""Tuning in rounds: successive halving over MetaSchedule's budget, spent where the front is.

    budget:
      tuning_rounds: {start: 64, factor: 4, max: 1024, margin: 0.0}

Tuning is most of a tuned trial's cost, and most configurations never reach the front. With
`tuning_rounds`, every tuned configuration is first tuned with `start` trials (the space's
`compiler.trials` is set to `start`). When the study's trials have run, the tuned
configurations that could still be on the front are tuned further, to `factor` times the
trials, and timed again; then the front is read again, and so on, until `max` trials, the
study's time budget or its tuning budget (`budget.tuning_trials`: an extension with no trial
left could only time its configuration again). "Could still be on the front": no feasible
trial certainly dominates it
(confidence.certainly_dominated: the latency intervals read at their least favourable bounds)
once its latency's lower bound is lowered by `margin` (a share: 0.1 gives every configuration
within about 10% of the front another round).

An extension is a new Optuna trial with the same parameters (a completed Optuna trial cannot
change its values) and user attributes `extends` (the earlier trial) and `tuning_trials` (its
budget). It tunes the configuration's tasks again from their best records (the database
grows; MetaSchedule's search starts where the last round stopped) with the trials the
earlier round did not spend. In MLflow its run takes the configuration's row: the earlier
round's run is moved under it (`mlflow.parentRunId`) and tagged `dlas.superseded_by`, so the
comparison and the front show one row per configuration, with its final numbers, and the
rounds before it one click down. Unless the extension's build timed slower than the earlier
round's (`keeps_row`: more trials found no faster schedule, or the machine was slower then):
the earlier round keeps the row, its build being the one to deploy, and the extension goes
under it; a study's confirmation times the front again in any case.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import optuna

from . import confidence, pareto
from .errors import BadInput, allowed

__all__ = ["Rounds", "parse", "to_extend", "run_rounds", "spent", "keeps_row"]


@dataclass(frozen=True)
class Rounds:
    start: int
    factor: int = 4
    max: int = 1024
    margin: float = 0.0

    def next(self, trials: int) -> int | None:
        """The budget of the round after one of `trials` (None: `trials` was the last)."""
        return None if trials >= self.max else min(self.max, trials * self.factor)


def parse(section: Any, where: str) -> Rounds | None:
    """`budget.tuning_rounds: {start, factor, max, margin}`, checked."""
    if section is None:
        return None
    keys = ("start", "factor", "max", "margin")
    if not isinstance(section, dict) or "start" not in section:
        raise BadInput(f"{where}budget.tuning_rounds: a mapping with start (and factor, max, "
                       "margin), e.g. {start: 64, factor: 4, max: 1024}")
    for key in section:
        if key not in keys:
            raise allowed(f"{where}budget.tuning_rounds", key, keys)
    rounds = Rounds(**section)
    for key in ("start", "factor", "max"):
        value = getattr(rounds, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < (2 if key ==
                                                                              "factor" else 1):
            raise BadInput(f"{where}budget.tuning_rounds.{key}: {value!r} must be an integer "
                           f">= {2 if key == 'factor' else 1}")
    if rounds.max < rounds.start:
        raise BadInput(f"{where}budget.tuning_rounds: max {rounds.max} is below start "
                       f"{rounds.start}")
    if not isinstance(rounds.margin, (int, float)) or not 0 <= rounds.margin < 1:
        raise BadInput(f"{where}budget.tuning_rounds.margin: {rounds.margin!r} must be a share "
                       "in [0, 1), e.g. 0.1")
    return rounds


def _optimistic(row: dict, margin: float) -> dict:
    """The row with its latency's lower bound lowered by `margin` (what more tuning may win)."""
    metrics = dict(row["metrics"])
    if margin and "latency_ms" in metrics:
        low = metrics.get("latency_ci_low_ms", metrics["latency_ms"])
        metrics["latency_ci_low_ms"] = low * (1 - margin)
        metrics.setdefault("latency_ci_high_ms", metrics["latency_ms"])
    return {**row, "metrics": metrics}


def to_extend(trials: pareto.Trials, rounds: Rounds) -> list[tuple[dict, int]]:
    """The rows of `trials` (one per configuration: superseded rounds are not there) to tune
    further, each with its next budget: tuned, feasible, below `max`, and not certainly
    dominated by a feasible row even with `margin` more speed."""
    feasible = [row for row in trials.rows if trials.feasible(row)]
    picks = []
    for row in feasible:
        params = row["params"]
        if params.get("compiler.tuner") != "metaschedule":
            continue
        budget = rounds.next(int(float(params.get("compiler.trials") or rounds.start)))
        if budget is None:
            continue
        hopeful = _optimistic(row, rounds.margin)
        others = [hopeful] + [r for r in feasible if r is not row]
        if not confidence.certainly_dominated(hopeful, others, trials.objectives):
            picks.append((row, budget))
    return picks


def run_rounds(study: optuna.Study, objective: Callable, rounds: Rounds, tracking_uri: str,
               experiment: str, deadline: float | None, say: Callable[[str], None]) -> int:
    """Extend the configurations `to_extend` names, round after round, until none is left or
    the `deadline` (time.monotonic()) passes; return how many extensions ran."""
    ran, tried = 0, set()
    while deadline is None or time.monotonic() < deadline:
        picks = [(row, budget) for row, budget in
                 to_extend(pareto.load_trials(tracking_uri, experiment), rounds)
                 if (row["run_id"], budget) not in tried]  # a failed extension: not again
        tried.update((row["run_id"], budget) for row, budget in picks)
        if not picks:
            break
        say(f"tuning round: {len(picks)} configuration(s) that could be on the front get more "
            "tuning trials: " + ", ".join(f"trial {row['trial']} -> {budget}"
                                          for row, budget in picks))
        for row, budget in picks:
            if spent(objective, study, say) or (deadline is not None and
                                           time.monotonic() >= deadline):
                return ran
            earlier = study.trials[row["trial"]]
            study.enqueue_trial(earlier.params, user_attrs={
                "extends": earlier.number, "extends_run": row["run_id"],
                "tuning_trials": budget}, skip_if_exists=False)
            left = None if deadline is None else max(1.0, deadline - time.monotonic())
            study.optimize(objective, n_trials=1, timeout=left, catch=(Exception,),
                           gc_after_trial=True)
            ran += 1
            if getattr(objective, "tracking_lost", None):  # MLflow went away: stop here
                return ran
    return ran


def spent(objective, study: optuna.Study, say: Callable[[str], None]) -> bool:
    """Whether the study's tuning budget (`budget.tuning_trials`) is spent: an extension
    could only time its configuration again, so the rounds stop (and say so)."""
    if objective.tuning_left(study) != 0:
        return False
    say("tuning rounds stop: the study's budget.tuning_trials is spent")
    return True


def keeps_row(earlier: dict[str, float], later: dict[str, float]) -> bool:
    """Whether an extension (metrics `later`) takes the configuration's row from the earlier
    round (`earlier`): unless its latency is higher. The same model and schedules tuned
    longer change nothing else."""
    before, after = earlier.get("latency_ms"), later.get("latency_ms")
    return before is None or after is None or after <= before
