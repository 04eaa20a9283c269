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

The study's tuning budget (`budget.tuning_trials`) is a gate on layer 5: `tuning_left` is what
the study has not spent yet when the trial starts; a tuned trial measures at most that many
new MetaSchedule candidates (0: it reuses the database's records and transfers schedules only).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from .errors import BadInput, allowed

__all__ = ["GATES", "LATE_METRICS", "Gates", "parse"]

# the gates a space can switch, and what each does
GATES = {"finetune": "stop a trial whose accuracy or size breaks a threshold after "
                     "fine-tuning, before compiling it"}
# metrics that only the compile and timing stages measure: a gate after fine-tuning cannot
# judge thresholds on these
LATE_METRICS = ("latency_ms", "speedup_vs_torch")


@dataclass(frozen=True)
class Gates:
    """The gates of one study: the space's thresholds, and which gates are on."""
    thresholds: Mapping[str, Mapping[str, float]]
    finetune: bool = True
    # MetaSchedule measurements the study has left for this trial (None: no study budget)
    tuning_left: int | None = None
    # a tuning round's extension (rounds.py): the trials its earlier round spent
    extend_from: int | None = None

    @classmethod
    def from_space(cls, space, tuning_left: int | None = None) -> "Gates":
        return cls(dict(space.thresholds), **dict(space.gates), tuning_left=tuning_left)

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


def parse(section: Any, where: str) -> dict[str, bool]:
    """The space's `gates:` section, e.g. `{finetune: false}`; unset gates are on."""
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
