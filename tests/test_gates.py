"""Stage gates: a trial that breaks a threshold after fine-tuning stops before compiling,
pruned in Optuna, FINISHED and tagged in MLflow, never a failure and never on the front."""
import json

import optuna
import pytest
from mlflow.tracking import MlflowClient

from conftest import TINY_SPACE, write_space
from dlas_search import pipeline, stages, tracking
from dlas_search.cache import StageCache
from dlas_search.errors import BadInput
from dlas_search.gates import Gates
from dlas_search.objective import Objective
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


UNTUNED = dict(untuned_build=True,
               objectives={"accuracy": "maximize", "latency_ms": "minimize", "size_mb": "minimize"},
               front=((3, (0.9, 1.0, 2.0)),),
               speedups=((1, "direct", 2.5), (2, "direct", 4.0), (5, "direct_nhwc", 9.0)))


def test_the_untuned_gate_stops_what_even_the_best_tuning_seen_cannot_lift():
    gates = Gates({}, **UNTUNED)
    early = {"accuracy": 0.8, "size_mb": 3.0}
    why, rule = gates.after_untuned(early, 8.0, "direct")  # 8 / 4.0 = 2 ms at best
    assert "untuned 8 ms / the best tuning speed-up on algo.conv direct so far (4.00x, " \
           "trial 2, of 2) = at best 2 ms tuned" in why
    assert "dominated by trial 3 (accuracy 0.9, latency_ms 1, size_mb 2)" in why
    assert rule in why
    why, rule = gates.after_untuned(early, 8.0, "direct_nhwc")  # 8 / 9.0 < 1 ms: might win
    assert why is None and "not dominated" in rule and "at best 0.8889 ms" in rule
    why, rule = gates.after_untuned(early, 8.0, "im2col")  # no evidence: tuned
    assert why is None and "no trial with algo.conv im2col has been tuned yet" in rule
    better = {"accuracy": 0.95, "size_mb": 3.0}  # more accurate than the front: never stopped
    assert gates.after_untuned(better, 80.0, "direct")[0] is None


def test_the_untuned_gate_reads_the_study_so_far(workdir):
    space = load_space(write_space(workdir, TINY_SPACE + "gates: {untuned_build: true}\n"))
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    for values, attrs in [((0.9, 1.0, 2.0), {"constraints": [-0.1]}),
                          ((0.99, 0.5, 1.0), {"constraints": [0.2]}),  # infeasible
                          ((0.8, 2.0, 2.0), {"tuning_speedup": 3.0,
                                             "config": json.dumps({"algo.conv": "direct"})})]:
        study.add_trial(optuna.trial.create_trial(values=list(values), params={},
                                                  distributions={}, user_attrs=attrs))
    seen = Objective(space, None, None).seen(study)
    assert seen == {"front": ((0, (0.9, 1.0, 2.0)), (2, (0.8, 2.0, 2.0))),
                    "speedups": ((2, "direct", 3.0),)}
    assert Objective(load_space(write_space(workdir)), None, None).seen(study) == {}


@pytest.mark.parametrize("text, words", [
    ("gates: {untuned_build: yes please}", ["gates.untuned_build", "true or false"]),
    ("gates: {untuned_build: true}\nobjectives: {accuracy: maximize, size_mb: minimize}",
     ["gates.untuned_build", "needs latency_ms among the objectives", "accuracy, size_mb"]),
])
def test_the_untuned_gate_needs_latency(workdir, text, words):
    with pytest.raises(BadInput) as error:
        load_space(write_space(workdir, TINY_SPACE.replace(
            "objectives: {accuracy: maximize, latency_ms: minimize, size_mb: minimize}\n", "")
            + text + "\n"))
    for word in words:
        assert word in str(error.value), (word, str(error.value))


def test_a_tuned_trial_the_untuned_gate_stops_is_never_tuned(tiny_space, cache_dir, tmp_path,
                                                             monkeypatch):
    """Stopped: an untuned build was timed, layer 5's tuned build never ran. Let through:
    the trial logs its untuned latency and the speed-up tuning gave it (with no tuning
    trials left, the database's and transferred schedules only: cheap)."""
    compiled = []
    real = stages.Stages.compiled
    monkeypatch.setattr(stages.Stages, "compiled",
                        lambda self, *a: compiled.append(self.cfg) or real(self, *a))
    config = load_space(tiny_space).pin({
        "compress.method": "none", "algo.conv": "direct", "compiler.tuner": "metaschedule",
        "compiler.trials": 64, "compiler.database": str(tmp_path / "db")}).defaults()
    hopeless = Gates({}, tuning_left=0, **{**UNTUNED, "front": ((0, (1.0, 1e-9, 1e-9)),)})
    result = pipeline.run(config, StageCache(cache_dir), hopeless)
    assert result.stopped["at"] == "untuned_build" and compiled == []
    assert "dominated by trial 0" in result.stopped["reason"]
    assert result.metrics["untuned_latency_ms"] > 0 and "latency_ms" not in result.metrics
    hopeful = Gates({}, tuning_left=0, **{**UNTUNED, "front": ()})
    result = pipeline.run(config, StageCache(cache_dir), hopeful)
    assert not result.stopped and len(compiled) == 1
    assert result.metrics["tuning_speedup"] == pytest.approx(
        result.metrics["untuned_latency_ms"] / result.metrics["latency_ms"])
    assert "not dominated by the study's trials so far: tuned" in result.info["untuned_gate"]
