"""Layer 5, tuning: MetaSchedule schedules for a model's task functions, kept and reused.

    tuned, report = tune(mod, target, trials=200, database_dir="tracking/tuning")

`mod` is a legalised Relax module (the algorithm layer has lowered its convs). It is fused
with the "zero" pipeline first (MetaSchedule finds no tasks in an unfused module), each fused
TIR function is a task, and the database is applied with `MetaScheduleApplyDatabase` (not
`compile_relax`, which re-fuses and misses records). The database lives in one folder per
target under `database_dir`, so its records are keyed by workload (MetaSchedule's structural
hash) and target: a task with a record there is reused and spends no new trials. Functions
that carry their own schedule (our sparse kernels, `tirx.is_scheduled`) are not tasks. A
task's best record is applied only where it measures faster than the task's default lowering
(`tuning_guard`); the others keep the default and are reported in `kept_default`. A task left
without a record gets the schedule of a similar tuned task where that measures faster than its
default (`transfer`; reported in `transferred`).

Kept free of torch so the builder and runner worker processes start quickly.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import tvm
from tvm import relax
from tvm.ir.utils import derived_object
from tvm.s_tir.analysis import estimate_tir_flops
from tvm.s_tir import meta_schedule as ms

from . import transfer as _transfer
from . import tuning_guard, tuning_measure
from .tuning_measure import KeptPoolBuilder, runner, stub_foreign_intrinsics, used_intrinsics

__all__ = ["SCHEDULED", "TuningReport", "target_folder", "open_database", "fuse",
           "task_functions", "best_record", "KeptPoolBuilder", "SEARCH_RETRIES",
           "search_strategy", "tune", "export_records"]


log = logging.getLogger(__name__)

SCHEDULED = "tirx.is_scheduled"
@dataclass
class TuningReport:
    """What tuning did, for the trial's metrics and for the user who asks "was it tuned?"."""
    tasks: int                  # fused TIR functions MetaSchedule could tune
    hand_scheduled: int         # functions with their own schedule (sparse kernels)
    reused: int                 # tasks whose schedule came from the database as it was
    tuned: int                  # tasks tuned in this call
    scheduled: int              # task functions that received a schedule in the end
    untuned: list[str] = field(default_factory=list)  # task functions left without one
    # tasks with a record whose tuned schedule measured slower than their default lowering
    # (tuning_guard): the default is applied; the record stays in the database
    kept_default: list[str] = field(default_factory=list)
    # tasks without a record that run a similar task's schedule (`transfer`): it measured
    # faster than their default lowering
    transferred: list[str] = field(default_factory=list)
    own: int = 0                # tasks that run their own record (the guard kept it)
    new_trials: int = 0         # measurements added to the database by this call
    tune_s: float = 0.0
    database: Path | None = None
    # per task: name, count in the model, FLOPs of one call, best measured us (None: no
    # record), and the guard's choice: default_us, tuned_us (measured side by side), kept
    # (tuned, default, none, transferred) and source (where a transferred schedule came from)
    task_table: list[dict] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Tasks by the schedule they run: their own record, a transferred one, the default."""
        moved = len(getattr(self, "transferred", []))  # a report stored before: none
        return {"own": self.own, "transferred": moved, "default": self.tasks - self.own - moved}

    def metrics(self) -> dict[str, float]:
        return {"tuning_tasks": float(self.tasks), "tuning_tasks_scheduled": float(self.scheduled),
                "tuning_tasks_untuned": float(len(self.untuned)),
                "tuning_tasks_reused": float(self.reused),
                "tuning_tasks_kept_default": float(len(self.kept_default)),
                **{f"tuning_tasks_{k}": float(v) for k, v in self.counts().items()},
                "tuning_new_trials": float(self.new_trials), "tune_s": self.tune_s,
                "hand_scheduled_kernels": float(self.hand_scheduled)}


def target_folder(database_dir: str | Path, target: tvm.target.Target,
                  device: str | None = None, cold_weights: bool = False) -> Path:
    """The database folder of one target (and remote device key): records only match the
    target and device they were measured on (MetaSchedule's own lookup ignores the target).
    Records measured with cold weights get a folder of their own (their times are not
    comparable with warm ones)."""
    text = str(target) + (f" @{device}" if device else "") + (" cold" if cold_weights else "")
    kind = tvm.target.Target(target).kind.name
    mcpu = str(target.attrs.get("mcpu", "")) or "generic"
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{kind}-{mcpu}" + (f"-{device}" if device else "")
                  + ("-cold" if cold_weights else ""))
    return Path(database_dir) / f"{slug}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def open_database(folder: Path) -> ms.database.JSONDatabase:
    folder.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(work_dir=str(folder), module_equality="structural")


def fuse(mod: tvm.IRModule) -> tvm.IRModule:
    """Legalise what is left and fuse into the task functions MetaSchedule tunes."""
    return relax.get_pipeline("zero")(mod)


def _is_scheduled(func) -> bool:
    return func.attrs is not None and SCHEDULED in func.attrs and bool(func.attrs[SCHEDULED])


def task_functions(mod: tvm.IRModule) -> tuple[list[str], list[str]]:
    """Names of the module's TIR functions: (to tune, carrying their own schedule)."""
    tunable, hand = [], []
    for gv, func in mod.functions.items():
        if isinstance(func, tvm.tirx.PrimFunc):
            (hand if _is_scheduled(func) else tunable).append(gv.name_hint)
    return sorted(tunable), sorted(hand)


def best_record(db: ms.database.Database, task: ms.ExtractedTask):
    """The task's best tuning record, or None (has_workload first: a lookup would commit the
    workload into the database)."""
    if not db.has_workload(task.mod):
        return None
    top = db.get_top_k(db.commit_workload(task.mod), 1)
    return top[0] if top else None


def _task_row(db: ms.database.Database, task: ms.ExtractedTask) -> dict:
    """What one task costs: where the time goes, and how far it is from the machine's peak."""
    record, best = best_record(db, task), None
    if record is not None and record.run_secs:
        best = 1e6 * sum(float(s) for s in record.run_secs) / len(record.run_secs)
    return {"task": task.task_name, "count": int(task.weight),
            "flops": float(estimate_tir_flops(task.dispatched[0])), "best_us": best}


@derived_object
class _Progress(ms.measure_callback.PyMeasureCallback):
    """A progress line per measured batch: trials so far of the budget, and failures."""

    def __init__(self, budget: int, names: list[str]) -> None:
        self.budget, self.names, self.done, self.failed = budget, names, 0, 0
        self.start = time.perf_counter()

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results,
              runner_results) -> None:
        self.done += len(runner_results)
        self.failed += sum(1 for b, r in zip(builder_results, runner_results)
                           if b.error_msg or r.error_msg)
        print(f"  tuning {self.done}/{self.budget} trials ({self.failed} failed) "
              f"{time.perf_counter() - self.start:.0f} s, last task {self.names[task_id]}",
              file=sys.stderr, flush=True)


SEARCH_RETRIES = 2  # further MetaSchedule runs after one stops on an internal error


def search_strategy(trials: int, tasks: int) -> ms.search_strategy.EvolutionarySearch:
    """MetaSchedule's evolutionary search with its population cut for small budgets: a task
    measured once or twice gets its candidates from an untrained cost model, so evolving 512
    schedules (25 s of search per resnet18 conv on 2 cores) buys nothing over 64. From 16
    trials per task up, MetaSchedule's defaults."""
    per_task = max(1, trials // max(1, tasks))
    population = max(64, min(512, 32 * per_task))
    return ms.search_strategy.EvolutionarySearch(
        population_size=population, init_min_unmeasured=min(50, population))


def tune(mod: tvm.IRModule, target: tvm.target.Target, trials: int,
         database_dir: str | Path, threads: int = 1, seed: int = 0, progress: bool = True,
         export_to: Path | None = None, rpc: tuple[str, int, str] | None = None,
         extend: bool = False, cold_weights: bool = False,
         transfer: bool = True) -> tuple[tvm.IRModule, TuningReport]:
    """Tune the tasks of `mod` not yet in the database (a global budget of `trials`
    measurements) and return the fused module with every recorded schedule applied;
    `export_to` receives the best record of each task as a database of its own; `rpc`
    (tracker host, port, device key) measures the candidates on that remote device; `extend`
    tunes the tasks already in the database too (MetaSchedule's search starts from their
    best records), to add trials to an earlier run; `cold_weights` measures every candidate
    with its weights (every argument but the input) evicted from the caches, as they are in a
    whole model whose weights exceed the last-level cache, so the search prefers schedules
    that stream them well; `transfer` gives the tasks still without a record the schedule of
    a similar tuned task where it measures faster than their default (`trials` 0: only that)."""
    start = time.perf_counter()
    keep = used_intrinsics(target)
    if target.kind.name == "llvm":
        stub_foreign_intrinsics(keep)
    mod = fuse(mod)
    tunable, hand = task_functions(mod)
    folder = target_folder(database_dir, target, rpc[2] if rpc else None, cold_weights)
    db = open_database(folder)
    tasks = [t for t in ms.relax_integration.extract_tasks(mod, target)
             if not any(_is_scheduled(f) for f in t.mod.functions.values())]
    todo = tasks if extend else [t for t in tasks if best_record(db, t) is None]
    before = len(db.get_all_tuning_records())
    if todo and trials > 0:
        log.info("tuning %d of %d tasks with %d trials (database %s)", len(todo), len(tasks),
                 trials, folder)
        # MetaSchedule's search can stop on an internal error in one task's sampling (seen
        # with Winograd: "The block no longer exists in the IRModule"); the records measured
        # so far are kept and the tasks still without one get another seed
        pending = todo
        for attempt in range(1 + SEARCH_RETRIES):
            left = trials - (len(db.get_all_tuning_records()) - before)
            if attempt and not extend:  # the stopped run may have left records for some
                pending = [t for t in pending if best_record(db, t) is None]
            if not pending or left <= 0:
                break
            try:
                _run_metaschedule(pending, db, target, left, threads, seed + attempt, rpc, keep,
                                  progress, cold_weights)
                break
            except RuntimeError as err:  # raised from MetaSchedule's C++ search threads
                what = str(err).strip().splitlines()[-1] if str(err).strip() else repr(err)
                if attempt == SEARCH_RETRIES:
                    log.error("MetaSchedule failed %d times (%s): the tasks without a record "
                              "keep the default schedule", attempt + 1, what)
                else:
                    log.warning("MetaSchedule stopped on an error (%s); tuning the tasks "
                                "still without a record again with seed %d", what,
                                seed + attempt + 1)
    # the guard: a task's best record is applied only if it measures faster than the task's
    # default lowering (tuning_guard); the database keeps every record
    records = [best_record(db, task) for task in tasks]
    timer = tuning_measure.timer(target, threads, rpc, keep, cold_weights)
    choices = tuning_guard.choose(tasks, records, folder, target, timer)
    if transfer:  # the tasks without a record: a similar task's schedule, where it is faster
        for i, move in _transfer.transfer(tasks, records, db, folder, target, timer).items():
            records[i], choices[i] = move.record, move.choice
    kept = tuning_guard.kept_database(tasks, records, choices)
    applied = _apply(mod, target, kept)
    unscheduled, _ = task_functions(applied)
    kept_default = [c.task for c in choices if c.kept == "default"]
    report = TuningReport(
        tasks=len(tasks), hand_scheduled=len(hand),
        reused=len(tasks) - len(todo), tuned=len(todo) if trials > 0 else 0,
        scheduled=len(tunable) - len(unscheduled), kept_default=kept_default,
        untuned=[name for name in unscheduled if name not in kept_default],
        transferred=[c.task for c in choices if c.kept == "transferred"],
        own=sum(1 for c in choices if c.kept == "tuned"),
        new_trials=len(db.get_all_tuning_records()) - before,
        tune_s=time.perf_counter() - start, database=folder)
    report.task_table = [{**_task_row(db, task), **choice.row()}
                         for task, choice in zip(tasks, choices)]
    if export_to is not None:  # the records applied: own and transferred
        export_records(kept, [t for t, c in zip(tasks, choices)
                              if c.kept in ("tuned", "transferred")], export_to)
        tuning_guard.write_choices(choices, export_to)
    if report.untuned:
        log.warning("%d of %d task functions have no tuned schedule: %s", len(report.untuned),
                    len(tunable), ", ".join(report.untuned))
    compared = sum(1 for c in choices if c.kept in ("tuned", "default"))
    if compared:
        log.log(logging.WARNING if kept_default else logging.INFO,
                "%d of %d tuned tasks kept the default schedule (their tuned one measured "
                "slower)%s", len(kept_default), compared,
                ": " + ", ".join(kept_default) if kept_default else "")
    counts = report.counts()
    line = (f"tuning: {counts['own']} of {len(tasks)} tasks run their own schedule, "
            f"{counts['transferred']} a transferred one, {counts['default']} the default")
    if progress:  # as the progress lines: the user's view of a tuning compile
        print(line, file=sys.stderr, flush=True)
    else:
        log.info(line)
    return applied, report


def _apply(mod: tvm.IRModule, target: tvm.target.Target,
           db: ms.database.Database) -> tvm.IRModule:
    with target, db, tvm.transform.PassContext(opt_level=3):
        return relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)


def _run_metaschedule(todo: list, db: ms.database.Database, target: tvm.target.Target,
                      trials: int, threads: int, seed: int,
                      rpc: tuple[str, int, str] | None, keep: tuple[str, ...],
                      progress: bool, cold_weights: bool = False) -> None:
    """One MetaSchedule run over the tasks `todo`, its records committed to `db`."""
    # MetaSchedule's loggers print task tables on stdout: keep stdout for results (--json)
    # MetaSchedule's logger config lists the handlers already on its logger by name: an
    # unnamed one (left by an earlier run in this process) breaks it (None.format)
    ms_log = logging.getLogger("tvm.s_tir.meta_schedule")
    ms_log.handlers = [h for h in ms_log.handlers if h.get_name()]
    # its per-task tables (hundreds of lines per run) only on request: our progress line says
    # how tuning goes (its console handler takes this level; each run's config sets DEBUG)
    ms_log.setLevel(os.environ.get("DLAS_TUNING_LOG", "WARNING").upper())
    with tempfile.TemporaryDirectory(prefix="dlas-tune-") as work_dir, \
            contextlib.redirect_stdout(sys.stderr):
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            todo, work_dir, strategy=search_strategy(trials, len(todo)),
            num_threads=max(1, threads), seed=seed)
        callbacks = ms.measure_callback.MeasureCallback.create("default")
        if progress:
            callbacks = [*callbacks, _Progress(trials, [t.task_name for t in todo])]
        builder = KeptPoolBuilder(max_workers=max(1, threads), timeout_sec=120,
                                  initializer=partial(stub_foreign_intrinsics, keep))
        try:
            ms.tune.tune_tasks(
                tasks=contexts, task_weights=weights, work_dir=work_dir,
                # batches small enough that the budget reaches every task at least once
                max_trials_global=trials,
                num_trials_per_iter=max(1, min(64, trials // len(todo))),
                builder=builder, runner=runner(threads, rpc, cold_weights), database=db,
                measure_callbacks=callbacks)
        finally:
            builder.close()


def export_records(source: ms.database.Database, tasks: list[ms.ExtractedTask],
                   destination: Path) -> Path:
    """The best record of each task, as a JSON database of its own (a run artifact a user
    can point another study at)."""
    if destination.exists():
        shutil.rmtree(destination)
    out = open_database(destination)
    for task in tasks:
        record = best_record(source, task)
        if record is not None:
            out.commit_tuning_record(ms.database.TuningRecord(
                record.trace, out.commit_workload(task.mod), record.run_secs,
                record.target, record.args_info))
    return destination
