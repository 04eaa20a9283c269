"""Which process runs a trial, and what happens to a trial whose worker is lost.

Each trial records its worker when it starts (Optuna user attributes `worker_host`,
`worker_pid`, `worker_started`, the same as MLflow tags `dlas.worker_*`). A search then
settles the study's RUNNING trials when it starts and before its summary:

- a worker on this host whose process is gone (or whose pid is now another process: the
  start time differs) is known dead: its trial is failed at once and queued again, like a
  trial whose heartbeats went stale (`LostWorker`);
- any other running trial (a live worker, another host, no record) is left alone and named in
  the summary (`still_running`), with when its heartbeats make it stale.
"""
from __future__ import annotations

import copy
import os
import socket
import sys
from datetime import timedelta

import optuna

from . import tracking
from .console import say

__all__ = ["HOST", "PID", "STARTED", "HEARTBEAT_LOST", "identity", "tags", "started", "gone",
           "LostWorker", "fail_gone", "still_running"]

HOST, PID, STARTED = "worker_host", "worker_pid", "worker_started"  # Optuna user attributes
_OF_THE_RUN = (HOST, PID, STARTED, "mlflow_run_id", "error", "failed_layer")
HEARTBEAT_LOST = "the worker running this trial stopped sending heartbeats (killed or lost)"


def started(pid: int) -> str | None:
    """When process `pid` started (clock ticks after boot: field 22 of /proc/<pid>/stat), or
    None when there is no such process (or only its zombie) or no /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the name may hold spaces: skip past it
    return None if fields[0] in ("Z", "X") else fields[19]  # fields[0] is field 3, the state


def identity() -> dict[str, str | int]:
    """This process as a trial's worker: host name, pid, start time ("" without /proc)."""
    pid = os.getpid()
    return {HOST: socket.gethostname(), PID: pid, STARTED: started(pid) or ""}


def tags(worker: dict | None = None) -> dict[str, str]:
    """A worker's `identity()` (this process's by default) as MLflow tags of a trial's run."""
    return {f"dlas.{k}": str(v) for k, v in (worker or identity()).items()}


def _who(attrs: dict) -> str:
    return f"host {attrs[HOST]}, pid {attrs[PID]}" if HOST in attrs else "no worker recorded"


def gone(attrs: dict) -> str | None:
    """Why the worker a trial's user attributes name is known to be dead: it ran on this host
    and its process is gone, or its pid now belongs to another process. None when it lives,
    runs elsewhere, or was not recorded: only its heartbeats can tell then."""
    pid = attrs.get(PID)
    if attrs.get(HOST) != socket.gethostname() or not isinstance(pid, int):
        return None
    if os.path.isdir("/proc/self"):
        now = started(pid)
        if now is None:
            why = "its process is gone"
        elif attrs.get(STARTED) and str(attrs[STARTED]) != now:
            why = "its pid now belongs to another process"
        else:
            return None
    else:  # no /proc: existence only
        try:
            os.kill(pid, 0)
            return None
        except PermissionError:  # another user's live process
            return None
        except ProcessLookupError:
            why = "its process is gone"
    return f"the worker running this trial ({_who(attrs)}) died: {why} (killed or crashed)"


class LostWorker:
    """Fail a trial whose worker was lost (stale heartbeats, or `gone`): end its MLflow run as
    FAILED with the reason (not RUNNING forever), then queue its configuration again, once
    (Optuna's RetryFailedTrialCallback). Optuna calls it for stale heartbeats."""

    def __init__(self, tracking_uri: str):
        self.tracking_uri = tracking_uri
        self.retry = optuna.storages.RetryFailedTrialCallback(max_retry=1)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial,
                 reason: str = HEARTBEAT_LOST) -> None:
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
            try:
                tracker = tracking.Tracker(self.tracking_uri, study.study_name)
                if tracker.client.get_run(run_id).info.status == "RUNNING":
                    tracker.fail_trial(run_id, reason)
            except Exception as e:  # the study must go on even if MLflow cannot be told
                print(f"warning: could not mark MLflow run {run_id} FAILED: {e}",
                      file=sys.stderr)
        say(f"[trial {trial.number}] FAILED: {reason}; queued again")
        again = copy.copy(trial)  # the retry copies the user attributes: not the dead run's
        again.user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in _OF_THE_RUN}
        self.retry(study, again)


def fail_gone(study: optuna.Study, lost: LostWorker) -> list[int]:
    """Fail every RUNNING trial of the study whose worker is `gone` (user attribute `error`:
    why), at once, and hand it to `lost`; the numbers of the trials failed. A trial another
    search failed meanwhile is left to it."""
    from optuna.exceptions import UpdateFinishedTrialError
    storage, failed = study._storage, []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        reason = gone(trial.user_attrs)
        if reason is None:
            continue
        try:
            storage.set_trial_user_attr(trial._trial_id, "error", reason)
            if not storage.set_trial_state_values(trial._trial_id,
                                                  optuna.trial.TrialState.FAIL):
                continue
        except UpdateFinishedTrialError:
            continue
        lost(study, storage.get_trial(trial._trial_id), reason)
        failed.append(trial.number)
    return failed


def _heartbeats(study: optuna.Study) -> tuple[int | None, dict]:
    """The storage's grace period (None: heartbeats off) and each RUNNING trial's last
    heartbeat (naive UTC, as Optuna stores it; a trial that never beat is absent)."""
    storage = getattr(study._storage, "_backend", study._storage)  # under Optuna's cache
    if not isinstance(storage, optuna.storages.RDBStorage) or not storage.heartbeat_interval:
        return None, {}
    grace = storage.grace_period or 2 * storage.heartbeat_interval
    try:  # Optuna has no public reader for heartbeats
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session
        with _create_scoped_session(storage.scoped_session) as session:
            rows = session.query(models.TrialHeartbeatModel).join(models.TrialModel).filter(
                models.TrialModel.study_id == study._study_id,
                models.TrialModel.state == optuna.trial.TrialState.RUNNING).all()
            return grace, {row.trial_id: row.heartbeat for row in rows}
    except Exception:
        return grace, {}


def still_running(study: optuna.Study) -> list[str]:
    """One line per RUNNING trial left: its number, its worker and when it becomes stale
    (its last heartbeat + the grace period, UTC), for the search's summary."""
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    if not running:
        return []
    grace, beats = _heartbeats(study)
    here = socket.gethostname()
    lines = []
    for trial in running:
        attrs = trial.user_attrs
        if attrs.get(HOST) == here and gone(attrs) is None:
            when = "its worker is alive on this host"
        elif grace is None:
            when = "no heartbeat (heartbeats off): never declared stale automatically"
        elif trial._trial_id not in beats:
            when = ("no heartbeat recorded (its worker runs without heartbeats): never "
                    "declared stale automatically")
        else:
            stale = beats[trial._trial_id] + timedelta(seconds=grace)
            when = (f"declared stale at {stale:%Y-%m-%d %H:%M:%S} UTC if it has not beaten "
                    "again by then (the next search after that fails it and runs it again)")
        lines.append(f"trial {trial.number} still RUNNING ({_who(attrs)}): {when}")
    return lines
