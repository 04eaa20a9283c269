"""One trial's lifecycle, the same for `dlas trial` and for every trial of a study: walk the
stack, judge the result against the space's objectives and thresholds, and log it to the
trial's MLflow run (FINISHED with metrics, tags and artifacts; or FAILED/KILLED with the
layer and the reason, the traceback as `error.txt`). A failure fails this trial alone. A trial
a gate stopped (gates.py) is FINISHED with the metrics measured before the gate and the tags
`dlas.stopped_at` and `dlas.stopped_reason`.

    run_id = tracker.start_trial(number, config.summary(), config.params())
    result = run_and_log(config, tracker, run_id, lambda c: pipeline.run(c, cache), space)
"""
from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from typing import Callable

from . import faults
from .result import TrialResult

__all__ = ["Failure", "run_and_log"]


@dataclass
class Failure:
    """Why a trial failed: the layer (`faults.STAGES`, `artifacts`, `trial`) and a reason a
    user can act on; what the caller records (Optuna user attributes, the CLI's JSON)."""
    layer: str
    reason: str


def _failure(error: BaseException) -> Failure:
    where = faults.failed_layer(error)
    reason = str(error) if isinstance(error, faults.TrialFailed) else \
        f"{type(error).__name__}: {error}"
    if where == "artifacts":
        reason = f"could not store the trial's results in MLflow: {reason}"
    return Failure(where, reason)


def run_and_log(config, tracker, run_id: str, runner: Callable[..., TrialResult], space, *,
                require_objectives: bool = True,
                on_failure: Callable[[Failure], None] | None = None,
                on_tracking_lost: Callable[[str, bool], None] | None = None) -> TrialResult:
    """Run `runner(config)` and log its outcome to run `run_id`; return the result or raise
    what the trial raised. `require_objectives`: a result without every objective of the
    space fails (a study needs them; `dlas trial` does not). `on_failure(failure)` hears a
    failure before it is logged; `on_tracking_lost(why, ran)` hears that MLflow stopped
    answering: the results are kept (returned, when they were measured) and not logged."""
    start, result = time.perf_counter(), None
    try:
        result = runner(config)
        missing = [m for m in space.objectives if m not in result.metrics]
        if require_objectives and missing and not result.stopped:
            raise RuntimeError(f"objective {', '.join(missing)} was not measured on "
                               f"hw.target {config.hw.target} (PyTorch eager, the "
                               "speed-up's baseline, runs on the local CPU only)")
        if space.thresholds:  # outside a threshold: infeasible, never on the front
            violations = result.constraints = space.violations(result.metrics)
            measured = [v for v in violations if v != float("inf")]  # a stopped trial's
            result.metrics["threshold_violation"] = max(measured or violations)
            result.info["feasible"] = str(max(violations) <= 0).lower()
        if result.stopped:  # a gate stopped it (gates.py): not a failure, never on the front
            result.info.update({"stopped_at": result.stopped["at"], "feasible": "false",
                                "stopped_reason": result.stopped["reason"][:5000]})
        result.metrics["trial_s"] = time.perf_counter() - start
        with faults.layer("artifacts"):  # e.g. disk full: the run must not look complete
            tracker.finish_trial(run_id, result.metrics, result.tags(), result.artifacts,
                                 result.deploy)
        return result
    except BaseException as e:
        if faults.failed_layer(e) == "artifacts" and isinstance(e, Exception) and \
                on_tracking_lost is not None and (lost := tracker.reachable()):
            on_tracking_lost(lost, True)  # the results are good; MLflow is not
            return result
        failure = _failure(e)
        if on_failure is not None:
            on_failure(failure)
        text = getattr(e, "child_traceback", None) or traceback.format_exc()
        try:
            tracker.fail_trial(run_id, f"{text}\n{failure.reason}\n", "KILLED" if
                               isinstance(e, KeyboardInterrupt) else "FAILED",
                               layer=failure.layer)
        except Exception as lost:
            if on_tracking_lost is None:
                raise
            on_tracking_lost(f"{type(lost).__name__}: {str(lost)[:500]}", True)
        raise
    finally:
        if result is not None:
            result.discard_artifacts()
