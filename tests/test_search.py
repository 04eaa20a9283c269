"""The study: persistent across runs, one MLflow child run per trial, failures fail alone."""
import json

import optuna
from mlflow.tracking import MlflowClient

from dlas_search import compiler, tracking
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


def test_study_persists_and_continues(tiny_space, cache_dir):
    space = load_space(tiny_space)
    first = run_search(space, trials=2, cache_dir=cache_dir)
    assert len(first.study.trials) == 2
    second = run_search(space, trials=2, cache_dir=cache_dir)
    study = optuna.load_study(study_name="tiny", storage=default_storage())
    assert second.study.study_name == "tiny"
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 4  # both runs' trials
    assert len({t.user_attrs["config"] for t in complete}) == 4  # no configuration twice
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


def test_a_failing_trial_fails_alone(tiny_space, cache_dir, monkeypatch):
    real_compile, calls = compiler.compile, []

    def compile_that_breaks_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected compiler fault")
        return real_compile(*args, **kwargs)

    monkeypatch.setattr(compiler, "compile", compile_that_breaks_once)
    outcome = run_search(load_space(tiny_space), study_name="faulty", trials=2,
                         cache_dir=cache_dir)
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
