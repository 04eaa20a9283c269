"""Stage gates: a trial that can no longer reach the front stops before its costly stages.

    gates = Gates.from_space(space)             # the space's thresholds and `gates:` section
    why = gates.after_finetune(compressed.metrics)
    if why: ...                                 # the trial stops here: nothing is compiled

Fine-tuning decides a configuration's accuracy and size; compiling, tuning and timing only
decide its latency. A trial whose accuracy (or size, or any threshold whose metric is known
after fine-tuning) already breaks the space's thresholds is infeasible whatever its latency,
so compiling it buys nothing: the gate stops it there. The search records it as Optuna state
PRUNED (user attributes `stopped_at`, `stopped_reason`) and its MLflow run as FINISHED with
the metrics it measured and the tags `dlas.stopped_at=finetune` and `dlas.feasible=false`:
never a failure, never on the front.

The space switches the gate off with `gates: {finetune: false}` (every trial is then compiled
and timed, as a perturbation study wants).

The untuned-build gate (`gates: {untuned_build: true}`, off unless the space turns it on: it
costs each tuned trial an untuned build and a short timing) judges a MetaSchedule-tuned trial
before it tunes. Its untuned latency divided by the best speed-up tuning has given so far on
trials with the same conv algorithm (`tuning_speedup`, untuned over tuned latency) is the best
latency tuning can be expected to reach; if, with that latency, the trial is still dominated by
a feasible trial of the study, tuning it buys nothing and it stops (`stopped_at=untuned_build`,
the rule and its numbers in the reason). Until a trial with that conv algorithm has been tuned
the gate cannot judge and lets the trial through (and says so).

The study's tuning budget (`budget.tuning_trials`) is a gate on layer 5: `tuning_left` is what
the study has not spent yet when the trial starts; a tuned trial measures at most that many
new MetaSchedule candidates (0: it reuses the database's records and transfers schedules only).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from .dominance import non_dominated
from .errors import BadInput, allowed

__all__ = ["DEFAULTS", "GATES", "LATE_METRICS", "Gates", "parse"]

# the gates a space can switch, and what each does
GATES = {"finetune": "stop a trial whose accuracy or size breaks a threshold after "
                     "fine-tuning, before compiling it",
         "untuned_build": "stop a tuned trial that, timed untuned and given the best tuning "
                          "speed-up seen so far, is still dominated by the front, before "
                          "tuning it"}
DEFAULTS = {"finetune": True, "untuned_build": False}
# metrics that only the compile and timing stages measure: a gate after fine-tuning cannot
# judge thresholds on these
LATE_METRICS = ("latency_ms", "speedup_vs_torch")


@dataclass(frozen=True)
class Gates:
    """The gates of one study: the space's thresholds, and which gates are on."""
    thresholds: Mapping[str, Mapping[str, float]]
    finetune: bool = True
    untuned_build: bool = False
    # for the untuned-build gate: the objectives (name -> direction), the study's feasible
    # trials so far (trial number, objective values), and the tuning speed-ups seen so far
    # (trial number, conv algorithm, untuned over tuned latency)
    objectives: Mapping[str, str] = field(default_factory=dict)
    front: tuple[tuple[int, tuple[float, ...]], ...] = ()
    speedups: tuple[tuple[int, str, float], ...] = ()
    # MetaSchedule measurements the study has left for this trial (None: no study budget)
    tuning_left: int | None = None
    # a tuning round's extension (rounds.py): the trials its earlier round spent
    extend_from: int | None = None

    @classmethod
    def from_space(cls, space, tuning_left: int | None = None, **seen) -> "Gates":
        """The space's gates; `seen`: the study's `front` and `speedups` so far."""
        return cls(dict(space.thresholds), **dict(space.gates), tuning_left=tuning_left,
                   objectives=dict(space.objectives), **seen)

    def tuning_trials(self, asked: int) -> int:
        """The new tuning trials a trial whose budget is `asked` may spend: what an earlier
        round did not, within what the study has left."""
        if self.extend_from is not None:
            asked = max(0, asked - self.extend_from)
        return asked if self.tuning_left is None else max(0, min(asked, self.tuning_left))

    def after_finetune(self, metrics: Mapping[str, float]) -> str | None:
        """Why the trial stops after fine-tuning (None: it goes on): the thresholds on
        metrics known by now (accuracy, size_mb, params, macs, sparsity) that it breaks."""
        if not self.finetune:
            return None
        broken = []
        for metric, bounds in self.thresholds.items():
            value = metrics.get(metric)
            if metric in LATE_METRICS or value is None:
                continue
            if "min" in bounds and value < bounds["min"]:
                broken.append(f"{metric} {value:.4g} is below the threshold's min "
                              f"{bounds['min']:g}")
            if "max" in bounds and value > bounds["max"]:
                broken.append(f"{metric} {value:.4g} is above the threshold's max "
                              f"{bounds['max']:g}")
        if not broken:
            return None
        return ("stopped after fine-tuning: " + "; ".join(broken) +
                " (infeasible whatever its latency: not compiled, tuned or timed)")


    def after_untuned(self, metrics: Mapping[str, float], untuned_ms: float,
                      conv: str) -> tuple[str | None, str]:
        """(why the trial stops before tuning, or None; the rule with its numbers, logged
        either way): `metrics` known after fine-tuning, `untuned_ms` its untuned latency."""
        seen = [(n, s) for n, c, s in self.speedups if c == conv]
        if not seen:
            return None, (f"untuned {untuned_ms:.4g} ms; no trial with algo.conv {conv} has "
                          "been tuned yet, so the gate cannot judge: tuned")
        number, best = max(seen, key=lambda e: e[1])
        hope = untuned_ms / max(best, 1.0)  # tuning is kept only where it is not slower
        rule = (f"untuned {untuned_ms:.4g} ms / the best tuning speed-up on algo.conv {conv} "
                f"so far ({best:.2f}x, trial {number}, of {len(seen)}) = at best "
                f"{hope:.4g} ms tuned")
        values = {**metrics, "latency_ms": hope}
        if any(m not in values for m in self.objectives):
            return None, rule + "; an objective is unknown before timing: tuned"
        directions = list(self.objectives.values())
        mine = [values[m] for m in self.objectives]
        for other, theirs in self.front:
            if not non_dominated([theirs, mine], directions)[1]:
                shown = ", ".join(f"{m} {v:.4g}" for m, v in zip(self.objectives, theirs))
                return (f"stopped after an untuned build: {rule}, and even so it is dominated "
                        f"by trial {other} ({shown}): not tuned or timed"), rule
        return None, rule + ", not dominated by the study's trials so far: tuned"


def parse(section: Any, where: str) -> dict[str, bool]:
    """The space's `gates:` section, e.g. `{finetune: false, untuned_build: true}`; an unset
    gate keeps its default (`DEFAULTS`: the fine-tune gate on, the untuned-build gate off)."""
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise BadInput(f"{where}gates: a mapping of {' / '.join(GATES)} -> true or false")
    out = {}
    for key, value in section.items():
        if key not in GATES:
            raise allowed(f"{where}gates", key, list(GATES))
        if not isinstance(value, bool):
            raise BadInput(f"{where}gates.{key}: {value!r} must be true or false ({GATES[key]})")
        out[key] = value
    return out
