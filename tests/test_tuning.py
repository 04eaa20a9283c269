"""Layer 5: MetaSchedule tuning, its database (kept, reused, exported) and the torch backend.

One small real tuning run (a conv, 16 trials) is shared by the tests of this module; the rest
read its database or compile with zero new trials."""
from __future__ import annotations

import dataclasses
import json
from functools import partial
from pathlib import Path

import pytest
import torch
import tvm
from tvm.s_tir import meta_schedule as ms

from dlas_search import algorithms, compiler, hardware, space, tuning, tuning_measure
from dlas_search.errors import BadInput

TRIALS = 16
pytestmark = pytest.mark.xdist_group("tuning")  # one worker: the tuning fixture runs once


def conv_relu(in_ch: int = 8, out_ch: int = 16) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(in_ch, out_ch, 3, padding=1),
                               torch.nn.ReLU()).eval()


def records_in(folder: Path) -> list[str]:
    text = (folder / "database_tuning_record.json").read_text()
    return [line for line in text.splitlines() if line.strip()]


def legalised(model: torch.nn.Module, example: torch.Tensor) -> tvm.IRModule:
    mod = compiler.fold_batchnorm(compiler.import_module(model, example))
    plan = algorithms.plan(algorithms.AlgoConfig())
    return tvm.relax.transform.LegalizeOps(customize_legalize_map=plan.legalize_map())(mod)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A conv compiled with 16 MetaSchedule trials into a fresh database."""
    root = tmp_path_factory.mktemp("tuning")
    model, example = conv_relu(), torch.randn(1, 8, 12, 12)
    cfg = compiler.CompilerConfig(tuner="metaschedule", trials=TRIALS,
                                  database=str(root / "db"))
    built = compiler.compile(model, example, algorithms.plan(algorithms.AlgoConfig()), cfg,
                             hardware.local_target(1), records_to=root / "export")
    return model, example, cfg, built, root


@pytest.mark.slow  # uses the module's MetaSchedule run (48 s): what tunes is slow
def test_a_small_tuning_run_produces_records_and_a_fully_scheduled_module(tuned):
    model, example, _, built, root = tuned
    report = built.tuning
    assert report.tasks >= 1 and report.tuned == report.tasks and report.reused == 0
    # every task has a record; a record that lost to the default lowering is not applied
    kept_default = len(report.kept_default)
    assert report.untuned == [] and report.scheduled == report.tasks - kept_default
    assert report.new_trials >= TRIALS  # MetaSchedule may finish its last batch
    assert len(records_in(report.database)) == report.new_trials
    assert built.metrics["tuning_tasks_scheduled"] == report.tasks - kept_default
    assert built.metrics["tuning_tasks_kept_default"] == kept_default
    assert all(row["kept"] in ("tuned", "default") and row["default_us"] > 0
               for row in report.task_table)
    with torch.no_grad():
        reference = model(example).numpy()
    ours = hardware.run_tvm(built.executable, example)
    assert compiler.max_relative_error(ours, reference) <= 1e-5
    # the run artifact: the best record of each task applied, readable as a database of its
    # own, and each task's choice
    exported = ms.database.JSONDatabase(work_dir=str(root / "export"))
    assert len(exported.get_all_tuning_records()) == report.tasks - kept_default
    choices = json.loads((root / "export" / "choices.json").read_text())
    assert [c["kept"] for c in choices] == [row["kept"] for row in report.task_table]


@pytest.mark.slow  # uses the module's MetaSchedule run (48 s): what tunes is slow
def test_a_second_compile_reuses_the_records_and_measures_nothing(tuned):
    model, example, cfg, first, _ = tuned
    folder = first.tuning.database
    before = (folder / "database_tuning_record.json").read_bytes()
    again = compiler.compile(model, example, algorithms.plan(algorithms.AlgoConfig()), cfg,
                             hardware.local_target(1))
    assert again.tuning.new_trials == 0 and again.tuning.tuned == 0
    assert again.tuning.reused == first.tuning.tasks and again.tuning.untuned == []
    assert (folder / "database_tuning_record.json").read_bytes() == before
    assert again.tuning.kept_default == first.tuning.kept_default  # the stored times


@pytest.mark.slow  # uses the module's MetaSchedule run (48 s): what tunes is slow
def test_records_are_kept_per_target(tuned):
    """MetaSchedule's lookup ignores the target: each target gets its own folder."""
    *_, built, root = tuned
    one, two = hardware.local_target(1), hardware.local_target(2)
    assert tuning.target_folder(root / "db", one) == built.tuning.database
    assert tuning.target_folder(root / "db", two) != built.tuning.database


@pytest.mark.slow  # MetaSchedule tuning beyond the module's one small run
def test_cold_weight_tuning_measures_with_flushed_caches_and_keeps_its_records_apart(tuned):
    """compiler.cold_weights: candidates timed with every argument but the input evicted from
    the caches, one run per repeat; its records go to a folder of their own, so the warm
    records of the same target are neither reused for it nor mixed with its times."""
    model, example, cfg, warm, root = tuned
    runner = tuning_measure.runner(1, None, cold_weights=True)
    assert runner.evaluator_config.enable_cpu_cache_flush
    assert runner.evaluator_config.number == 1
    assert not tuning_measure.runner(1, None).evaluator_config.enable_cpu_cache_flush
    cold_cfg = dataclasses.replace(cfg, cold_weights=True, trials=4)
    cold = compiler.compile(model, example, algorithms.plan(algorithms.AlgoConfig()), cold_cfg,
                            hardware.local_target(1))
    folder = tuning.target_folder(root / "db", hardware.local_target(1), cold_weights=True)
    assert cold.tuning.database == folder != warm.tuning.database
    assert cold.tuning.reused == 0 and cold.tuning.new_trials >= 4  # warm records not reused
    assert cold.tuning.untuned == []
    with torch.no_grad():
        reference = model(example).numpy()
    ours = hardware.run_tvm(cold.executable, example)
    assert compiler.max_relative_error(ours, reference) <= 1e-5


@pytest.mark.slow  # uses the module's MetaSchedule run (48 s): what tunes is slow
def test_the_report_names_task_functions_left_without_a_schedule(tuned):
    """A model with the tuned conv and a new one, tuned with no budget: the known task is
    reused, the new conv's task is reported untuned, and nothing is measured."""
    *_, cfg, first, _ = tuned
    torch.manual_seed(0)
    model = torch.nn.Sequential(conv_relu(), torch.nn.Conv2d(16, 4, 1)).eval()
    mod = legalised(model, torch.randn(1, 8, 12, 12))
    applied, report = tuning.tune(mod, hardware.local_target(1), 0, cfg.database,
                                  progress=False)
    assert report.reused == first.tuning.tasks and report.new_trials == 0
    assert len(report.untuned) == report.tasks - report.reused >= 1
    assert all("conv2d" in name or "add" in name for name in report.untuned)
    unscheduled, _ = tuning.task_functions(applied)
    assert unscheduled == sorted(report.untuned + report.kept_default)


def test_hand_scheduled_functions_are_not_tuning_tasks():
    """Functions that carry `tirx.is_scheduled` (our sparse kernels) are counted apart and
    are not extracted as tasks."""
    mod = tuning.fuse(legalised(conv_relu(), torch.randn(1, 8, 12, 12)))
    tunable, hand = tuning.task_functions(mod)
    assert tunable and hand == []
    marked = tvm.IRModule({gv: (f.with_attr("tirx.is_scheduled", True)
                                if gv.name_hint == tunable[0] else f)
                           for gv, f in mod.functions.items()})
    assert tuning.task_functions(marked) == (tunable[1:], [tunable[0]])


def test_torch_backend_is_timed_like_tvm(tiny_space, cache_dir):
    from dlas_search import pipeline
    config = space.load_space(tiny_space).pin({"compiler.backend": "torch",
                                               "compress.method": "none"}).defaults()
    from dlas_search.cache import StageCache
    result = pipeline.run(config, StageCache(cache_dir))
    assert result.built is None and result.info["target"] == "torch eager"
    assert result.metrics["latency_ms"] == result.metrics["torch_latency_ms"] > 0
    assert result.metrics["speedup_vs_torch"] == 1.0 and "accuracy" in result.metrics


@pytest.mark.slow  # uses the module's MetaSchedule run (48 s): what tunes is slow
def test_tuning_artifacts_are_logged_with_the_trial(tuned, tmp_path):
    from dlas_search import tracking
    *_, root = tuned
    tracker = tracking.Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "tuning-artifacts")
    tracker.open_study({"latency_ms": "minimize"}, "space.yaml", "study: x", {})
    run_id = tracker.start_trial(0, "t", {})
    tracker.finish_trial(run_id, {"latency_ms": 1.0}, {}, {"tuning": root / "export"})
    names = {f.path for f in tracker.client.list_artifacts(run_id, "tuning")}
    assert names == {"tuning/database_tuning_record.json", "tuning/database_workload.json",
                     "tuning/choices.json"}


@pytest.mark.parametrize("name, value, problem", [
    ("compiler.tuner", "autotvm", "allowed: none, metaschedule"),
    ("compiler.trials", 0, "out of range"),
    ("compiler.backend", "onnxruntime", "allowed: tvm, torch"),
])
def test_bad_compiler_settings_are_refused_with_what_is_allowed(name, value, problem):
    with pytest.raises(BadInput, match=problem):
        space.check_value(name, value)


def test_a_database_path_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "records.json"
    path.write_text(json.dumps({}))
    with pytest.raises(BadInput, match="compiler.database.*not a folder"):
        compiler.check(compiler.CompilerConfig(tuner="metaschedule", database=str(path)))


def test_small_budgets_search_a_smaller_population():
    """A task measured once gets 64 candidates evolved, not 512 (the cost model is untrained
    then); from 16 trials per task up, MetaSchedule's defaults."""
    small = tuning.search_strategy(trials=16, tasks=19)
    assert small.population_size == 64 and small.init_min_unmeasured == 50
    assert tuning.search_strategy(trials=1000, tasks=20).population_size == 512
    assert tuning.search_strategy(trials=200, tasks=20).population_size == 320


@pytest.mark.slow  # MetaSchedule tuning beyond the module's one small run
def test_the_builder_keeps_its_worker_between_batches_and_renews_it():
    """One worker process for batches 1-2, a new one after `renew_after` builds (MetaSchedule's
    LocalBuilder started one per batch: 3.4 s each); every build gives an artifact, and
    close() leaves no worker running."""
    from tvm import te
    a = te.placeholder((64,), name="a")
    mod = tvm.IRModule({"main": te.create_prim_func([a, te.compute((64,), lambda i: a[i] + 1)])})
    stub = partial(tuning_measure.stub_foreign_intrinsics, ())
    builder = tuning.KeptPoolBuilder(max_workers=1, timeout_sec=60, renew_after=2,
                                     initializer=stub)
    pool, target, pids, results = builder.pool, tvm.target.Target("llvm"), [], []
    for _ in range(3):
        results += builder.build([ms.builder.BuilderInput(mod, target)])
        (worker,) = pool._worker_map.values()
        pids.append(worker._proc.pid if worker._proc is not None else None)
    assert all(r.error_msg is None and Path(r.artifact_path).is_file() for r in results)
    assert pids[0] == pids[1] != pids[2] or (pids[0] == pids[1] and pids[2] is None)
    builder.close()
    assert builder.pool is None and all(w._proc is None or w._proc.poll() is not None
                                        for w in pool._worker_map.values())


@pytest.mark.slow  # MetaSchedule tuning beyond the module's one small run
def test_extending_a_database_tunes_its_tasks_again_from_their_records(tuned, tmp_path):
    """`extend` spends the budget on tasks the database has already (a second run that adds
    trials to the first); without it the same compile measures nothing."""
    import shutil
    model, example, cfg, first, _ = tuned
    shutil.copytree(cfg.database, tmp_path / "db")
    copy = compiler.CompilerConfig(tuner="metaschedule", trials=4, database=str(tmp_path / "db"))
    folder = first.tuning.database.name
    before = len(records_in(tmp_path / "db" / folder))
    plan, target = algorithms.plan(algorithms.AlgoConfig()), hardware.local_target(1)
    again = compiler.compile(model, example, plan, copy, target, extend_tuning=True)
    assert again.tuning.new_trials >= 4 and again.tuning.reused == 0
    assert len(records_in(tmp_path / "db" / folder)) == before + again.tuning.new_trials
    assert again.tuning.untuned == []
    reused = compiler.compile(model, example, plan, copy, target)
    assert reused.tuning.new_trials == 0 and reused.tuning.reused == reused.tuning.tasks


def two_convs() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU()).eval()


@pytest.mark.slow  # MetaSchedule tuning beyond the module's one small run
@pytest.mark.reliability("MetaSchedule's search raises out of tune_tasks mid-run",
                         "a warning naming the error and the next seed; the run goes on",
                         kept="the records measured so far; only tasks without one are retuned")
def test_a_search_stopped_by_an_internal_error_goes_on_with_the_tasks_left(
        tmp_path, monkeypatch, caplog):
    """MetaSchedule's search threads can raise out of tune_tasks (Winograd on resnet18 224:
    "The block no longer exists in the IRModule"); the records measured before are kept and
    only the tasks without one are tuned again, with the budget left and another seed."""
    real, calls = tuning._run_metaschedule, []

    def first_run_stops_after_one_task(todo, db, target, trials, threads, seed, *rest):
        calls.append(([t.task_name for t in todo], trials, seed))
        if len(calls) == 1:
            real(todo[:1], db, target, 4, threads, seed, *rest)
            raise RuntimeError("parallel_for_dynamic error with The block no longer exists "
                               "in the IRModule")
        real(todo, db, target, trials, threads, seed, *rest)

    monkeypatch.setattr(tuning, "_run_metaschedule", first_run_stops_after_one_task)
    mod = legalised(two_convs(), torch.randn(1, 8, 10, 10))
    with caplog.at_level("WARNING", logger=tuning.__name__):
        _, report = tuning.tune(mod, hardware.local_target(1), 12, tmp_path, seed=0,
                                progress=False)
    (first, _, seed0), (second, left, seed1) = calls
    assert len(first) == 2 and second == first[1:]      # the task with records is not redone
    assert (seed0, seed1) == (0, 1)
    assert 0 < left <= 12 - 4  # the budget less what the first run measured
    assert report.untuned == [] and report.scheduled == report.tasks == 2
    assert "no longer exists" in caplog.text and "seed 1" in caplog.text


@pytest.mark.reliability("MetaSchedule's search raises on every retry",
                         "an error after 3 runs, and the tasks left untuned named in the report "
                         "and the log", kept="the compile goes on with default schedules")
def test_a_search_that_keeps_failing_leaves_the_tasks_untuned_and_says_so(
        tmp_path, monkeypatch, caplog):
    """After the retries the module keeps default schedules for the tasks without a record,
    and the report and the log name them (no exception escapes a trial's compile)."""
    seeds = []

    def always_stops(todo, db, target, trials, threads, seed, *rest):
        seeds.append(seed)
        raise RuntimeError("parallel_for_dynamic error with something internal")

    monkeypatch.setattr(tuning, "_run_metaschedule", always_stops)
    mod = legalised(conv_relu(), torch.randn(1, 8, 10, 10))
    with caplog.at_level("WARNING", logger=tuning.__name__):
        _, report = tuning.tune(mod, hardware.local_target(1), 8, tmp_path,
                                progress=False)
    assert seeds == [0, 1, 2]
    assert report.scheduled == 0 and len(report.untuned) == report.tasks >= 1
    assert "failed 3 times (parallel_for_dynamic error with something internal)" in caplog.text
    assert "have no tuned schedule" in caplog.text


@pytest.mark.slow  # MetaSchedule tuning of Winograd convs
@pytest.mark.parametrize("conv,rules", [
    ("winograd", ["_winograd_data_pack_rule", "_winograd_inverse_rule"]),
    ("winograd_nhwc", ["_winograd_nhwc_data_pack_rule", "_winograd_nhwc_inverse_rule"])])
def test_winograd_convs_tune_with_our_transform_rules_and_stay_correct(conv, rules, tmp_path):
    """The Winograd transforms are scheduled by our MetaSchedule rules (TVM's sample the input
    tile's location, and a mutated "inline" stopped the resnet18 224 search); a short tuning
    run schedules every task and matches PyTorch."""
    import tvm_ffi
    calls = []

    def counted(rule):
        def wrapper(sch, block):
            calls.append(rule.__name__)
            return rule(sch, block)
        return wrapper

    def register(wrap):
        for name, rule in algorithms.WINOGRAD_RULES.items():
            tvm_ffi.register_global_func(f"s_tir.meta_schedule.cpu.{name}", wrap(rule),
                                         override=True)

    register(counted)
    try:
        model, example = conv_relu(8, 16), torch.randn(1, 8, 12, 12)
        cfg = compiler.CompilerConfig(tuner="metaschedule", trials=6, database=str(tmp_path))
        plan = algorithms.plan(algorithms.AlgoConfig(conv=conv))
        built = compiler.compile(model, example, plan, cfg, hardware.local_target(1))
    finally:
        register(lambda rule: rule)
    assert plan.lowered[conv] == 1
    assert sorted(set(calls)) == rules
    assert built.tuning.untuned == [] and built.tuning.new_trials >= 6
    with torch.no_grad():
        reference = model(example).numpy()
    ours = hardware.run_tvm(built.executable, example)
    assert compiler.max_relative_error(ours, reference) <= 1e-4


@pytest.mark.slow  # three small MetaSchedule runs: what tunes is slow
def test_metaschedule_logs_only_warnings_unless_asked(tmp_path, capfd, monkeypatch):
    """Two tuning runs in one process: MetaSchedule's INFO lines (its task tables) stay out of
    the console both times (its second run used to print them), and DLAS_TUNING_LOG=info
    brings them back."""
    mod = legalised(conv_relu(4, 8), torch.randn(1, 4, 6, 6))
    target = hardware.local_target(1)
    for n in range(2):
        tuning.tune(mod, target, 2, tmp_path / f"db{n}", progress=False, transfer=False)
    assert "[task_scheduler.cc" not in capfd.readouterr().err
    monkeypatch.setenv("DLAS_TUNING_LOG", "info")
    tuning.tune(mod, target, 2, tmp_path / "db-loud", progress=False, transfer=False)
    assert "[task_scheduler.cc" in capfd.readouterr().err
