"""The Optuna study: storage, sampler, objectives and budget; each trial walks the pipeline and
lands in MLflow. A trial that raises fails alone; the study goes on.
"""
from __future__ import annotations

import json
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from . import compiler, console, data, glance, hardware, models, pareto, samplers, tracking
from .budget import Budget, estimate, grid_left
from .rounds import run_rounds
from .cache import StageCache
from .confirm import ROUNDS, confirm
from .console import say as _say
from .errors import BadInput
from .objective import Objective, config_key, suggest_new  # noqa: F401  (the search's API)
from .space import Space, TrialConfig
from .workers import LostWorker, fail_gone, still_running

__all__ = ["default_storage", "check_storage", "preflight", "check_targets",
           "check_config", "make_sampler", "SearchOutcome", "DEFAULT_HEARTBEAT_S",
           "run_search", "shares"]


def default_storage() -> str:
    return f"sqlite:///{(tracking.TRACKING_DIR / 'optuna.db').resolve()}"


def check_storage(url: str) -> str:
    """Any SQLAlchemy URL Optuna can use; a SQLite file must be creatable."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise BadInput(f"--storage {url!r}: not a SQLAlchemy URL; e.g. sqlite:///tracking/"
                       "optuna.db or postgresql://user:pass@host/db") from None
    if parsed.get_backend_name() == "sqlite":
        tracking._check_sqlite_path(url, "--storage")
    else:
        tracking.check_database(url, "--storage")
    return url


def preflight(space: Space) -> None:
    """Checks that need no work (folders, packages, checkpoints) for every data and model
    choice of the space: a missing dataset stops the study before it starts, not every trial;
    so does a space whose constraints rule out every configuration."""
    for config in space.layer_variants("data", "model", "compiler"):
        _check_layers(config)
    reason = space.ruled_out()
    if reason:
        raise BadInput(reason)
    check_targets(space.layer_variants("hw"))


def check_targets(configs: list[TrialConfig]) -> None:
    """Every target the configurations name must be known and well formed (else BadInput);
    the ones that cannot run now (no GPU, tracker down, no device) are named, and only when
    none of them can run is that a BadInput: otherwise their trials fail alone."""
    specs = {c.hw.target: hardware.check(c.hw, c.targets) for c in configs}
    down = {name: why for name, spec in specs.items() if (why := hardware.availability(spec))}
    if down and len(down) == len(specs):
        raise BadInput("no target of the space can run now: " +
                       "; ".join(f"{name}: {why}" for name, why in down.items()))
    for name, why in down.items():
        print(f"warning: hw.target {name}: {why}; its trials will fail", file=sys.stderr)


def check_config(config: TrialConfig) -> None:
    """The early checks of one configuration to run (raise BadInput): the layers' own, and
    the space's constraints (e.g. sparse format only for unstructured-pruned fp32 models)."""
    _check_layers(config)
    if config.ruled_out:
        raise BadInput(config.ruled_out)
    check_targets([config])


def _check_layers(config: TrialConfig) -> None:
    data.check(config.data)
    models.check(config.model)
    compiler.check(config.compiler)


def make_sampler(space: Space, already: int, worker: int = 0) -> optuna.samplers.BaseSampler:
    """The space's sampler, seeded. The seed moves on with the trials already in the study, so
    a continued study explores new points instead of replaying the first run's; each worker
    has its own, or workers starting together would propose the same points."""
    seed = space.seed + already + 1_000_003 * worker
    constraints = _constraints if space.thresholds else None
    return samplers.SAMPLERS.lookup(space.sampler["name"])(space, seed, constraints)


def _constraints(trial: optuna.trial.FrozenTrial) -> list[float]:
    """The space's thresholds as Optuna constraints (<= 0: met), set by the objective; a
    trial pruned before any work has none and counts as violating."""
    return trial.user_attrs.get("constraints", [1.0])


@dataclass
class SearchOutcome:
    study: optuna.Study
    parent_run_id: str
    pareto_dir: Path
    front: list[dict]
    dead_workers: list[str] = field(default_factory=list)
    tracking_lost: str | None = None  # MLflow stopped answering: what to do about it
    running: list[str] = field(default_factory=list)  # trials left RUNNING: whose, stale when
    trials: pareto.Trials | None = None  # what the export read (None when it failed)


DEFAULT_HEARTBEAT_S = 60


def _storage(url: str, heartbeat_s: float, tracking_uri: str):
    if not heartbeat_s:
        return url
    with warnings.catch_warnings():  # heartbeat arguments are experimental in Optuna
        warnings.simplefilter("ignore")
        return optuna.storages.RDBStorage(
            url, heartbeat_interval=max(1, round(heartbeat_s)),
            grace_period=max(2, round(3 * heartbeat_s)),
            failed_trial_callback=LostWorker(tracking_uri))


def _existing_directions(storage: str, name: str) -> list[str] | None:
    if make_url(storage).get_backend_name() == "sqlite" and \
            not Path(make_url(storage).database).exists():
        return None
    for summary in optuna.get_all_study_summaries(storage):
        if summary.study_name == name:
            return [d.name.lower() for d in summary.directions]
    return None


def run_search(space: Space, *, study_name: str | None = None, trials: int | None = None,
               storage: str | None = None, tracking_uri: str | None = None,
               out_dir: str | Path | None = None, cache_dir: str | Path | None = None,
               timeout_s: float | None = None,
               heartbeat_s: float = DEFAULT_HEARTBEAT_S, workers: int = 1,
               confirm_rounds: int = ROUNDS) -> SearchOutcome:
    """Run (or continue) the study named `study_name` for `trials` more trials. A running
    trial beats every `heartbeat_s` (0: off); one silent for 3 beats (its worker was killed)
    is failed in Optuna and MLflow by the next worker and run again once. A trial whose worker
    on this host is gone is failed so at once, when the search starts and before it ends
    (workers.py); trials still running at the end are named in `running`. When the study
    finishes, the trials that could be on the front are timed again side by side in
    `confirm_rounds` rounds (confirm.py; 0: not) before the front is exported.

    `workers` > 1 runs that many processes on the same study, storage and MLflow experiment:
    this process creates them first (concurrent creation races), each worker runs its share
    of `trials`, then this process exports the front and closes the parent run once."""
    name = study_name or space.study
    storage = check_storage(storage or default_storage())
    tracking_uri = tracking.check_tracking_uri(tracking_uri or tracking.default_tracking_uri())
    if workers < 1:
        raise BadInput(f"--workers {workers}: the number of worker processes on this "
                       "machine, at least 1")
    preflight(space)
    trials = trials if trials is not None else space.trials
    if trials < 1:
        raise BadInput(f"--trials {trials}: must be at least 1")
    if heartbeat_s < 0:
        raise BadInput(f"--heartbeat {heartbeat_s:g}: seconds between heartbeats, >= 0 "
                       "(0: off)")
    if confirm_rounds < 0:
        raise BadInput(f"--confirm-rounds {confirm_rounds}: rounds of timing the front again, "
                       ">= 0 (0: off)")
    directions = _existing_directions(storage, name)
    if directions is not None and directions != space.directions:
        raise BadInput(f"study {name!r} already exists in {storage} with directions "
                       f"{directions}; this space asks for {space.directions} "
                       f"({', '.join(space.objectives)}). Use another --study name.")

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if make_url(storage).get_backend_name() == "sqlite":
        Path(make_url(storage).database).resolve().parent.mkdir(parents=True, exist_ok=True)
    study = _create_study(name, lambda: _storage(storage, heartbeat_s, tracking_uri),
                          space.directions)
    with warnings.catch_warnings():  # experimental in Optuna 5, but it names the axes
        warnings.simplefilter("ignore")
        study.set_metric_names(list(space.objectives))
    tracker = tracking.Tracker(tracking_uri, name)
    parent = tracker.open_study(space.objectives, space.path, space.text,
                                {"dlas.storage": storage, "dlas.sampler": space.sampler["name"],
                                 "dlas.description": space.description[:5000],
                                 "dlas.thresholds": json.dumps(dict(space.thresholds))})
    cache = str(cache_dir if cache_dir is not None else tracking.TRACKING_DIR / "cache")
    job = _Job(space, name, storage, tracking_uri, tracker.experiment_id, parent, cache,
               timeout_s, heartbeat_s)
    lost_worker = LostWorker(tracking_uri)
    status, dead, lost, running = "FAILED", [], None, []
    limit = timeout_s or space.timeout_s
    deadline = None if limit is None else time.monotonic() + limit
    expected = grid_left(space, study, trials) if space.sampler["name"] == "grid" else trials
    _say(estimate(study, expected, workers, timeout_s or space.timeout_s))
    try:
        fail_gone(study, lost_worker)  # before any trial: their configurations run again
        if workers == 1:
            lost = _optimize(study, job, trials, worker=0, workers=1)
        else:
            dead = _run_workers(job, trials, workers)
        if space.rounds is not None and not lost and not dead:  # the front tuned further
            lost = _rounds(study, job, deadline)
        status = "FAILED" if dead else "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        out = Path(out_dir) if out_dir else tracking.TRACKING_DIR / "pareto" / name
        front, exported = [], None
        if status == "FINISHED" and confirm_rounds:
            try:  # the front's candidates timed again side by side, before the export
                confirm(tracking_uri, name, job.cache_dir or None, confirm_rounds, say=_say)
            except Exception as e:  # the search's numbers still stand
                _say(f"warning: confirming the front failed, the search's numbers stand: {e}")
        try:
            fail_gone(study, lost_worker)  # a worker on this host died meanwhile
            running = still_running(study)
            unrun = sum(t.state == optuna.trial.TrialState.PRUNED and "stopped_at" not in
                        t.user_attrs for t in study.trials)  # a number with no run
            tracker.client.set_tag(parent, glance.UNRUN, str(unrun))
            exported = pareto.export_from_mlflow(tracking_uri, name, out, len(running))
            front = exported.front()
            counts = {s.name.lower(): sum(t.state == s for t in study.trials)
                      for s in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)}
            stopped = sum("stopped_at" in t.user_attrs for t in study.trials)  # by a gate
            tracker.close_study(status, out, {"trials_complete": counts["complete"],
                                              "trials_failed": counts["fail"],
                                              "trials_stopped": stopped,
                                              "pareto_size": len(front),
                                              **({"trials_running": len(running)}
                                                 if running else {})})
            tracking.link_launcher_run(name, tracking_uri, parent, out)
            try:  # the study's note in optuna-dashboard: its failure costs only the note
                from optuna_dashboard import save_note
                save_note(study, glance.dashboard_note(exported))
            except Exception as e:
                print(f"warning: no optuna-dashboard note: {e}", file=sys.stderr)
        except Exception as e:  # keep the study's result even if the export breaks
            print(f"warning: Pareto export failed: {e}", file=sys.stderr)
            try:
                tracker.close_study(status)
            except Exception as e:  # MLflow is gone: the study's result is in Optuna
                print(f"warning: could not close the study's MLflow run: {e}",
                      file=sys.stderr)
    return SearchOutcome(study, parent, out, front, dead, lost, running, exported)


def _create_study(name: str, make_storage, directions: list[str]) -> optuna.Study:
    """Create or load the study. Launchers on several machines may create a new storage's
    tables at the same moment: the losers see "already exists" or a duplicate key and load it
    on a second try."""
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
    for attempt in range(3):
        try:
            return optuna.create_study(study_name=name, storage=make_storage(),
                                       directions=directions, load_if_exists=True)
        except (IntegrityError, OperationalError, ProgrammingError):
            if attempt == 2:
                raise
            time.sleep(1 + attempt)


@dataclass
class _Job:
    """What a worker needs to join the study the launcher created (picklable)."""
    space: Space
    study: str
    storage: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    cache_dir: str  # "" disables the stage cache
    timeout_s: float | None
    heartbeat_s: float


def shares(trials: int, workers: int) -> list[int]:
    """Split a budget exactly: worker i runs shares[i] trials, the first ones one more when
    it does not divide; a worker with nothing to run is not started."""
    base, extra = divmod(trials, workers)
    return [n for n in (base + (i < extra) for i in range(workers)) if n]


def _run_workers(job: _Job, trials: int, workers: int) -> list[str]:
    """Start one process per share, wait for all; return a line for each that died (the
    others finish their shares)."""
    import multiprocessing
    context = multiprocessing.get_context("spawn")  # fork would copy torch's threads
    split = shares(trials, workers)
    if len(split) < workers:
        _say(f"{trials} trial(s) for {workers} workers: starting {len(split)}")
    _say(f"{len(split)} workers on study {job.study}: shares {', '.join(map(str, split))} "
         f"(= {trials} trials)")
    procs = [context.Process(target=_worker, args=(job, share, i, len(split)),
                             name=f"dlas-worker-{i}")
             for i, share in enumerate(split)]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        for p in procs:
            p.join(30)  # Ctrl-C reached the workers too: let them fail their runs
            if p.is_alive():
                p.terminate()
        raise
    dead = [f"worker {i} exited with code {p.exitcode}"
            for i, p in enumerate(procs) if p.exitcode != 0]
    for line in dead:
        _say(f"{line}; its share may be short (the other workers finished theirs)")
    return dead


def _worker(job: _Job, share: int, index: int, workers: int) -> None:
    """One worker process: join the existing study and MLflow parent run, run `share`."""
    console.PREFIX = f"[worker {index}] "
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    timing_threads = max((v for v in job.space.params["hw.threads"].values() if v),
                         default=1) if "hw.threads" in job.space.params else 1
    cpus = hardware.away_from_timing(timing_threads, workers)
    _say(f"training and compiling on CPUs {cpus}, timing (one worker at a time) on the first "
         f"{timing_threads}" if cpus else
         f"{workers} workers and {len(hardware.MACHINE_CPUS)} CPUs: no CPU to spare for timing "
         "alone; timing takes turns (a lock) and is repeated when disturbed")
    study = optuna.load_study(study_name=job.study, storage=_storage(
        job.storage, job.heartbeat_s, job.tracking_uri))
    if _optimize(study, job, share, worker=index, workers=workers):
        raise SystemExit(1)  # MLflow went away: the launcher reports this worker


def _rounds(study: optuna.Study, job: _Job, deadline: float | None) -> str | None:
    """Tuning rounds (rounds.py) in this process, after the study's trials ran."""
    tracker = tracking.Tracker(job.tracking_uri, job.study)
    tracker.attach(job.experiment_id, job.parent_run_id)
    objective = Objective(job.space, tracker, StageCache(job.cache_dir))
    ran = run_rounds(study, objective, job.space.rounds, job.tracking_uri, job.study, deadline,
                     _say)
    if ran:
        _say(f"tuning rounds: {ran} extension(s) ran")
    return objective.tracking_lost


def _optimize(study: optuna.Study, job: _Job, trials: int, worker: int,
              workers: int) -> str | None:
    """Run trials of the study in this process until `trials` of them ran (or the space is
    exhausted, or the timeout, or MLflow went away: then why). Trials and their MLflow runs
    only: the study's parent run is the launcher's."""
    space = job.space
    study.sampler = make_sampler(space, len(study.trials), worker)
    tracker = tracking.Tracker(job.tracking_uri, job.study)
    tracker.attach(job.experiment_id, job.parent_run_id)
    objective = Objective(space, tracker, StageCache(job.cache_dir))
    grid = space.sampler["name"] == "grid"
    budget = Budget(trials, None if grid else 30, bar=workers == 1,
                    expected=grid_left(space, study, trials) if grid else None)
    try:
        study.optimize(objective, timeout=job.timeout_s or space.timeout_s, catch=(Exception,),
                       callbacks=[budget], gc_after_trial=True)
    finally:
        budget.close()
        if budget.exhausted:
            _say(f"stopped early: the last {budget.skipped} samples all repeated finished "
                 "trials or were ruled out by the space's constraints (the space looks "
                 "exhausted)")
    return objective.tracking_lost
