"""Layer 5, tuning's guard: a tuned schedule is applied only where it measures faster than the
default lowering of its task.

    records = [best_record(db, task) for task in tasks]      # None: the task has none
    choices = choose(tasks, records, folder, target,
                     lambda mods: measure(mods, target, builder, runner))
    kept = kept_database(tasks, records, choices)   # only the winning records, to apply

MetaSchedule keeps the best of the candidates it measured, not the best schedule there is: with
a few trials it can keep one slower than no schedule at all (resnet18 int8, 16 trials: 2.67 ms
tuned against 1.67 ms untuned). For every task with a record, the task's default lowering (its
fused TIR function as it is, what `tvm.compile` builds when no schedule is applied) and its best
record's schedule are built by the tuning's builder and timed by the tuning's runner (the same
evaluator settings, on the same device, local or RPC), interleaved, `ROUNDS` times each (the
least of each schedule's times counts: on a shared machine one measurement can be 2x off).
The rule (`keep_tuned`): the tuned schedule is kept when its time is below the default's, else the
default is kept (no noise margin: a tie keeps the default). A tuned schedule that does not
build or run again is not kept; where the default does not, the tuned one is.

Each pair of times is appended to `DEFAULTS_FILE` in the target's database folder, keyed by the
workload and the record, and read back instead of measured again: the choice is then a function
of the database folder (whose digest is in the stage cache's key), measured once per best
record. The database itself keeps every record (later tuning starts from them); only what is
applied changes. Kept free of torch, like `tuning`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import tvm
import tvm_ffi
from tvm.s_tir import Schedule
from tvm.s_tir import meta_schedule as ms

__all__ = ["RULE", "ROUNDS", "DEFAULTS_FILE", "CHOICES_FILE", "Choice", "keep_tuned", "mean_s",
           "record_key", "read_entries", "append_entries", "default_lowering", "measure",
           "choose", "kept_database", "write_choices"]

log = logging.getLogger(__name__)

# names the rule in the stage cache's key of tuned builds: builds applied under another rule
# (or none: every record) are not reused
RULE = "tuned-if-faster-than-default/1"
DEFAULTS_FILE = "database_default_lowering.json"  # in a target's database folder, JSON lines
CHOICES_FILE = "choices.json"                     # in a trial's exported records
_FAILED = 1e9  # MetaSchedule writes 1e10 s for a run that failed
ROUNDS = 3     # each schedule is timed this many times, interleaved; the least counts


@dataclass
class Choice:
    """One task's choice: what was applied and the times it rests on (None: not measured)."""
    task: str
    default_us: float | None
    tuned_us: float | None
    # "tuned", "default", "none" (no record: the default) or "transferred" (a similar task's
    # schedule, `transfer`): tuned_us is then the best transferred one's time, as it is for
    # "none" where one was tried and lost
    kept: str
    source: str | None = None  # transferred: the workload it came from (`transfer.Shape`)

    def row(self) -> dict:
        return asdict(self)


def keep_tuned(default_s: float | None, tuned_s: float | None) -> bool:
    """The rule: keep the tuned schedule only when it measured faster than the default
    lowering. A tuned schedule that did not measure is not kept; one whose default did not
    measure (failed to build or run) is, and so is one where neither did (nothing can be
    measured: as before there was a guard)."""
    if tuned_s is None or default_s is None:
        return default_s is None
    return tuned_s < default_s


def mean_s(run_secs) -> float | None:
    """Mean of a measurement's runs in seconds; None when there is none or any failed."""
    secs = [float(s) for s in run_secs or ()]
    if not secs or any(s >= _FAILED for s in secs):
        return None
    return sum(secs) / len(secs)


def record_key(task: ms.ExtractedTask, record: ms.database.TuningRecord) -> str:
    """Which workload and which schedule a pair of times belongs to."""
    text = f"{tvm_ffi.structural_hash(task.dispatched[0])}|{record.trace}|{record.target}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def read_entries(path: Path) -> dict[str, dict]:
    """A JSON-lines file of measurements, by each line's `key` (the first line for a key
    wins: lines are only appended, by concurrent workers too)."""
    entries = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
                entries.setdefault(entry["key"], entry)
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a crash: measured again
    return entries


def append_entries(path: Path, entries: list[dict]) -> None:
    """One short write per line in append mode: workers sharing the folder do not interleave."""
    if not entries:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        for entry in entries:
            os.write(fd, (json.dumps(entry, sort_keys=True) + "\n").encode())
    finally:
        os.close(fd)


def default_lowering(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """What a task compiles to without a record: on a CPU its TIR as it is (plain loops); on
    a GPU dlight's fallback schedule (a kernel needs a thread binding), as the compiler
    gives the functions left unscheduled."""
    if "gpu" not in target.keys:
        return mod
    from tvm.s_tir import dlight
    with target:
        return dlight.ApplyDefaultSchedule(dlight.gpu.Fallback())(mod)


def measure(mods: list[tvm.IRModule], target: tvm.target.Target, builder: ms.builder.Builder,
            runner: ms.runner.Runner, rounds: int = ROUNDS) -> list[float | None]:
    """Seconds of each TIR module, built and timed the way MetaSchedule measures its
    candidates (its builder input, its runner input with the entry function's arguments,
    layout-rewrite preprocessing removed), `rounds` times over the whole list; the least of
    the rounds' means (the others were slowed by something else), None where building or
    every run failed."""
    built = builder.build([ms.builder.BuilderInput(mod, target) for mod in mods])
    device = str(tvm.runtime.device(target.get_target_device_type())).split(":")[0]  # cpu
    inputs, which = [], []
    for i, (mod, result) in enumerate(zip(mods, built)):
        if result.error_msg is None:
            inputs.append(ms.runner.RunnerInput(
                result.artifact_path, device,
                ms.arg_info.ArgInfo.from_entry_func(mod, remove_preproc=True)))
            which.append(i)
        else:
            log.warning("a schedule to compare did not build: %s",
                        result.error_msg.strip().splitlines()[-1][:300])
    times: list[list[float]] = [[] for _ in mods]
    try:
        for i, future in zip(which * rounds, runner.run(inputs * rounds) if inputs else []):
            result = future.result()
            if result.error_msg:
                log.warning("a schedule to compare did not run: %s",
                            result.error_msg.strip().splitlines()[-1][:300])
            elif (mean := mean_s(result.run_secs)) is not None:
                times[i].append(mean)
    finally:
        for result in built:  # the builder's temporary folders
            if result.artifact_path:
                shutil.rmtree(Path(result.artifact_path).parent, ignore_errors=True)
    return [min(t) if t else None for t in times]


def choose(tasks: list[ms.ExtractedTask], records: list, folder: Path,
           target: tvm.target.Target,
           timer: Callable[[list[tvm.IRModule]], list[float | None]]) -> list[Choice]:
    """Each task's choice between its best record (None: it has none) and its default
    lowering. The pairs not yet in `folder`'s `DEFAULTS_FILE` are timed, default then tuned
    for each task, by `timer` (modules in, mean seconds or None out: `measure` with the
    tuning's builder and runner) and added to it."""
    stored = read_entries(folder / DEFAULTS_FILE)
    keys = [record_key(t, r) if r is not None else None for t, r in zip(tasks, records)]
    todo = [i for i, key in enumerate(keys) if key is not None and key not in stored]
    if todo:
        mods = []
        for i in todo:  # default then tuned, per task: side by side
            sch = Schedule(tasks[i].dispatched[0])
            records[i].trace.apply_to_schedule(sch, remove_postproc=False)
            mods += [default_lowering(tasks[i].dispatched[0], target), sch.mod]
        times = timer(mods)
        fresh = []
        for n, i in enumerate(todo):
            default_s, tuned_s = times[2 * n], times[2 * n + 1]
            entry = {"key": keys[i], "task": tasks[i].task_name, "default_s": default_s,
                     "tuned_s": tuned_s}
            stored[keys[i]] = entry
            if default_s is not None and tuned_s is not None:  # a failure is tried again
                fresh.append(entry)
        append_entries(folder / DEFAULTS_FILE, fresh)
    choices = []
    for task, key in zip(tasks, keys):
        if key is None:
            choices.append(Choice(task.task_name, None, None, "none"))
            continue
        default_s, tuned_s = stored[key]["default_s"], stored[key]["tuned_s"]
        choices.append(Choice(
            task.task_name, None if default_s is None else 1e6 * default_s,
            None if tuned_s is None else 1e6 * tuned_s,
            "tuned" if keep_tuned(default_s, tuned_s) else "default"))
    return choices


def kept_database(tasks: list[ms.ExtractedTask], records: list,
                  choices: list[Choice]) -> ms.database.Database:
    """An in-memory database with the record of each task whose tuned (or transferred)
    schedule was kept: applying it leaves the other tasks with their default lowering."""
    kept = ms.database.MemoryDatabase(module_equality="structural")
    for task, record, choice in zip(tasks, records, choices):
        if choice.kept in ("tuned", "transferred"):
            kept.commit_tuning_record(ms.database.TuningRecord(
                record.trace, kept.commit_workload(task.mod), record.run_secs,
                record.target, record.args_info))
    return kept


def write_choices(choices: list[Choice], folder: Path) -> Path:
    """The per-task choices as `CHOICES_FILE` beside a trial's exported records."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CHOICES_FILE
    path.write_text(json.dumps([c.row() for c in choices], indent=1) + "\n")
    return path
