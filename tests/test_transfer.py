"""Layer 5, transfer-tuning: a task with no record of its own gets the schedule of a similar
tuned task (same operator pattern, other shapes), kept where it measures faster than the
default lowering, and the outcome is stored so it is measured once.

The fast tests use a hand-written "tuned" record (sampled split factors, a parallel loop) and
times given in place of measurements; one slow test tunes a conv for real and transfers its
schedule to a conv of other shapes in a zero-trial compile."""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import tvm
import tvm_ffi
from tvm import relax
from tvm.s_tir import Schedule
from tvm.s_tir import meta_schedule as ms
from tvm.script import relax as R

from dlas_search import (algorithms, compiler, hardware, transfer, tuning, tuning_guard,
                         tuning_measure)

pytestmark = pytest.mark.xdist_group("tuning")


def conv(in_ch: int, out_ch: int, size: int, act: str = "relu") -> tvm.IRModule:
    """A 3x3 conv (padding 1) and an activation, legalised: one task function."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor((1, in_ch, size, size), "float32"))
    w = relax.Var("w", R.Tensor((out_ch, in_ch, 3, 3), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            y = relax.op.nn.conv2d(x, w, padding=1)
            y = bb.emit_output(relax.op.nn.relu(y) if act == "relu" else relax.op.sigmoid(y))
        bb.emit_func_output(y)
    return relax.transform.LegalizeOps()(bb.get())


def task_of(mod: tvm.IRModule, target=None) -> ms.ExtractedTask:
    (task,) = ms.relax_integration.extract_tasks(tuning.fuse(mod),
                                                 target or hardware.local_target(1))
    return task


def shape(mod: tvm.IRModule) -> transfer.Shape:
    return transfer.shape_of(task_of(mod).dispatched[0])


def hand_tuned(task: ms.ExtractedTask, f_tiles=(2, 8), x_tiles=(3, 4)) -> Schedule:
    """A stand-in for a tuned schedule: the conv's output channels and columns split by
    sampled factors (decisions for this task's extents), the outer channel loop parallel."""
    sch = Schedule(task.dispatched[0])
    block = sch.get_sblock("conv2d_nchw")
    _, f, _, x, *_ = sch.get_loops(block)
    fo, fi = sch.split(f, sch.sample_perfect_tile(f, n=2, decision=list(f_tiles)))
    xo, xi = sch.split(x, sch.sample_perfect_tile(x, n=2, decision=list(x_tiles)))
    sch.parallel(fo)
    return sch


def seed_record(mod: tvm.IRModule, database_dir: Path, run_s: float = 1e-6, **tiles) -> Path:
    """Commit a hand-tuned record of `mod`'s task to the target's database; its folder."""
    target = hardware.local_target(1)
    folder = tuning.target_folder(database_dir, target)
    db, task = tuning.open_database(folder), task_of(mod)
    db.commit_tuning_record(ms.database.TuningRecord(
        hand_tuned(task, **tiles).trace, db.commit_workload(task.mod), [run_s], target,
        ms.arg_info.ArgInfo.from_entry_func(task.dispatched[0])))
    return folder


def perfect_tile_products(sch: Schedule) -> list[int]:
    return sorted(math.prod(int(v) for v in decision)
                  for inst, decision in sch.trace.decisions.items()
                  if inst.kind.name == "SamplePerfectTile")


# --- similarity and ranking ---------------------------------------------------------------

def test_convs_of_other_shapes_share_a_pattern_and_other_operators_do_not():
    """The pattern is the operators (block names, iterator kinds, arithmetic), not the
    shapes: a conv+ReLU of other channels and size matches at a finite distance, growing
    with the shapes' ratio; a conv+sigmoid (same block names) does not match."""
    a, b, c = shape(conv(8, 16, 12)), shape(conv(6, 12, 10)), shape(conv(8, 32, 24))
    assert a.pattern == b.pattern == c.pattern
    assert transfer.distance(a, a) == 0
    assert 0 < transfer.distance(a, b) == transfer.distance(b, a) < math.inf
    assert transfer.distance(a, b) < transfer.distance(b, c)   # 6->12 at 10 is nearer 8->16
    sigmoid = shape(conv(8, 16, 12, act="sigmoid"))
    assert sigmoid.pattern != a.pattern and transfer.distance(a, sigmoid) == math.inf
    assert a.label == "conv2d_nchw(1,16,12,12,8,3,3)"


def test_candidates_are_the_best_of_the_nearest_sources_first_and_at_most_k():
    """The best record of each source of the pattern, nearest first (a tie by hash), then
    their second best; a trace met twice is tried once; other patterns are not offered."""
    pattern, other = (("conv", (0, 2), "float32", ("Add",)),), (("pool", (0,), "", ()),)

    def source(extents, traces, digest, pat=pattern):
        return transfer.Source(transfer.Shape(pat, extents, digest),
                               [SimpleNamespace(trace=t) for t in traces], digest)

    target = transfer.Shape(pattern, (16, 8), "target")
    pool = [source((64, 8), ["far"], "1"), source((16, 8), ["same", "same 2nd"], "2"),
            source((32, 8), ["near", "near 2nd"], "3"), source((32, 8), ["near"], "4"),
            source((16, 8), ["other pattern"], "5", other), source((8, 8), ["tie"], "0")]

    def traces(k):
        return [c.record.trace for c in transfer.nearest(target, pool, k)]
    assert traces(3) == ["same", "tie", "near"]   # 8 and 32 are as far from 16: by hash
    assert traces(10) == ["same", "tie", "near", "far", "same 2nd", "near 2nd"]
    assert [c.source.label for c in transfer.nearest(target, pool, 2)] == ["2", "0"]
    assert transfer.nearest(transfer.Shape(other * 2, (1,), "x"), pool) == []


# --- replay -------------------------------------------------------------------------------

def test_a_trace_replays_on_other_extents_with_its_split_factors_rederived():
    """A schedule sampled for 16 channels and 12 columns (factors 2x8 and 3x4) replayed on 12
    channels and 10 columns: the factors are re-derived to divide the new extents, and the
    replayed function computes what the default lowering does."""
    tuning_measure.stub_foreign_intrinsics()  # as tune() does: the postprocessors' rules
    source, target = task_of(conv(8, 16, 12)), hardware.local_target(1)
    record = SimpleNamespace(trace=hand_tuned(source).trace)
    task = task_of(conv(6, 12, 10))
    sch = transfer.replay(task, record, target)
    assert sch is not None
    assert perfect_tile_products(sch) == [10, 12]
    assert "T.parallel" in sch.mod.script()
    rng = np.random.default_rng(0)
    args = [rng.standard_normal([int(d) for d in a.shape]).astype("float32")
            for a in ms.arg_info.ArgInfo.from_entry_func(task.dispatched[0])]
    outs = []
    for mod in (sch.mod, task.dispatched[0]):
        tensors = [tvm.runtime.tensor(a) for a in args]
        tvm.compile(mod, target)["main"](*tensors)
        outs.append(tensors[-1].numpy())
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_a_trace_that_does_not_fit_the_task_is_skipped():
    """A trace naming blocks the task does not have gives None (logged at debug)."""
    record = SimpleNamespace(trace=hand_tuned(task_of(conv(8, 16, 12))).trace)
    bb, x = relax.BlockBuilder(), relax.Var("x", R.Tensor((1, 64), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.nn.softmax(x))
        bb.emit_func_output(y)
    softmax = task_of(relax.transform.LegalizeOps()(bb.get()))
    assert transfer.replay(softmax, record, hardware.local_target(1)) is None


# --- in a tuning compile, with times given --------------------------------------------------

@pytest.fixture
def timed(monkeypatch):
    """Times given instead of measured: per task, the default then its candidates; `faster`
    says whether the candidates beat the default. Counts the calls."""
    state = SimpleNamespace(calls=[], faster=True)

    def measure(mods, target, builder, runner):
        state.calls.append(len(mods))
        default, candidate = (2e-5, 1e-5) if state.faster else (1e-5, 2e-5)
        return [default] + [candidate] * (len(mods) - 1)  # one task per call in these tests

    monkeypatch.setattr(tuning_guard, "measure", measure)
    return state


def test_a_task_without_a_record_runs_a_similar_tasks_schedule_measured_once(
        tmp_path, timed, capsys):
    folder = seed_record(conv(8, 16, 12), tmp_path)
    mod, target = conv(6, 12, 10), hardware.local_target(1)
    applied, report = tuning.tune(mod, target, 0, tmp_path, export_to=tmp_path / "export")
    assert timed.calls == [2]  # the default and the one candidate, side by side
    (name,) = report.transferred
    assert report.untuned == [] and report.kept_default == [] and report.new_trials == 0
    assert tuning.task_functions(applied)[0] == []          # the task got a schedule
    assert report.metrics()["tuning_tasks_transferred"] == 1
    assert report.metrics()["tuning_tasks_own"] == report.metrics()["tuning_tasks_default"] == 0
    (row,) = report.task_table
    assert row["kept"] == "transferred" and row["source"] == "conv2d_nchw(1,16,12,12,8,3,3)"
    assert (row["default_us"], row["tuned_us"]) == pytest.approx((20.0, 10.0))
    assert "0 of 1 tasks run their own schedule, 1 a transferred one, 0 the default" in \
        capsys.readouterr().err
    # stored apart from the main database, which keeps only the measured record
    assert len(tuning.open_database(folder).get_all_tuning_records()) == 1
    assert len(transfer.open_transferred(folder).get_all_tuning_records()) == 1
    choices = json.loads((tmp_path / "export" / tuning_guard.CHOICES_FILE).read_text())
    assert [c["kept"] for c in choices] == ["transferred"]
    exported = ms.database.JSONDatabase(work_dir=str(tmp_path / "export"))
    assert len(exported.get_all_tuning_records()) == 1
    # the applied module computes what the untuned one does
    x = np.random.default_rng(0).standard_normal((1, 6, 10, 10)).astype("float32")
    w = np.random.default_rng(1).standard_normal((12, 6, 3, 3)).astype("float32")
    outs = [relax.VirtualMachine(tvm.compile(m, target), tvm.cpu())["main"](
        tvm.runtime.tensor(x), tvm.runtime.tensor(w)).numpy() for m in (applied, mod)]
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    # a second compile reads the outcome: nothing measured, the same schedule applied
    again_applied, again = tuning.tune(mod, target, 0, tmp_path, progress=False)
    assert timed.calls == [2] and again.transferred == [name]
    assert tvm_ffi.structural_equal(again_applied, applied)
    # another similar task tuned later: the candidates change, so they are measured again
    seed_record(conv(6, 12, 12), tmp_path, f_tiles=(3, 4))
    _, third = tuning.tune(mod, target, 0, tmp_path, progress=False)
    assert timed.calls == [2, 3] and third.transferred == [name]
    assert third.task_table[0]["source"] == "conv2d_nchw(1,12,12,12,6,3,3)"  # the nearer


def test_a_transferred_schedule_slower_than_the_default_is_dropped_and_not_measured_again(
        tmp_path, timed):
    timed.faster = False
    folder = seed_record(conv(8, 16, 12), tmp_path)
    mod, target = conv(6, 12, 10), hardware.local_target(1)
    applied, report = tuning.tune(mod, target, 0, tmp_path, progress=False)
    (name,) = tuning.task_functions(tuning.fuse(mod))[0]
    assert report.transferred == [] and report.untuned == [name]
    assert tuning.task_functions(applied)[0] == [name]      # the default lowering
    (row,) = report.task_table
    assert row["kept"] == "none" and row["source"] == "conv2d_nchw(1,16,12,12,8,3,3)"
    assert row["tuned_us"] > row["default_us"]               # tried, and it lost
    assert report.metrics()["tuning_tasks_default"] == 1
    assert len(transfer.open_transferred(folder).get_all_tuning_records()) == 0
    outcomes = (folder / transfer.FOLDER / transfer.OUTCOMES_FILE).read_text().splitlines()
    assert len(outcomes) == 1 and json.loads(outcomes[0])["trace_key"] is None
    _, again = tuning.tune(mod, target, 0, tmp_path, progress=False)
    assert timed.calls == [2] and again.untuned == [name]  # the loss was read back


def test_other_operators_and_transfer_off_get_no_schedule_and_measure_nothing(tmp_path, timed):
    seed_record(conv(8, 16, 12), tmp_path)
    target = hardware.local_target(1)
    _, sigmoid = tuning.tune(conv(6, 12, 10, act="sigmoid"), target, 0, tmp_path,
                             progress=False)
    _, off = tuning.tune(conv(6, 12, 10), target, 0, tmp_path, progress=False, transfer=False)
    assert timed.calls == []
    for report in (sigmoid, off):
        assert report.transferred == [] and len(report.untuned) == 1
        assert report.task_table[0]["kept"] == "none" and report.task_table[0]["source"] is None


# --- for real: MetaSchedule's schedule of one conv on a conv of other shapes ---------------

def conv_relu(in_ch: int, out_ch: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(in_ch, out_ch, 3, padding=1),
                               torch.nn.ReLU()).eval()


@pytest.mark.slow  # a MetaSchedule run of 24 trials (about 45 s) and real measurements
def test_a_conv_with_no_record_runs_a_tuned_convs_schedule_and_matches_pytorch(
        tmp_path, monkeypatch):
    """A conv+ReLU 8->16 at 12x12 tuned with 24 trials; a conv+ReLU 12->32 at 12x12 (other
    channels, as channel pruning gives), compiled with no new trial, runs one of its
    schedules replayed, says so, and matches PyTorch; a second compile measures nothing.
    (The same spatial size: replayed at 20x20, three of the four best 12x12 schedules lost
    to the default loops.)"""
    plan, target = algorithms.plan(algorithms.AlgoConfig()), hardware.local_target(1)
    db = str(tmp_path / "db")
    tuned = compiler.compile(conv_relu(8, 16), torch.randn(1, 8, 12, 12), plan,
                             compiler.CompilerConfig(tuner="metaschedule", trials=24,
                                                     database=db), target)
    assert tuned.tuning.own == 1 and tuned.tuning.new_trials >= 24
    calls, real = [], tuning_guard.measure
    monkeypatch.setattr(tuning_guard, "measure", lambda mods, *a, **k: (
        calls.append(len(mods)), real(mods, *a, **k))[1])
    model, example = conv_relu(12, 32), torch.randn(1, 12, 12, 12)
    cfg = compiler.CompilerConfig(tuner="metaschedule", trials=0, database=db)
    built = compiler.compile(model, example, plan, cfg, target)
    report = built.tuning
    assert calls == [1 + transfer.TOP_K] and report.new_trials == 0  # 24 distinct records
    (row,) = report.task_table
    assert row["source"] == "conv2d_nchw(1,16,12,12,8,3,3)" and row["default_us"] > 0
    assert row["kept"] == "transferred", f"the transferred schedule lost: {row}"
    assert row["tuned_us"] < row["default_us"]
    assert report.transferred == [row["task"]] and built.metrics["tuning_tasks_transferred"] == 1
    with torch.no_grad():
        reference = model(example).numpy()
    ours = hardware.run_tvm(built.executable, example)
    assert compiler.max_relative_error(ours, reference) < 1e-4
    outcomes = report.database / transfer.FOLDER / transfer.OUTCOMES_FILE
    stored = outcomes.read_bytes()
    again = compiler.compile(model, example, plan, cfg, target)
    assert calls == [1 + transfer.TOP_K] and again.tuning.transferred == report.transferred
    assert outcomes.read_bytes() == stored
    off = compiler.compile(model, example, plan,
                           compiler.CompilerConfig(tuner="metaschedule", trials=0, database=db,
                                                   transfer=False), target)
    assert off.tuning.transferred == [] and off.tuning.untuned == [row["task"]]


def test_a_trial_names_its_transferred_tasks_and_can_turn_transfer_off(
        tiny_space, cache_dir, monkeypatch):
    """compiler.transfer (unset: true) reaches the tuning; the trial's metrics count the
    tasks by the schedule they run and its tag names the transferred ones."""
    from dlas_search import pipeline, space
    from dlas_search.cache import StageCache
    calls = []

    def tune(mod, target, trials, database, **kwargs):  # a stand-in: one task transferred
        calls.append(kwargs["transfer"])
        return tuning.fuse(mod), tuning.TuningReport(
            tasks=3, hand_scheduled=0, reused=1, tuned=0, scheduled=2, own=1,
            transferred=["fused_conv2d1_add1_relu1"], database=Path(database))

    monkeypatch.setattr(tuning, "tune", tune)
    pins = {"compress.method": "none", "compiler.tuner": "metaschedule", "compiler.trials": 1}
    config = space.load_space(tiny_space).pin(pins).defaults()
    result = pipeline.run(config, StageCache(cache_dir))
    assert calls == [True]
    assert result.info["transferred_tasks"] == "fused_conv2d1_add1_relu1"
    assert [result.metrics[f"tuning_tasks_{k}"] for k in ("own", "transferred", "default")] \
        == [1, 1, 1]
    off = compiler.CompilerConfig(tuner="metaschedule", trials=1, transfer=False)
    compiler.compile(conv_relu(3, 4), torch.randn(1, 3, 8, 8),
                     algorithms.plan(algorithms.AlgoConfig()), off, hardware.local_target(1))
    assert calls == [True, False]
