"""Layer 5, transfer-tuning: a task with no record of its own borrows the schedule of the most
similar tuned tasks in the database, where that measures faster than its default lowering.

    moves = transfer(tasks, records, db, folder, target, timer)  # records[i] None: no own record
    moves[i].choice.kept                                         # "transferred" or "none"

Why: channel pruning gives every conv new shapes at every ratio, and a new model brings shapes no
study tuned; without a record those tasks ran TVM's default lowering (plain loops, 16x slower
than a 24-trial schedule for a small conv here) unless trials were spent on each of them. A
MetaSchedule trace names blocks and loops, not extents, so the trace of a conv tuned at one shape
replays on the same operator pattern at another: the split factors are re-derived where they no
longer divide the new extents (TVM's SamplePerfectTile does that on replay), and the target's
postprocessors run afresh on the replayed trace (as MetaSchedule does for a mutated one), so the
parallel, vectorise and unroll rewrites fit the new loops.

Similarity: the same operator pattern (`Shape.pattern`: the same blocks in the same order, each
with its iterator kinds and the kinds of arithmetic in its body), which is what a task's name
says once its counters are dropped (`fused_conv2d1_add1_relu1`, `fused_conv2d9_add7_relu4`: a
conv, a bias, a ReLU). It is read from the workload because the database stores no task names,
and the names are counters per model (a channel-pruned resnet18 has a `fused_conv2d1_add1_relu1`
of other shapes than the unpruned one's). Among those the distance is the sum over the blocks'
iterators of |log(extent ratio)|. The candidates are `TOP_K` distinct traces (the best record of
each such workload, nearest first, then their second best: `nearest`), timed side by side with
the default lowering by the guard's timer (the tuning's builder and runner,
`tuning_guard.measure`); the fastest is kept when it beats the default
(`tuning_guard.keep_tuned`). No MetaSchedule trial is spent.

Each outcome (times, winner) is appended to `OUTCOMES_FILE` in the `FOLDER` subfolder of the
target's database folder, keyed by the workload and the candidates' traces, and a winning
schedule is committed to the JSON database in that subfolder: the main database keeps meaning
"measured by MetaSchedule for this workload" (transferred records are never sources), a later
compile reads the outcome instead of measuring, a lost transfer is not measured again, and a
task is measured again only when the database offers it other candidates. Kept free of torch.
"""
from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import tvm
import tvm_ffi
from tvm.s_tir import Schedule
from tvm.s_tir.analysis import estimate_tir_flops
from tvm.s_tir import meta_schedule as ms

from . import tuning_guard

__all__ = ["TOP_K", "MIN_SHARE", "FOLDER", "OUTCOMES_FILE", "Shape", "shape_of", "distance", "Source",
           "Candidate", "sources", "nearest", "replay", "Move", "transfer", "open_transferred"]

log = logging.getLogger(__name__)

TOP_K = 3                        # candidates (distinct traces) tried per task
FOLDER = "transferred"           # in a target's database folder: a JSON database of its own
OUTCOMES_FILE = "outcomes.json"  # in FOLDER, JSON lines
_SEED = 1                        # the replay's random state (split factors re-derived): fixed
# a task doing less than this share of the model's FLOPs keeps its default lowering untried:
# timing candidates (about 2 s a task) costs more than such a task can win (an int8 model has
# dozens of requantising element-wise tasks beside its convs)
MIN_SHARE = 0.01
# expression fields walked for the kinds of arithmetic in a block (indices are not: a stride
# is a shape, not another operator)
_CHILDREN = ("a", "b", "value", "condition", "true_value", "false_value", "body", "seq", "args")


@dataclass(frozen=True)
class Shape:
    """A workload as transfer compares it: its operator pattern and its loop extents."""
    pattern: tuple   # per block: (name, iterator kinds, written dtype, arithmetic kinds)
    extents: tuple   # every block iterator's extent, in pattern order
    label: str       # for reports: the block with the most iterators and its extents

    def __str__(self) -> str:
        return self.label


def _kinds(node, out: set) -> set:
    """The kinds of operation in an expression or statement (loads are leaves)."""
    if isinstance(node, (list, tuple, tvm_ffi.Array)):
        for child in node:
            _kinds(child, out)
        return out
    if node is None or isinstance(node, (int, float, str, bool)):
        return out
    name = type(node).__name__
    op = getattr(node, "op", None)
    out.add(f"{name}:{op.name}" if hasattr(op, "name") else name)
    if not name.endswith("Load"):
        for attr in _CHILDREN:
            _kinds(getattr(node, attr, None), out)
    return out


def shape_of(mod: tvm.IRModule) -> Shape | None:
    """The pattern and extents of a task's unscheduled function; None where an extent is not
    a constant or the function has no root block (nothing to compare)."""
    try:
        sch = Schedule(mod)
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
    except Exception as err:  # pylint: disable=broad-except  # TVM's errors have many classes
        log.debug("no blocks to compare: %s",
                  (str(err).strip().splitlines() or [repr(err)])[-1])
        return None
    pattern, extents, widest = [], [], (-1, "")
    for ref in blocks:
        block = sch.get(ref)
        sizes = [iv.dom.extent for iv in block.iter_vars]
        if not all(isinstance(s, tvm.tirx.IntImm) for s in sizes):
            return None
        sizes = [int(s) for s in sizes]
        written = str(block.writes[0].source.dtype) if len(block.writes) else ""
        pattern.append((block.name_hint, tuple(int(iv.iter_type) for iv in block.iter_vars),
                        written, tuple(sorted(_kinds(block.body, set())))))
        extents += sizes
        if len(sizes) > widest[0]:
            widest = (len(sizes), f"{block.name_hint}{tuple(sizes)}".replace(" ", ""))
    return Shape(tuple(pattern), tuple(extents), widest[1])


def distance(a: Shape, b: Shape) -> float:
    """How far apart two workloads are: infinite across operator patterns, else the sum of
    |log(extent ratio)| over their iterators (0: the same extents)."""
    if a.pattern != b.pattern:
        return math.inf
    return sum(abs(math.log(x) - math.log(y)) for x, y in zip(a.extents, b.extents)
               if x > 0 and y > 0)


@dataclass
class Source:
    """A tuned workload of the database and its best records, fastest first."""
    shape: Shape
    records: list  # of ms.database.TuningRecord
    hash: str      # the workload's structural hash (orders ties)


@dataclass
class Candidate:
    """A record to try on a task, and the workload it was measured on."""
    source: Shape
    record: ms.database.TuningRecord


def sources(db: ms.database.Database, k: int = TOP_K) -> list[Source]:
    """Every workload of `db` with a measured record, and its `k` best records."""
    seen, found = set(), []
    for record in db.get_all_tuning_records():
        key = str(tvm_ffi.structural_hash(record.workload.mod))
        if key in seen:
            continue
        seen.add(key)
        top = [r for r in db.get_top_k(record.workload, k)
               if tuning_guard.mean_s(r.run_secs) is not None]
        shape = shape_of(record.workload.mod) if top else None
        if shape is not None:
            found.append(Source(shape, top, key))
    return found


def nearest(shape: Shape, pool: list[Source], k: int = TOP_K) -> list[Candidate]:
    """Up to `k` distinct traces from the sources of `shape`'s pattern: the best record of
    each, nearest source first (ties by hash), then, while fewer than `k`, their second best,
    and so on (one source's schedules do not all transfer alike: of the four best of a conv
    tuned at 12x12, replayed at 20x20, one beat the default loops and three lost)."""
    ranked = sorted(((distance(shape, s.shape), s.hash, s) for s in pool), key=lambda t: t[:2])
    near = [s for far, _, s in ranked if far < math.inf]
    chosen, traces = [], set()
    for rank in range(max((len(s.records) for s in near), default=0)):
        for source in near:
            if rank < len(source.records) and len(chosen) < k:
                record = source.records[rank]
                if str(record.trace) not in traces:
                    traces.add(str(record.trace))
                    chosen.append(Candidate(source.shape, record))
    return chosen


def replay(task: ms.ExtractedTask, record: ms.database.TuningRecord,
           target: tvm.target.Target) -> Schedule | None:
    """`record`'s trace on `task`'s function, without its postprocessing, then the target's
    postprocessors applied anew; None where the trace does not apply or a postprocessor
    refuses the result."""
    mod = task.dispatched[0]
    try:
        sch = Schedule(mod, seed=_SEED)
        record.trace.apply_to_schedule(sch, remove_postproc=True)
        context = ms.TuneContext(mod=mod, target=target, space_generator="post-order-apply",
                                 task_name=task.task_name)
        sch.enter_postproc()
        for postproc in context.space_generator.postprocs:
            if not postproc.apply(sch):
                log.debug("%s: postprocessor %s refused a transferred trace", task.task_name,
                          type(postproc).__name__)
                return None
    except Exception as err:  # pylint: disable=broad-except  # TVM's errors have many classes:
        # whichever a replay raises, the trace does not fit this workload
        log.debug("%s: a trace of another shape does not replay: %s", task.task_name,
                  (str(err).strip().splitlines() or [repr(err)])[-1])
        return None
    return sch


@dataclass
class Move:
    """One task's transfer: the choice (kept "transferred" or "none") and the record applied."""
    choice: tuning_guard.Choice
    record: ms.database.TuningRecord | None


def open_transferred(folder: Path) -> ms.database.JSONDatabase:
    """The database of transferred schedules in a target's database folder."""
    (folder / FOLDER).mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(work_dir=str(folder / FOLDER), module_equality="structural")


def _trace_key(trace) -> str:
    return hashlib.sha256(str(trace).encode()).hexdigest()[:32]


def _key(task: ms.ExtractedTask, chosen: list[Candidate], target: tvm.target.Target) -> str:
    text = "|".join([str(tvm_ffi.structural_hash(task.dispatched[0])), str(target),
                     *(str(s.record.trace) for s in chosen)])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _stored_record(db: ms.database.Database, task: ms.ExtractedTask,
                   trace_key: str) -> ms.database.TuningRecord | None:
    if not db.has_workload(task.mod):
        return None
    return next((r for r in db.get_top_k(db.commit_workload(task.mod), 1 << 16)
                 if _trace_key(r.trace) == trace_key), None)


def _us(seconds: float | None) -> float | None:
    return None if seconds is None else 1e6 * seconds


def transfer(tasks: list[ms.ExtractedTask], records: list, db: ms.database.Database,
             folder: Path, target: tvm.target.Target,
             timer: Callable[[list[tvm.IRModule]], list[float | None]],
             k: int = TOP_K) -> dict[int, Move]:
    """For each task without a record (`records[i]` None) that does at least `MIN_SHARE` of
    the model's FLOPs (count times FLOPs of a call), up to `k` schedules of the tuned
    workloads of `db` nearest to it (`nearest`) timed against its default lowering (`timer`,
    as the guard's) and the fastest kept when it beats the default. Outcomes are read from
    `folder`'s `FOLDER` when stored, else measured and stored. Returns a Move per task that
    had candidates."""
    orphans = [i for i, record in enumerate(records) if record is None]
    if orphans:  # only the tasks that weigh in the model's work are worth timing
        work = [task.weight * estimate_tir_flops(task.dispatched[0]) for task in tasks]
        orphans = [i for i in orphans if work[i] >= MIN_SHARE * sum(work)]
    pool = sources(db, k) if orphans else []
    stored = tuning_guard.read_entries(folder / FOLDER / OUTCOMES_FILE)
    moves, todo = {}, []
    kept = open_transferred(folder) if stored else None
    for i in orphans:
        shape = shape_of(tasks[i].dispatched[0])
        chosen = nearest(shape, pool, k) if shape is not None else []
        if not chosen:
            continue
        key = _key(tasks[i], chosen, target)
        move = _read(tasks[i], stored[key], kept) if key in stored else None
        if move is not None:
            moves[i] = move
        else:  # not stored (or its winning record is gone from the subfolder): measure
            todo.append((i, key, [(c, replay(tasks[i], c.record, target)) for c in chosen]))
    if todo:
        moves.update(_measure(tasks, todo, folder, target, timer))
    return moves


def _read(task: ms.ExtractedTask, entry: dict, kept: ms.database.Database) -> Move | None:
    """A stored outcome as a Move; None where its winning record is missing from `kept`."""
    record = None
    if entry.get("trace_key"):
        record = _stored_record(kept, task, entry["trace_key"])
        if record is None:
            return None
    return Move(tuning_guard.Choice(task.task_name, _us(entry["default_s"]),
                                    _us(entry["tuned_s"]),
                                    "transferred" if record is not None else "none",
                                    entry.get("source")), record)


def _measure(tasks: list, todo: list, folder: Path, target: tvm.target.Target,
             timer: Callable) -> dict[int, Move]:
    """Time each task's default lowering and its replayed candidates side by side (a task
    none of whose candidates replays is not timed), store the outcomes and winning records."""
    todo = [(i, key, [(c, sch) for c, sch in cands if sch is not None]) for i, key, cands in todo]
    mods = []
    for i, _, candidates in todo:
        if candidates:
            mods += [tuning_guard.default_lowering(tasks[i].dispatched[0], target),
                     *(sch.mod for _, sch in candidates)]
    times, at, moves, fresh = timer(mods) if mods else [], 0, {}, []
    out = open_transferred(folder)
    for i, key, candidates in todo:
        entry = {"key": key, "task": tasks[i].task_name, "default_s": None, "tuned_s": None,
                 "source": None, "trace_key": None, "candidates": []}
        record = None
        if candidates:
            default_s, cand_s = times[at], times[at + 1: at + 1 + len(candidates)]
            at += 1 + len(candidates)
            timed = [(t, n) for n, t in enumerate(cand_s) if t is not None]
            best_s, best = min(timed) if timed else (None, None)
            entry.update(default_s=default_s, tuned_s=best_s, candidates=[
                {"source": c.source.label, "s": t} for (c, _), t in zip(candidates, cand_s)])
            if best is not None:
                entry["source"] = candidates[best][0].source.label
            if best is not None and tuning_guard.keep_tuned(default_s, best_s):
                (candidate, sch), func = candidates[best], tasks[i].dispatched[0]
                record = ms.database.TuningRecord(
                    sch.trace, out.commit_workload(tasks[i].mod), [best_s],
                    candidate.record.target,
                    ms.arg_info.ArgInfo.from_entry_func(func, remove_preproc=True))
                out.commit_tuning_record(record)
                entry["trace_key"] = _trace_key(sch.trace)
        if entry["default_s"] is not None or not candidates:  # as the guard: a default that
            fresh.append(entry)                                 # did not measure: again
        moves[i] = Move(tuning_guard.Choice(
            tasks[i].task_name, _us(entry["default_s"]), _us(entry["tuned_s"]),
            "transferred" if record is not None else "none", entry["source"]), record)
    tuning_guard.append_entries(folder / FOLDER / OUTCOMES_FILE, fresh)
    return moves
