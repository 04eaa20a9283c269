"""Stage gates: a trial that breaks a threshold after fine-tuning stops before compiling,
pruned in Optuna, FINISHED and tagged in MLflow, never a failure and never on the front."""
import json

import optuna
import pytest
from mlflow.tracking import MlflowClient

from conftest import TINY_SPACE, write_space
from dlas_search import stages, tracking
from dlas_search.errors import BadInput
from dlas_search.gates import Gates
from dlas_search.search import run_search
from dlas_search.space import load_space


def test_the_finetune_gate_judges_only_what_fine_tuning_measured():
    gates = Gates({"accuracy": {"min": 0.5}, "size_mb": {"max": 10},
                   "latency_ms": {"max": 1.0}})
    assert gates.after_finetune({"accuracy": 0.9, "size_mb": 4.0}) is None
    why = gates.after_finetune({"accuracy": 0.31, "size_mb": 12.5})
    assert "accuracy 0.31 is below the threshold's min 0.5" in why
    assert "size_mb 12.5 is above the threshold's max 10" in why
    assert "latency" not in why.split("(")[0]  # latency is not known after fine-tuning
    assert Gates({"accuracy": {"min": 0.5}}, finetune=False).after_finetune(
        {"accuracy": 0.1}) is None
    assert Gates({}).after_finetune({"accuracy": 0.0}) is None  # no thresholds: no gate


@pytest.mark.parametrize("section, words", [
    ("gates: {finetune: 1}", ["gates.finetune", "true or false"]),
    ("gates: {compile: true}", ["gates", "'compile' is not allowed", "finetune"]),
    ("gates: [finetune]", ["gates: a mapping"]),
])
def test_bad_gates_are_named_with_what_is_allowed(workdir, section, words):
    with pytest.raises(BadInput) as error:
        load_space(write_space(workdir, TINY_SPACE + section + "\n"))
    for word in words:
        assert word in str(error.value), (word, str(error.value))


def test_a_trial_below_the_floor_stops_before_compiling(workdir, cache_dir, monkeypatch):
    compiled = []
    real = stages.Stages.compiled
    monkeypatch.setattr(stages.Stages, "compiled",
                        lambda self, *a: compiled.append(self.cfg) or real(self, *a))
    space = load_space(write_space(workdir, TINY_SPACE + "thresholds: {accuracy: {min: 2}}\n"))
    outcome = run_search(space, cache_dir=str(cache_dir), confirm_rounds=0)
    assert compiled == []  # no trial reached layer 5
    ran = [t for t in outcome.study.trials if "stopped_at" in t.user_attrs]
    assert len(ran) == 2  # both count against the budget of 2: the study ended
    for trial in ran:
        assert trial.state == optuna.trial.TrialState.PRUNED
        assert trial.user_attrs["stopped_at"] == "finetune"
        assert "accuracy" in trial.user_attrs["stopped_reason"]
        assert "below the threshold's min 2" in trial.user_attrs["stopped_reason"]
        assert 0 <= trial.user_attrs["accuracy"] <= 1
    assert not [t for t in outcome.study.trials if t.state == optuna.trial.TrialState.FAIL]
    client = MlflowClient(tracking.default_tracking_uri())
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id], "")
    trials = [r for r in runs if r.data.tags.get(tracking.ROLE) == "trial"]
    assert len(trials) == 2
    for run in trials:
        assert run.info.status == "FINISHED"
        assert run.data.tags["dlas.stopped_at"] == "finetune"
        assert run.data.tags["dlas.feasible"] == "false"
        assert "accuracy" in run.data.metrics and "size_mb" in run.data.metrics
        assert "latency_ms" not in run.data.metrics and "compile_s" not in run.data.metrics
    parent = next(r for r in runs if r.data.tags.get(tracking.ROLE) == "study")
    assert parent.data.metrics["trials_stopped"] == 2
    assert parent.data.metrics["trials_failed"] == 0
    assert outcome.front == []
    assert json.loads((outcome.pareto_dir / "pareto.json").read_text())["trials"] == 0


def test_a_stopped_configuration_is_not_run_again(workdir, cache_dir):
    """A sampler proposing a configuration a gate stopped gets `duplicate_of`, no new run."""
    text = TINY_SPACE.replace("method: [none, unstructured]", "method: none") \
        .replace("algo: {conv: [direct, direct_nhwc]}", "algo: {conv: direct}")
    space = load_space(write_space(workdir, text + "thresholds: {accuracy: {min: 2}}\n"))
    outcome = run_search(space, trials=1, cache_dir=str(cache_dir), confirm_rounds=0)
    again = run_search(space, trials=1, cache_dir=str(cache_dir), confirm_rounds=0)
    trials = again.study.trials
    assert trials[0].user_attrs["stopped_at"] == "finetune"
    assert all(t.user_attrs.get("duplicate_of") == 0 for t in trials[1:]) and len(trials) > 1
    assert outcome.front == []
