"""Optuna and MLflow back in step: after MLflow went away mid-study, list the study's trials
that Optuna finished but MLflow does not have (no run, or a run left RUNNING) and back-fill
them from what Optuna kept: parameters from the trial's stored configuration, metrics from its
values and user attributes, and a tag saying so.

    missing = find_missing(study, tracker)      # [(trial, run or None), ...]
    backfill(study, tracker, missing)
"""
from __future__ import annotations

import json

import optuna
from mlflow.entities import RunTag

from . import tracking
from .objective import config_of

__all__ = ["FINISHED", "METRIC_ATTRS", "find_missing", "backfill", "open_tracker"]


FINISHED = {"COMPLETE": "FINISHED", "FAIL": "FAILED"}
# user attributes that are metrics (objective.Objective keeps these beside the values)
METRIC_ATTRS = ("accuracy", "latency_ms", "size_mb", "speedup_vs_torch", "sparsity")


def find_missing(study: optuna.Study, tracker: tracking.Tracker) -> list[tuple]:
    """Finished Optuna trials (complete or failed) whose MLflow run is absent or unfinished,
    matched by the `mlflow_run_id` user attribute, else by the run's trial number tag."""
    runs = tracker.client.search_runs(
        [tracker.experiment_id], f"tags.`{tracking.ROLE}` = 'trial'", max_results=50000)
    by_id = {r.info.run_id: r for r in runs}
    by_number: dict[str, list] = {}
    for r in runs:
        by_number.setdefault(r.data.tags.get(tracking.TRIAL), []).append(r)
    missing = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                          optuna.trial.TrialState.FAIL)):
        if config_of(trial) is None:  # ruled out or a repeat: never had a run
            continue
        run = by_id.get(trial.user_attrs.get("mlflow_run_id"))
        candidates = [run] if run else by_number.get(str(trial.number), [])
        if not any(r.info.status == FINISHED[trial.state.name] for r in candidates):
            missing.append((trial, candidates[0] if candidates else None))
    return missing


def backfill(study: optuna.Study, tracker: tracking.Tracker, missing: list[tuple]) -> list[str]:
    """Log each missing trial into its unfinished run (or a new child run of the study's
    parent run), tagged `dlas.backfilled`; return the run ids."""
    names = study.metric_names or []
    done = []
    for trial, run in missing:
        params = json.loads(config_of(trial))
        if run is None:
            run_id = tracker.start_trial(trial.number, f"trial {trial.number}", params)
        else:
            run_id = run.info.run_id
        metrics = {k: trial.user_attrs[k] for k in METRIC_ATTRS if k in trial.user_attrs}
        metrics.update(zip(names, trial.values or []))
        tags = {"dlas.backfilled": "true", "dlas.backfilled_from": "optuna trial "
                f"{trial.number} ({trial.state.name.lower()})"}
        if "mlflow_missing" in trial.user_attrs:
            tags["dlas.backfill_reason"] = trial.user_attrs["mlflow_missing"][:5000]
        if trial.state.name == "FAIL":
            tags["dlas.error"] = trial.user_attrs.get("error", "unknown (failed in Optuna)")
            tags["dlas.failed_layer"] = trial.user_attrs.get("failed_layer", "trial")
        tracker.client.log_batch(run_id, metrics=tracking._metrics(metrics),
                                 tags=[RunTag(k, str(v)) for k, v in tags.items()])
        tracker.client.set_terminated(run_id, FINISHED[trial.state.name])
        done.append(run_id)
    return done


def open_tracker(uri: str, study: optuna.Study) -> tracking.Tracker:
    """The study's experiment and parent run (created if MLflow never saw the study)."""
    tracker = tracking.Tracker(uri, study.study_name)
    experiment = tracker.client.get_experiment_by_name(study.study_name)
    if experiment is None:
        tracker.experiment_id = tracker.client.create_experiment(study.study_name)
    else:
        tracker.experiment_id = experiment.experiment_id
    parents = tracker.client.search_runs(
        [tracker.experiment_id], f"tags.`{tracking.ROLE}` = 'study'", max_results=1,
        order_by=["attributes.start_time ASC"])
    if parents:
        tracker.parent_id = parents[0].info.run_id
    else:
        run = tracker.client.create_run(
            tracker.experiment_id, run_name=f"study {study.study_name}",
            tags={tracking.ROLE: "study", tracking.STUDY: study.study_name,
                  "dlas.backfilled": "true"})
        tracker.parent_id = run.info.run_id
        tracker.client.set_terminated(tracker.parent_id, "FINISHED")
    return tracker
