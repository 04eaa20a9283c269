"""The study: persistent across runs, one MLflow child run per trial, failures fail alone."""
import json
import re

import optuna
import pytest
from mlflow.tracking import MlflowClient

from conftest import TINY_SPACE, write_space
from dlas_search import compiler, pipeline, tracking
from dlas_search.cli import main
from dlas_search.errors import BadInput
from dlas_search.objective import config_of
from dlas_search.search import default_storage, run_search
from dlas_search.space import load_space

PARAMS = {"data.name", "model.arch", "compress.method", "compress.amount", "finetune.epochs",
          "algo.conv", "algo.format", "compiler.tuner", "hw.target", "hw.threads"}
METRICS = {"accuracy", "latency_ms", "latency_std_ms", "size_mb", "params", "sparsity",
           "speedup_vs_torch", "finetune_s", "compile_s", "torch_latency_ms", "macs"}


def child_runs(experiment: str):
    client = MlflowClient(tracking.default_tracking_uri())
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], "", max_results=1000)
    parents = [r for r in runs if r.data.tags.get(tracking.ROLE) == "study"]
    children = [r for r in runs if r.data.tags.get(tracking.ROLE) == "trial"]
    return client, parents, children


@pytest.mark.slow  # two studies, four compiled trials (the fast study: thresholds, below)
def test_study_persists_and_continues(tiny_space, cache_dir):
    space = load_space(tiny_space)
    first = run_search(space, trials=2, cache_dir=cache_dir)
    assert len(first.study.trials) == 2
    second = run_search(space, trials=2, cache_dir=cache_dir)
    study = optuna.load_study(study_name="tiny", storage=default_storage())
    assert second.study.study_name == "tiny"
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 4  # both runs' trials
    assert len({config_of(t) for t in complete}) == 4  # no configuration twice
    for t in study.trials:
        if t.state == optuna.trial.TrialState.PRUNED:  # a repeat, skipped before any work
            assert t.user_attrs["duplicate_of"] in {c.number for c in complete}

    client, parents, children = child_runs("tiny")
    assert len(parents) == 1  # the continued study kept its parent run
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    for key in ("dlas.torch", "dlas.tvm", "dlas.optuna", "dlas.mlflow", "dlas.cpu"):
        assert parent.data.tags.get(key), key
    assert json.loads(parent.data.tags["dlas.objectives"]) == space.objectives
    assert len(children) == 4  # one child run per completed trial
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sorted(int(c.data.tags[tracking.TRIAL]) for c in children) == \
        sorted(t.number for t in complete)
    by_run = {t.user_attrs["mlflow_run_id"]: t for t in complete}
    for child in children:
        assert child.info.status == "FINISHED"
        assert PARAMS <= set(child.data.params), PARAMS - set(child.data.params)
        assert METRICS <= set(child.data.metrics), METRICS - set(child.data.metrics)
        trial = by_run[child.info.run_id]
        assert trial.values == [child.data.metrics[m] for m in space.objectives]
        if child.data.params["compress.method"] == "none":
            assert child.data.params["compress.amount"] == "-"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "pareto")}
    assert {"pareto/pareto.csv", "pareto/pareto.json", "pareto/pareto.html"} <= artifacts


@pytest.mark.slow  # a whole study (the fast one: thresholds, below)
@pytest.mark.reliability("a trial whose compile raises",
                         "that trial FAIL in Optuna (reason in user attr error), FAILED in "
                         "MLflow with error.txt", kept="the study goes on; the other trials complete")
def test_a_failing_trial_fails_alone(tiny_space, workdir, monkeypatch):
    """A compile that raises fails that trial alone. (Its own stage cache: a shared one may
    hold the first trial's compiled module from an earlier test, and it would not compile.)"""
    real_compile, calls = compiler.compile, []

    def compile_that_breaks_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected compiler fault")
        return real_compile(*args, **kwargs)

    monkeypatch.setattr(compiler, "compile", compile_that_breaks_once)
    outcome = run_search(load_space(tiny_space), study_name="faulty", trials=2,
                         cache_dir=workdir / "cache")
    ran = [t for t in outcome.study.trials if t.state != optuna.trial.TrialState.PRUNED]
    assert [t.state for t in ran] == [optuna.trial.TrialState.FAIL,
                                      optuna.trial.TrialState.COMPLETE]
    failed = ran[0]
    assert "injected compiler fault" in failed.user_attrs["error"]

    client, parents, children = child_runs("faulty")
    by_status = {c.info.status: c for c in children}
    assert set(by_status) == {"FAILED", "FINISHED"}
    broken = by_status["FAILED"]
    assert broken.info.run_id == failed.user_attrs["mlflow_run_id"]
    assert "injected compiler fault" in broken.data.tags["dlas.error"]
    error_file = client.download_artifacts(broken.info.run_id, "error.txt")
    text = open(error_file).read()
    assert "Traceback" in text and "injected compiler fault" in text
    assert parents[0].info.status == "FINISHED"
    assert len(outcome.front) >= 1  # the finished trial still makes a front


# sparse format only for unstructured-pruned fp32 models: a constraint across two layers
SPARSE_SPACE = TINY_SPACE.replace("amount: [0.5, 0.8]", "amount: 0.8").replace(
    "algo: {conv: [direct, direct_nhwc]}", "algo: {conv: [direct, im2col_gemm], format: sparse}")
NEEDS_PRUNING = "algo.format sparse needs an unstructured-pruned fp32 model"


def test_search_prunes_ruled_out_samples_before_any_work(workdir, monkeypatch):
    """Half the space (compress.method none with sparse format) is ruled out: those samples
    are pruned with the reason, get no MLflow run and do not count against the budget."""
    ran = []

    def run_instantly(config, cache=None, gates=None):  # the pipeline is not what is tested here
        ran.append(config)
        return pipeline.TrialResult({"accuracy": 0.5, "latency_ms": float(len(ran)),
                                     "size_mb": 1.0, "speedup_vs_torch": 1.0, "sparsity": 0.8})

    monkeypatch.setattr(pipeline, "run", run_instantly)
    space = load_space(write_space(workdir, SPARSE_SPACE))
    storage = f"sqlite:///{workdir}/optuna.db"
    study = optuna.create_study(study_name="sparse", storage=storage,
                                directions=space.directions)
    study.enqueue_trial({"compress.method": "none", "algo.conv": "direct"})  # sampled first
    outcome = run_search(space, study_name="sparse", trials=2, storage=storage)
    trials = outcome.study.trials
    ruled_out = [t for t in trials if "infeasible" in t.user_attrs]
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert ruled_out and len(complete) == 2
    for t in ruled_out:
        assert t.state == optuna.trial.TrialState.PRUNED
        assert t.params["compress.method"] == "none"
        assert t.user_attrs["infeasible"].startswith(NEEDS_PRUNING)
        assert "mlflow_run_id" not in t.user_attrs
    assert [c.compress.method for c in ran] == ["unstructured", "unstructured"]
    _, _, children = child_runs("sparse")
    assert len(children) == 2


@pytest.mark.reliability("a space whose constraints rule out every configuration",
                         "exit 2: the constraint and what to use instead",
                         kept="nothing written (no tracking folder)")
@pytest.mark.parametrize("command", ["search", "trial"])
def test_a_ruled_out_configuration_is_bad_input_before_anything_is_written(workdir, command,
                                                                          capsys):
    """`dlas trial` on a ruled-out configuration, and `dlas search` on a space that has only
    ruled-out ones (sparse format, method none): exit 2 with the reason, nothing written."""
    path = write_space(workdir, SPARSE_SPACE.replace("method: [none, unstructured]",
                                                     "method: [none, int8]"), "bad.yaml")
    with pytest.raises(BadInput, match=NEEDS_PRUNING):
        run_search(load_space(path))
    assert main([command, "--space", str(path)]) == 2
    err = capsys.readouterr().err
    assert NEEDS_PRUNING in err and "got none" in err
    assert sorted(p.name for p in workdir.iterdir()) == ["bad.yaml"]


# --- samplers ----------------------------------------------------------------------------------

GRID_SPACE = TINY_SPACE.replace("sampler: {name: nsga2, population_size: 2}",
                                "sampler: grid").replace("budget: {trials: 2}",
                                                         "budget: {trials: 50}")


def test_grid_sampler_enumerates_every_configuration_exactly(workdir):
    """Asked until it stops, the grid yields each configuration the space allows (conditional
    parameters included: amount only for unstructured) and nothing else."""
    space = load_space(write_space(workdir, GRID_SPACE))
    from dlas_search.search import make_sampler
    study = optuna.create_study(sampler=make_sampler(space, 0), directions=space.directions)
    seen = []

    def record(trial):
        seen.append(json.dumps(space.suggest(trial).params(), sort_keys=True))
        return [0.0, 0.0, 0.0]
    study.optimize(record, n_trials=100)  # the grid stops the study when it is done
    assert len(seen) == 8  # 2 methods x 2 amounts x 2 convs: amount repeats under none
    # method none/unstructured x amount 0.5/0.8 (only for unstructured) x conv 2
    assert len(set(seen)) == space.size() == 6
    assert {json.loads(c)["compress.amount"] for c in seen} == {None, 0.5, 0.8}


@pytest.mark.slow  # a whole study (the fast one: thresholds, below)
def test_grid_study_runs_each_configuration_once_and_stops(workdir, cache_dir):
    text = GRID_SPACE.replace("algo: {conv: [direct, direct_nhwc]}", "algo: {conv: direct}")
    outcome = run_search(load_space(write_space(workdir, text)), cache_dir=str(cache_dir))
    complete = [t for t in outcome.study.trials if t.state.name == "COMPLETE"]
    configs = {json.dumps({k: v for k, v in t.params.items()}, sort_keys=True)
               for t in complete}
    assert len(complete) == len(configs) == 3  # none, unstructured 0.5, unstructured 0.8
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in outcome.study.trials)


@pytest.mark.reliability("sampler grid over a continuous range",
                         "BadInput: the range needs a step or a list", kept="nothing written")
def test_grid_needs_steps(workdir):
    text = GRID_SPACE.replace("amount: [0.5, 0.8]", "amount: {low: 0.5, high: 0.9}")
    with pytest.raises(BadInput, match="sampler grid .* compress.amount .* step"):
        load_space(write_space(workdir, text))


def test_qmc_sampler_gives_valid_configurations(workdir):
    text = TINY_SPACE.replace("sampler: {name: nsga2, population_size: 2}", "sampler: qmc")
    text = text.replace("amount: [0.5, 0.8]", "amount: {low: 0.5, high: 0.9}")
    space = load_space(write_space(workdir, text))
    from dlas_search.search import make_sampler
    study = optuna.create_study(sampler=make_sampler(space, 0), directions=space.directions)
    amounts = []
    for _ in range(8):
        trial = study.ask()
        config = space.suggest(trial)
        if config.compress.method == "unstructured":
            amounts.append(config.compress.amount)
        study.tell(trial, [0.0, 0.0, 0.0])
    assert amounts and all(0.5 <= a <= 0.9 for a in amounts)


def test_macs_is_an_objective(workdir):
    text = TINY_SPACE.replace("objectives: {accuracy: maximize, latency_ms: minimize, "
                              "size_mb: minimize}", "objectives: {accuracy: maximize, "
                              "macs: minimize}")
    assert load_space(write_space(workdir, text)).objectives == {"accuracy": "maximize",
                                                                 "macs": "minimize"}


# --- thresholds ----------------------------------------------------------------------------

@pytest.mark.reliability("a malformed thresholds: section",
                         "BadInput naming the metric, the bound and what is allowed",
                         kept="nothing written")
@pytest.mark.parametrize("thresholds,words", [
    ("{accuracy: {min: 0.9}, colour: {max: 1}}", ["thresholds", "colour", "latency_ms"]),
    ("{accuracy: 0.9}", ["thresholds.accuracy", "min and/or max"]),
    ("{accuracy: {least: 0.9}}", ["thresholds.accuracy", "min and/or max"]),
    ("{accuracy: {min: high}}", ["thresholds.accuracy.min", "number"]),
    ("{latency_ms: {min: 5, max: 1}}", ["thresholds.latency_ms", "above max"]),
])
def test_bad_thresholds_are_named(workdir, thresholds, words):
    with pytest.raises(BadInput) as error:
        load_space(write_space(workdir, TINY_SPACE + f"thresholds: {thresholds}\n"))
    for word in words:
        assert word in str(error.value), (word, str(error.value))


def test_trials_outside_a_threshold_never_enter_the_front(workdir, cache_dir):
    """accuracy >= 2 cannot be met: every trial completes, is marked infeasible in Optuna (its
    constraint) and MLflow, and neither our front nor Optuna's best trials hold any of them."""
    space = load_space(write_space(workdir, TINY_SPACE + "thresholds: {accuracy: {min: 2}}\n"
                                            "gates: {finetune: false}\n"))  # see test_gates
    outcome = run_search(space, cache_dir=str(cache_dir))
    done = [t for t in outcome.study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 2 and outcome.front == []
    assert all(t.user_attrs["constraints"][0] > 0 for t in done)
    assert outcome.study.best_trials == []  # Optuna's own view: no feasible trial
    front = json.loads((outcome.pareto_dir / "pareto.json").read_text())
    assert front["feasible"] == 0 and front["trials"] == 2 and front["thresholds"] == {
        "accuracy": {"min": 2.0}}
    listed = (outcome.pareto_dir / "trials.csv").read_text().splitlines()
    assert ",feasible,violates," in listed[0]
    assert len(listed) == 3 and all(",False,accuracy " in line and " < min 2," in line
                                    for line in listed[1:])  # kept, and why
    _, _, children = child_runs("tiny")
    assert {r.data.tags["dlas.feasible"] for r in children} == {"false"}
    assert all(r.data.metrics["threshold_violation"] > 0 for r in children)


def test_front_keeps_only_feasible_rows():
    from dlas_search.pareto import Trials
    rows = [{"trial": i, "run_id": str(i), "name": str(i), "params": {},
             "metrics": {"accuracy": a, "latency_ms": l}}
            for i, (a, l) in enumerate([(0.95, 9.0), (0.80, 1.0), (0.92, 5.0)])]
    objectives = {"accuracy": "maximize", "latency_ms": "minimize"}
    assert [r["trial"] for r in Trials("t", objectives, rows).front()] == [0, 1, 2]
    limited = Trials("t", objectives, rows, {"accuracy": {"min": 0.9}})
    assert [r["trial"] for r in limited.front()] == [0, 2]  # trial 1 is fastest but too poor


# --- a worker killed mid-trial --------------------------------------------------------------

@pytest.mark.slow  # kills `dlas search` subprocesses mid-trial and runs the study again
@pytest.mark.reliability("kill -9 of dlas search mid-trial, then the same command again",
                         "the killed trial FAIL in Optuna and FAILED in MLflow at once (the "
                         "reason names its worker's host and pid), run again once",
                         kept="completed trials kept, never repeated")
def test_killed_worker_trial_is_failed_everywhere_and_run_again(workdir, cache_dir):
    """kill -9 of `dlas search` in the middle of its second trial, then the same command
    again at once, with the default 60 s heartbeat: the first trial is kept, the killed one
    is FAIL in Optuna and FAILED in MLflow (not RUNNING until its heartbeats go stale) before
    any new trial, its configuration runs again once, nothing is duplicated."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    text = TINY_SPACE.replace("repeat: 3, min_repeat_ms: 1", "repeat: 20, min_repeat_ms: 100")
    path = write_space(workdir, text)
    argv = [sys.executable, "-m", "dlas_search", "search", "--space", str(path),
            "--cache-dir", str(cache_dir)]
    storage = default_storage()
    worker = subprocess.Popen([*argv, "--trials", "3"], cwd=workdir, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed = None
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and worker.poll() is None:
            time.sleep(0.5)
            try:
                trials = optuna.load_study(study_name="tiny", storage=storage).trials
            except Exception:
                continue  # the study is not created yet
            states = [t.state.name for t in trials]
            if states.count("COMPLETE") >= 1 and "RUNNING" in states and \
                    trials[-1].user_attrs.get("mlflow_run_id"):
                killed = trials[-1]
                time.sleep(1.0)
                break
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
    assert killed is not None, worker.stderr.read()[-3000:]
    assert killed.user_attrs["worker_pid"] == worker.pid  # recorded when the trial started
    assert killed.user_attrs["worker_host"] == socket.gethostname()
    again = subprocess.run([*argv, "--trials", "2"], cwd=workdir, capture_output=True,
                           text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    worker_named = f"(host {socket.gethostname()}, pid {worker.pid}) died"
    failed_at = again.stderr.index(f"[trial {killed.number}] FAILED: the worker running")
    assert worker_named in again.stderr[failed_at:].splitlines()[0]
    first_done = re.search(r"\[trial \d+\] .*\(\d+ s\)", again.stderr)
    assert first_done and failed_at < first_done.start()  # at once: before any new trial
    assert "still RUNNING" not in again.stdout and "still running" not in again.stdout

    trials = optuna.load_study(study_name="tiny", storage=storage).trials
    by_number = {t.number: t for t in trials}
    assert by_number[killed.number].state.name == "FAIL"
    assert worker_named in by_number[killed.number].user_attrs["error"]
    assert by_number[0].state.name == "COMPLETE"  # finished before the kill: kept
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == 3  # 1 before the kill + 2 asked again
    assert any(t.params == killed.params for t in complete)  # the killed one ran again
    assert len({config_of(t) for t in complete}) == 3  # no configuration twice
    client, _, children = child_runs("tiny")
    status = {r.info.run_id: r.info.status for r in children}
    assert status[killed.user_attrs["mlflow_run_id"]] == "FAILED"
    assert worker_named in client.get_run(killed.user_attrs["mlflow_run_id"]).data.tags[
        "dlas.error"]
    assert "RUNNING" not in status.values()
    finished = [t.user_attrs["mlflow_run_id"] for t in complete]
    assert len(set(finished)) == 3 and all(status[r] == "FINISHED" for r in finished)
    assert len(children) == len(status) == 4  # 3 finished + the killed one, no duplicates
    assert sorted(int(r.data.tags[tracking.TRIAL]) for r in children
                  if r.info.status == "FINISHED") == sorted(t.number for t in complete)
    for r in children:  # each run names the process that ran it
        assert r.data.tags["dlas.worker_host"] == socket.gethostname()
        assert r.data.tags["dlas.worker_pid"].isdigit() and r.data.tags["dlas.worker_started"]


@pytest.mark.parametrize("name", ["quickstart", "cifar10", "imagenet"])
def test_shipped_spaces_load_and_show(name, capsys):
    from conftest import ROOT
    path = ROOT / "spaces" / f"{name}.yaml"
    space = load_space(path)
    assert space.study == name and space.targets  # each names the project's registry
    assert main(["space", "show", str(path)]) == 0
    assert "size:" in capsys.readouterr().out


@pytest.mark.slow  # a grid study of many trials (minutes)
def test_grid_study_finishes_the_grid_despite_long_runs_of_repeats(workdir, monkeypatch,
                                                                   capsys):
    """A grid whose points mostly repeat a configuration (here a parameter that applies to
    none of them: 40 values of compiler.trials, untuned) still runs every configuration: the
    'space looks exhausted' stop (30 repeats in a row) is off for the grid sampler, which
    stops by itself at the end of the grid. Its progress bar counts the 4 configurations, not
    the budget of 50 trials."""
    text = GRID_SPACE.replace("amount: [0.5, 0.8]", "amount: [0.5]")
    text = text.replace("  algo:", "  compiler:\n    tuner: none\n    trials: [" +
                        ", ".join(str(n) for n in range(1, 41)) + "]\n  algo:", 1)
    space = load_space(write_space(workdir, text))
    assert space.size() == 4  # none / unstructured 0.5, x direct / direct_nhwc

    def fake_run(config, cache=None, gates=None):  # the search's bookkeeping is under test, not the stack
        return pipeline.TrialResult({"accuracy": 0.5, "latency_ms": 1.0, "size_mb": 1.0})
    monkeypatch.setattr(pipeline, "run", fake_run)
    outcome = run_search(space, heartbeat_s=0)
    complete = [t for t in outcome.study.trials if t.state.name == "COMPLETE"]
    assert len(outcome.study.trials) == 160  # every grid point proposed once
    assert len(complete) == len({config_of(t) for t in complete}) == 4
    bar = capsys.readouterr().err
    assert "4/4 [" in bar and "/50 [" not in bar
