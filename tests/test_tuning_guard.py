"""Layer 5, tuning's guard: a task's tuned schedule is applied only where it measured faster
than the task's default lowering; the rule alone, the choice with times given (a record whose
trace only looks up blocks stands in for a tuned one), and one real tuning run whose 4 trials
lose to the default (an int8 widening)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.s_tir import Schedule
from tvm.s_tir import meta_schedule as ms
from tvm.script import relax as R

from dlas_search import hardware, tuning, tuning_guard

pytestmark = pytest.mark.xdist_group("tuning")


@pytest.mark.parametrize("default_s, tuned_s, kept", [
    (2.0, 1.0, True),      # faster: tuned
    (1.0, 2.0, False),     # slower: the default
    (1.0, 1.0, False),     # a tie: the default
    (1.0, None, False),    # the tuned schedule did not build or run again
    (None, 1.0, True),     # the default did not: nothing says the tuned one is slower
    (None, None, True),    # nothing could be measured: as before the guard
])
def test_a_tuned_schedule_is_kept_only_when_it_measured_faster(default_s, tuned_s, kept):
    assert tuning_guard.keep_tuned(default_s, tuned_s) is kept


def test_a_measurement_with_a_failed_run_has_no_time():
    assert tuning_guard.mean_s([1.0, 3.0]) == 2.0
    assert tuning_guard.mean_s([1.0, 1e10]) is None and tuning_guard.mean_s([]) is None


def tensor(*shape: int) -> relax.Var:
    return relax.Var("x", R.Tensor(shape, "float32"))


def softmax_and_relu(width: int = 1000) -> tvm.IRModule:
    """Two task functions: a softmax over `width` values and a ReLU of another input."""
    bb, x, y = relax.BlockBuilder(), tensor(1, width), tensor(1, 64)
    with bb.function("main", [x, y]):
        with bb.dataflow():
            out = bb.emit_output(relax.Tuple([relax.op.nn.softmax(x), relax.op.nn.relu(y)]))
        bb.emit_func_output(out)
    return relax.transform.LegalizeOps()(bb.get())


def softmax(width: int = 1000) -> tvm.IRModule:
    bb, x = relax.BlockBuilder(), tensor(1, width)
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.nn.softmax(x))
        bb.emit_func_output(y)
    return relax.transform.LegalizeOps()(bb.get())


def seed_records(mod: tvm.IRModule, target, database_dir) -> list[str]:
    """A record for each task whose trace only looks its blocks up (a stand-in for a tuned
    schedule);
    returns the task names."""
    folder = tuning.target_folder(database_dir, target)
    db = tuning.open_database(folder)
    tasks = ms.relax_integration.extract_tasks(tuning.fuse(mod), target)
    for task in tasks:
        func = task.dispatched[0]
        sch = Schedule(func)
        sch.get_child_blocks(sch.get_sblock("root"))  # the database drops an empty trace
        db.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, db.commit_workload(task.mod), [1e-6], target,
            ms.arg_info.ArgInfo.from_entry_func(func)))
    return [task.task_name for task in tasks]


def test_losing_tasks_keep_the_default_and_the_pairs_are_measured_once(
        tmp_path, monkeypatch, caplog):
    """With times given (the softmax's tuned schedule slower, the ReLU's faster): the softmax
    is left unscheduled and reported, the ReLU's record is applied and exported, both pairs
    are stored beside the database and read back by the next compile, which measures
    nothing; the database keeps both records."""
    target, calls = hardware.local_target(1), []
    names = seed_records(softmax_and_relu(), target, tmp_path / "db")
    assert sorted(names) == ["relu", "softmax"]

    def timer(mods, target, builder, runner):  # default, tuned, default, tuned, ...
        calls.append(len(mods))
        times = []
        for default in mods[::2]:
            slower = "T_softmax" in default.script()
            times += [1e-5, 2e-5] if slower else [2e-5, 1e-5]
        return times

    monkeypatch.setattr(tuning_guard, "measure", timer)
    mod = softmax_and_relu()
    with caplog.at_level("INFO", logger=tuning.__name__):
        applied, report = tuning.tune(mod, target, 0, tmp_path / "db", progress=False,
                                      export_to=tmp_path / "export")
    assert calls == [4]
    assert report.kept_default == ["softmax"] and report.untuned == []
    assert report.metrics()["tuning_tasks_kept_default"] == 1 and report.scheduled == 1
    unscheduled, _ = tuning.task_functions(applied)
    assert unscheduled == ["softmax"]
    assert "1 of 2 tuned tasks kept the default schedule" in caplog.text
    rows = {row["task"]: row for row in report.task_table}
    assert rows["softmax"]["kept"] == "default" and rows["relu"]["kept"] == "tuned"
    assert rows["softmax"]["default_us"] == pytest.approx(10.0)
    assert rows["softmax"]["tuned_us"] == pytest.approx(20.0)
    exported = ms.database.JSONDatabase(work_dir=str(tmp_path / "export"))
    assert len(exported.get_all_tuning_records()) == 1  # the records applied
    choices = json.loads((tmp_path / "export" / tuning_guard.CHOICES_FILE).read_text())
    assert {c["task"]: c["kept"] for c in choices} == {"softmax": "default", "relu": "tuned"}
    stored = (report.database / tuning_guard.DEFAULTS_FILE).read_text().splitlines()
    assert len(stored) == 2
    again_applied, again = tuning.tune(mod, target, 0, tmp_path / "db", progress=False)
    assert calls == [4] and again.kept_default == ["softmax"]  # read back, not measured
    assert tuning.task_functions(again_applied)[0] == ["softmax"]
    db = tuning.open_database(report.database)
    assert len(db.get_all_tuning_records()) == 2  # every record stays in the database


def test_a_default_that_cannot_be_measured_keeps_the_tuned_schedule_and_is_tried_again(
        tmp_path, monkeypatch):
    target, calls = hardware.local_target(1), []
    seed_records(softmax(), target, tmp_path)

    def timer(mods, target, builder, runner):
        calls.append(len(mods))
        return [None, 1e-5]

    monkeypatch.setattr(tuning_guard, "measure", timer)
    for _ in range(2):
        applied, report = tuning.tune(softmax(), target, 0, tmp_path, progress=False)
        assert report.kept_default == [] and tuning.task_functions(applied)[0] == []
    assert calls == [2, 2]  # a failed measurement is not stored
    assert not (report.database / tuning_guard.DEFAULTS_FILE).exists()


def widen(width: int = 512) -> tvm.IRModule:
    """One task: int8 values widened to int32 (as int8 arithmetic does before accumulating)."""
    bb, x = relax.BlockBuilder(), relax.Var("x", R.Tensor((1, width), "int8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.astype(x, "int32"))
        bb.emit_func_output(y)
    return relax.transform.LegalizeOps()(bb.get())


@pytest.mark.slow  # a real MetaSchedule run and measurement (about 15-25 s)
def test_a_tuned_build_whose_schedule_loses_to_the_default_keeps_the_default(tmp_path):
    """512 int8 values widened to int32, tuned with 4 MetaSchedule trials: the default lowering
    (one loop LLVM vectorises) measured 12-13 ns, MetaSchedule's schedule (a parallel loop) 47-50 ns (5 runs;
    a softmax over 1000 values, 2x slower tuned on four runs, was beaten once, so it is not
    used). Timed side by side with the tuning's own builder and runner, the default is kept
    and applied; the kept choice is whichever measured faster; the records stay in the
    database; the build computes the cast."""
    target = hardware.local_target(1)
    applied, report = tuning.tune(widen(), target, 4, tmp_path, seed=0, progress=False)
    (row,) = report.task_table
    assert row["default_us"] is not None and row["tuned_us"] is not None
    faster = "tuned" if row["tuned_us"] < row["default_us"] else "default"
    assert row["kept"] == faster
    assert row["kept"] == "default", f"4 trials beat the default here: {row}"
    assert report.kept_default == [row["task"]] and report.untuned == []
    assert tuning.task_functions(applied)[0] == [row["task"]]
    # the losing record stays (this task has one schedule to sample: one distinct record)
    assert len(tuning.open_database(report.database).get_all_tuning_records()) >= 1
    vm = relax.VirtualMachine(tvm.compile(applied, target), tvm.cpu())
    x = np.random.default_rng(0).integers(-128, 128, (1, 512)).astype("int8")
    np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(x)).numpy(),
                                  x.astype("int32"))
