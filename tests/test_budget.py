"""A study's budget: trials, hours, the study-wide tuning budget, and the start estimate."""
import optuna
import pytest

from conftest import TINY_SPACE, write_space
from dlas_search import pipeline
from dlas_search.budget import estimate
from dlas_search.cache import StageCache
from dlas_search.errors import BadInput
from dlas_search.gates import Gates
from dlas_search.objective import Objective
from dlas_search.space import load_space


def with_budget(workdir, budget: str):
    return load_space(write_space(workdir, TINY_SPACE.replace("budget: {trials: 2}",
                                                              f"budget: {budget}")))


def test_hours_are_the_studys_time_limit(workdir):
    space = with_budget(workdir, "{trials: 5, hours: 0.5, tuning_trials: 300}")
    assert space.timeout_s == 1800 and space.trials == 5 and space.tuning_trials == 300
    assert with_budget(workdir, "{trials: 5}").tuning_trials is None


@pytest.mark.parametrize("budget, words", [
    ("{hours: 1, timeout_s: 60}", ["hours or timeout_s, not both"]),
    ("{hours: -1}", ["budget.hours", "positive number"]),
    ("{tuning_trials: -5}", ["budget.tuning_trials", "integer >= 0"]),
    ("{tuning_trials: 1.5}", ["budget.tuning_trials"]),
    ("{tuning: 100}", ["budget", "'tuning' is not allowed", "tuning_trials"]),
])
def test_bad_budgets_are_named(workdir, budget, words):
    with pytest.raises(BadInput) as error:
        with_budget(workdir, budget)
    for word in words:
        assert word in str(error.value), (word, str(error.value))


def study_with(*attrs: dict) -> optuna.Study:
    study = optuna.create_study(directions=["maximize"])
    for n, user_attrs in enumerate(attrs):
        study.add_trial(optuna.trial.create_trial(
            values=[0.5], params={}, distributions={}, user_attrs=user_attrs))
    return study


def test_the_estimate_learns_from_earlier_trials():
    assert "none yet" in estimate(study_with(), 8)
    study = study_with({"trial_s": 10.0}, {"trial_s": 20.0}, {"trial_s": 30.0}, {})
    line = estimate(study, 4)
    assert "4 trial(s) x 20 s" in line and "median of 3" in line and "about 80 s" in line
    assert "about 40 s" in estimate(study, 4, workers=2)
    assert "stops it at 60 s" in estimate(study, 4, timeout_s=60)


def test_the_tuning_budget_is_what_the_studys_trials_have_not_spent(workdir, capsys):
    space = with_budget(workdir, "{trials: 5, tuning_trials: 100}")
    objective = Objective(space, None, StageCache(None))
    assert objective.tuning_left(study_with()) == 100
    assert objective.tuning_left(study_with({"tuning_new_trials": 64},
                                            {"tuning_new_trials": 30})) == 6
    assert objective.tuning_left(study_with({"tuning_new_trials": 64},
                                            {"tuning_new_trials": 64})) == 0
    assert "tuning budget (budget.tuning_trials 100) is spent" in capsys.readouterr().err
    unlimited = Objective(with_budget(workdir, "{trials: 5}"), None, StageCache(None))
    assert unlimited.tuning_left(study_with({"tuning_new_trials": 10 ** 6})) is None
    assert Gates({}, tuning_left=6).tuning_trials(64) == 6
    assert Gates({}).tuning_trials(64) == 64


def test_a_trial_with_no_tuning_budget_left_measures_nothing_new(tiny_space, cache_dir,
                                                                 tmp_path):
    config = load_space(tiny_space).pin({
        "compress.method": "none", "algo.conv": "direct", "compiler.tuner": "metaschedule",
        "compiler.trials": 64, "compiler.database": str(tmp_path / "db")}).defaults()
    result = pipeline.run(config, StageCache(cache_dir), Gates({}, tuning_left=0))
    assert result.metrics["tuning_new_trials"] == 0
    assert result.metrics["tuning_tasks"] > 0 and result.metrics["latency_ms"] > 0
    assert result.metrics["max_rel_error"] < 1e-4


def test_the_hours_stop_the_study_and_the_estimate_is_printed(workdir, monkeypatch, capsys):
    """budget.hours is the study's wall time: a study of 50 trials of 1 s each with 3 s of
    budget stops after a few; the next run of it starts with an estimate from those."""
    import time

    def one_second(config, cache=None, gates=None):  # the pipeline is not what is tested
        time.sleep(1.0)
        return pipeline.TrialResult({"accuracy": 0.5, "latency_ms": 1.0, "size_mb": 1.0})

    monkeypatch.setattr(pipeline, "run", one_second)
    from dlas_search.search import run_search
    space = with_budget(workdir, "{trials: 50, hours: 0.000834}")  # 3.0 s
    outcome = run_search(space, confirm_rounds=0)
    ran = [t for t in outcome.study.trials if t.state.name == "COMPLETE"]
    assert 1 <= len(ran) <= 4  # Optuna's timeout stops it after the trial running at 3 s
    assert "estimate: none yet" in capsys.readouterr().err
    run_search(space, trials=1, confirm_rounds=0)
    assert f"median of {len(ran)} earlier trial(s)" in capsys.readouterr().err
