"""The objective of a study: one Optuna trial in, the space's objective values out.

A sample the space rules out (`infeasible`: the reason) or that repeats a configuration that
completed, that a gate stopped or that another worker is running (`duplicate_of`: that
trial's number) is pruned before any work, with no MLflow run. A trial a gate stops
(gates.py: e.g. below the accuracy floor after fine-tuning) is pruned too, after its MLflow
run recorded what it measured (`stopped_at`, `stopped_reason`). Otherwise the trial runs and is logged like `dlas trial`
(trial.py); a failure fails this trial alone, and MLflow going away stops the study after it
(`dlas reconcile` back-fills what MLflow missed).
"""
from __future__ import annotations

import dataclasses
import json

import optuna

from functools import partial

from . import faults, pipeline, tracking, workers
from .cache import StageCache
from .gates import Gates
from .console import say
from .space import Space, TrialConfig
from .trial import Failure, run_and_log

__all__ = ["Objective", "CONFIG", "config_key", "config_of", "same_config", "suggest_new",
           "set_config", "pruned_as"]

# The trial's whole configuration (about 1,000 characters of JSON) is a system attribute, not
# a user attribute: optuna-dashboard shows user attributes as table columns, so those stay
# short (`name`, `pruned`, the measurements that are not objectives). Studies made before
# keep it as the user attribute `config`; config_of reads either.
CONFIG = "dlas:config"


def config_key(config: TrialConfig) -> str:
    """What identifies a configuration among a study's trials (config_of)."""
    return json.dumps(config.params(), sort_keys=True, default=str)


def config_of(trial) -> str | None:
    """The configuration a trial (Trial or FrozenTrial) ran, as config_key wrote it; None
    for a trial pruned before any work."""
    attrs = trial.system_attrs if hasattr(trial, "system_attrs") else \
        trial.storage.get_trial_system_attrs(trial._trial_id)
    return attrs.get(CONFIG) or trial.user_attrs.get("config")


def set_config(trial: optuna.Trial, key: str) -> None:
    """Record the configuration on the trial (a system attribute: see CONFIG)."""
    trial.storage.set_trial_system_attr(trial._trial_id, CONFIG, key)


def pruned_as(trial: optuna.Trial, reason: str) -> optuna.TrialPruned:
    """The exception that prunes `trial`, after its short reason (user attribute `pruned`,
    one line a dashboard column can hold) is recorded."""
    trial.set_user_attr("pruned", reason if len(reason) <= 80 else reason[:77] + "...")
    return optuna.TrialPruned(reason)


def same_config(key: str | None) -> str | None:
    """A `config` user attribute in the form two configurations are compared in: the
    parameters that do not apply (None) left out, so a setting added to a layer later (unset
    in every earlier trial) does not make an earlier study's configurations look new."""
    if key is None:
        return None
    try:
        return json.dumps({k: v for k, v in json.loads(key).items() if v is not None},
                          sort_keys=True)
    except (ValueError, AttributeError):
        return key


def suggest_new(space: Space, trial: optuna.Trial) -> TrialConfig:
    """The trial's configuration, or TrialPruned before any work when the space's constraints
    rule it out (`infeasible`: the reason) or it repeats a configuration that completed, that
    a gate stopped or that another worker is running (`duplicate_of`: that trial's number)."""
    config = space.suggest(trial)
    if "tuning_trials" in trial.user_attrs:  # a tuning round's extension (rounds.py)
        config = dataclasses.replace(config, compiler=dataclasses.replace(
            config.compiler, trials=int(trial.user_attrs["tuning_trials"])))
    reason = config.ruled_out
    if reason:
        trial.set_user_attr("infeasible", reason)
        raise pruned_as(trial, f"infeasible: {reason}")
    key = config_key(config)
    same = same_config(key)
    done_or_running = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING,
                       optuna.trial.TrialState.PRUNED)
    for earlier in trial.study.get_trials(deepcopy=False, states=done_or_running):
        # running: another worker has it now (two workers must not both run it); pruned:
        # only one a gate stopped (it ran; the others were pruned before any work)
        if earlier.state == optuna.trial.TrialState.PRUNED and \
                "stopped_at" not in earlier.user_attrs:
            continue
        if same_config(config_of(earlier)) == same and earlier.number != trial.number:
            trial.set_user_attr("duplicate_of", earlier.number)
            raise pruned_as(trial, f"same configuration as trial {earlier.number}")
    set_config(trial, key)
    trial.set_user_attr("name", config.summary())
    return config


class Objective:
    """One Optuna trial: sample, run the pipeline, log to MLflow; failures fail alone.
    A configuration the space's constraints rule out (`infeasible`: the reason) or that
    already completed or that another worker is running (`duplicate_of`) is pruned before any
    work, with no MLflow run."""

    def __init__(self, space: Space, tracker: tracking.Tracker, cache: StageCache):
        self.space, self.tracker, self.cache = space, tracker, cache
        self.tracking_lost: str | None = None  # why MLflow stopped answering, if it did
        self.gates = Gates.from_space(space)
        self.said_spent = False  # the study's tuning budget ran out: said once

    def _tracking_lost(self, trial: optuna.Trial, why: str, ran: bool) -> None:
        """MLflow stopped answering (after its own retries): mark the trial as missing from
        MLflow (user attribute `mlflow_missing`), say so, and stop the study after this trial:
        `dlas reconcile` back-fills it once MLflow is back."""
        trial.set_user_attr("mlflow_missing", why[:2000])
        self.tracking_lost = (
            f"MLflow at {self.tracker.uri} stopped answering ({why[:300]}); the study stopped "
            f"after trial {trial.number}, which Optuna keeps{'' if ran else ' as failed'} but "
            f"MLflow does not have. When MLflow is back, run: dlas reconcile --study "
            f"{trial.study.study_name} --storage <storage> --tracking-uri {self.tracker.uri}")
        say(f"[trial {trial.number}] {self.tracking_lost}")
        trial.study.stop()

    def tuning_left(self, study: optuna.Study) -> int | None:
        """MetaSchedule measurements the study has not spent (`budget.tuning_trials`), as the
        trials that ran recorded them (`tuning_new_trials`); None: no such budget. Workers
        running at the same moment may together overspend by one trial's share."""
        if self.space.tuning_trials is None:
            return None
        spent = sum(int(t.user_attrs.get("tuning_new_trials", 0))
                    for t in study.get_trials(deepcopy=False))
        left = max(0, self.space.tuning_trials - spent)
        if not left and not self.said_spent:
            self.said_spent = True
            say(f"the study's tuning budget (budget.tuning_trials {self.space.tuning_trials}) "
                "is spent: tuned trials from now on reuse the database's schedules and "
                "transfer them, measuring no new candidates")
        return left

    def seen(self, study: optuna.Study) -> dict:
        """What the untuned-build gate judges by (gates.py): the study's feasible completed
        trials' objective values and the tuning speed-ups its tuned trials measured; empty
        when the space does not turn that gate on."""
        if not self.space.gates.get("untuned_build"):
            return {}
        front, speedups = [], []
        for t in study.get_trials(deepcopy=False,
                                  states=(optuna.trial.TrialState.COMPLETE,)):
            if all(c <= 0 for c in t.user_attrs.get("constraints", [])) and t.values:
                front.append((t.number, tuple(t.values)))
            if "tuning_speedup" in t.user_attrs:
                conv = json.loads(config_of(t) or "{}").get("algo.conv")
                speedups.append((t.number, conv, float(t.user_attrs["tuning_speedup"])))
        return {"front": tuple(front), "speedups": tuple(speedups)}

    def run(self, config: TrialConfig, gates: Gates | None = None) -> pipeline.TrialResult:
        """The pipeline, in this process; with the space's time or memory limit, in a child
        process that is killed when it passes one."""
        run = partial(pipeline.run, gates=gates or self.gates)
        if not self.space.limits:
            return run(config, self.cache)
        return faults.run_limited(run, config, self.cache.root, self.space.limits)

    def __call__(self, trial: optuna.Trial) -> list[float]:
        worker = workers.identity()  # first: a RUNNING trial names the process running it
        for key, value in worker.items():
            trial.set_user_attr(key, value)
        config = suggest_new(self.space, trial)
        extends = trial.user_attrs.get("extends_run")  # a tuning round (rounds.py)
        try:
            run_id = self.tracker.start_trial(
                trial.number, config.summary(), config.params(),
                {**workers.tags(worker), **({tracking.EXTENDS: extends} if extends else {})})
        except Exception as e:  # MLflow is gone: nothing ran; stop rather than run blind
            why = f"{type(e).__name__}: {str(e)[:500]}"
            trial.set_user_attr("error", f"MLflow could not start the trial's run: {why}")
            trial.set_user_attr("failed_layer", "tracking")
            self._tracking_lost(trial, why, ran=False)
            raise
        trial.set_user_attr("mlflow_run_id", run_id)

        def failed(failure: Failure) -> None:
            trial.set_user_attr("error", failure.reason[:2000])
            trial.set_user_attr("failed_layer", failure.layer)
            say(f"[trial {trial.number}] {config.summary()} FAILED in {failure.layer}: "
                 f"{failure.reason}")

        gates = Gates.from_space(self.space, self.tuning_left(trial.study),
                                 **self.seen(trial.study))
        if extends:  # tune on from the earlier round's records, with what it did not spend
            earlier = trial.study.trials[trial.user_attrs["extends"]]
            gates = dataclasses.replace(gates, extend_from=int(
                earlier.user_attrs.get("tuning_trials", self.space.rounds.start)))
        result = run_and_log(config, self.tracker, run_id, partial(self.run, gates=gates),
                             self.space,
                             on_failure=failed, on_tracking_lost=lambda why, ran:
                             self._tracking_lost(trial, why, ran))
        if self.space.thresholds:
            trial.set_user_attr("constraints", result.constraints)
        if extends:  # the faster build holds the configuration's row; the other goes under it
            from .rounds import keeps_row
            earlier = self.tracker.client.get_run(extends).data.metrics
            if keeps_row(earlier, result.metrics):
                self.tracker.supersede(extends, run_id)
            else:
                self.tracker.supersede(run_id, extends)
                say(f"[trial {trial.number}] the extension timed {result.metrics['latency_ms']:.4g}"
                    f" ms, slower than its earlier round's {earlier['latency_ms']:.4g} ms: that "
                    "round keeps the configuration's row")
        if result.stopped:  # a gate: pruned, with the reason and what it measured
            for key in ("accuracy", "size_mb", "trial_s", "untuned_latency_ms"):
                if key in result.metrics:
                    trial.set_user_attr(key, result.metrics[key])
            trial.set_user_attr("stopped_at", result.stopped["at"])
            trial.set_user_attr("stopped_reason", result.stopped["reason"][:300])
            say(f"[trial {trial.number}] {config.summary()}: {result.stopped['reason']} "
                f"({result.metrics['trial_s']:.0f} s)")
            raise pruned_as(trial, f"stopped at {result.stopped['at']}: "
                                   f"{result.stopped['reason']}")
        values = [result.metrics[m] for m in self.space.objectives]
        for key in ("accuracy", "latency_ms", "size_mb", "speedup_vs_torch", "sparsity",
                    "trial_s", "tuning_new_trials",  # the study's budget
                    "tuning_speedup"):  # the untuned-build gate's evidence
            # no PyTorch baseline on a remote device; objectives are the trial's values
            if key in result.metrics and key not in self.space.objectives:
                trial.set_user_attr(key, result.metrics[key])
        shown = ", ".join(f"{m} {result.metrics[m]:.4g}" for m in self.space.objectives)
        speedup = result.metrics.get("speedup_vs_torch")
        kept = result.metrics.get("tuning_tasks_kept_default")  # tuned trials only
        say(f"[trial {trial.number}] {config.summary()}: {shown}" +
             (f", speedup_vs_torch {speedup:.2f}" if speedup is not None else "") +
             (f", {kept:.0f} of {result.metrics['tuning_tasks']:.0f} tasks kept the default "
              "schedule" if kept is not None else "") +
             f" ({result.metrics['trial_s']:.0f} s)")
        return values
