"""Tuning in rounds: the configurations that could be on the front are tuned further, the
dominated ones are not; the extension takes the configuration's row in MLflow."""
import json
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from conftest import write_space
from dlas_search import pareto, tracking, tuning
from dlas_search import rounds as rounds_module
from dlas_search.errors import BadInput
from dlas_search.rounds import Rounds, to_extend
from dlas_search.search import run_search
from dlas_search.space import load_space

OBJECTIVES = {"accuracy": "maximize", "latency_ms": "minimize"}


def row(trial: int, latency: float, half: float, tuner: str = "metaschedule",
        trials: int = 64, accuracy: float = 0.9) -> dict:
    return {"trial": trial, "run_id": str(trial), "name": str(trial),
            "params": {"compiler.tuner": tuner, "compiler.trials": str(trials)},
            "metrics": {"accuracy": accuracy, "latency_ms": latency,
                        "latency_ci_low_ms": latency - half, "latency_ci_high_ms": latency + half}}


def test_the_rows_that_could_reach_the_front_get_the_next_budget():
    rows = [row(0, 1.00, 0.05), row(1, 1.02, 0.05),    # tied: both could be best
            row(2, 2.00, 0.10),                        # certainly slower, same accuracy
            row(3, 5.00, 0.01, tuner="none"),          # untuned: nothing to extend
            row(4, 0.90, 0.01, trials=1024),           # at max already
            row(5, 1.50, 0.05, accuracy=0.95)]         # slower but more accurate: front
    trials = pareto.Trials("t", OBJECTIVES, rows)
    picks = to_extend(trials, Rounds(start=64, factor=4, max=1024))
    assert [(r["trial"], budget) for r, budget in picks] == [(5, 256)]  # 4 beats 0, 1, 2
    rows[4] = row(4, 3.0, 0.01, trials=1024)  # now slow: 0 and 1 are on the front again
    picks = to_extend(pareto.Trials("t", OBJECTIVES, rows), Rounds(64, 4, 1024))
    assert [r["trial"] for r, _ in picks] == [0, 1, 5]
    generous = to_extend(pareto.Trials("t", OBJECTIVES, rows), Rounds(64, 4, 1024, margin=0.5))
    assert [r["trial"] for r, _ in generous] == [0, 1, 2, 5]  # 2 is within 50%
    infeasible = pareto.Trials("t", OBJECTIVES, rows, {"accuracy": {"min": 0.92}})
    assert [r["trial"] for r, _ in to_extend(infeasible, Rounds(64, 4, 1024))] == [5]
    assert Rounds(64, 4, 1024).next(256) == 1024 and Rounds(64, 4, 1000).next(256) == 1000
    assert Rounds(64, 4, 1024).next(1024) is None


SPACE = """\
study: rounds
seed: 0
objectives: {latency_ms: minimize}
sampler: {name: grid}
budget:
  trials: 10
  tuning_rounds: {start: 4, factor: 2, max: 8}
space:
  data: {name: digits, image_size: 16, val_fraction: 0.3}
  model: {arch: 'test_faults:small_cnn', epochs: 1}
  compress: {method: none}
  finetune: {epochs: 0}
  algo: {conv: [direct, direct_nhwc, im2col_gemm]}
  compiler: {tuner: metaschedule, database: DB}
  hw: {threads: 1, warmup: 1, repeat: 15, min_repeat_ms: 2}
"""


@pytest.mark.parametrize("budget, words", [
    ("{tuning_rounds: {start: 4, factor: 1}}", ["tuning_rounds.factor", ">= 2"]),
    ("{tuning_rounds: {start: 64, max: 16}}", ["max 16 is below start 64"]),
    ("{tuning_rounds: {factor: 4}}", ["a mapping with start"]),
    ("{tuning_rounds: {start: 4, step: 2}}", ["'step' is not allowed", "factor"]),
    ("{tuning_rounds: {start: 4, margin: 1.5}}", ["margin", "[0, 1)"]),
])
def test_bad_rounds_are_named(workdir, budget, words):
    with pytest.raises(BadInput) as error:
        load_space(write_space(workdir, SPACE.replace(
            "budget:\n  trials: 10\n  tuning_rounds: {start: 4, factor: 2, max: 8}",
            f"budget: {budget}")))
    for word in words:
        assert word in str(error.value), (word, str(error.value))


def test_rounds_need_tuning_and_own_the_first_budget(workdir):
    with pytest.raises(BadInput, match="compiler.trials gives"):
        load_space(write_space(workdir, SPACE.replace("tuner: metaschedule,",
                                                      "tuner: metaschedule, trials: 16,")))
    with pytest.raises(BadInput, match="never is metaschedule"):
        load_space(write_space(workdir, SPACE.replace("tuner: metaschedule,", "tuner: none,")))
    assert load_space(write_space(workdir, SPACE)).defaults().compiler.trials == 4


def record_counts(database: Path) -> dict[str, int]:
    """Tuning records per workload (by its structural hash) in a target's JSON database."""
    [folder] = [p for p in database.iterdir() if p.is_dir()]
    workloads = [json.loads(line)[0] for line in
                 (folder / "database_workload.json").read_text().splitlines() if line.strip()]
    counts = dict.fromkeys(workloads, 0)
    for line in (folder / "database_tuning_record.json").read_text().splitlines():
        if line.strip():
            counts[workloads[json.loads(line)[0]]] += 1
    return counts


@pytest.mark.slow  # tunes three configurations, then extends the front's
def test_the_front_member_is_tuned_further_and_the_dominated_one_is_not(workdir, cache_dir,
                                                                       monkeypatch):
    tuned_tasks, model_tasks = [], []  # what each MetaSchedule run measured; each model's
    real_run, real_fuse = tuning._run_metaschedule, tuning.fuse
    monkeypatch.setattr(tuning, "_run_metaschedule", lambda todo, *a, **k: (
        tuned_tasks.append({t.task_name for t in todo}), real_run(todo, *a, **k))[1])

    def fuse(mod):  # once per compile: the model's task functions
        fused = real_fuse(mod)
        model_tasks.append(set(tuning.task_functions(fused)[0]))
        return fused
    monkeypatch.setattr(tuning, "fuse", fuse)
    text = SPACE.replace("DB", str(workdir / "db"))
    first = load_space(write_space(workdir, text.replace(
        "  tuning_rounds: {start: 4, factor: 2, max: 8}\n", "").replace(
        "compiler: {tuner: metaschedule,", "compiler: {tuner: metaschedule, trials: 4,")))
    outcome = run_search(first, cache_dir=str(cache_dir), confirm_rounds=0)
    assert len([t for t in outcome.study.trials if t.state.name == "COMPLETE"]) == 3
    before = record_counts(workdir / "db")
    uri = tracking.default_tracking_uri()
    expected = to_extend(pareto.load_trials(uri, "rounds"), Rounds(4, 2, 8))
    assert 0 < len(expected) < 3, "the three configurations should not all tie"
    first_pass, compiles = len(tuned_tasks), len(model_tasks)
    assert compiles == 3

    rounds_seen = []  # per round: its picks, and where its MetaSchedule runs begin
    real_pick = rounds_module.to_extend
    monkeypatch.setattr(rounds_module, "to_extend", lambda *a: (
        rounds_seen.append((real_pick(*a), len(tuned_tasks))), rounds_seen[-1][0])[1])
    outcome = run_search(load_space(write_space(workdir, text)), trials=1,
                         cache_dir=str(cache_dir), confirm_rounds=0)
    # The first round extends the configurations that could be on the front. A later round
    # may add one whose interval an extension's new timing no longer certainly beats, and may
    # name again one whose slower extension left its row as it was: that one is not run twice.
    first_picks = [r["trial"] for r, _ in rounds_seen[0][0]]
    assert first_picks == [r["trial"] for r, _ in expected]
    extensions = [t for t in outcome.study.trials if "extends" in t.user_attrs]
    picked = {(r["run_id"], budget): r["trial"] for picks, _ in rounds_seen
              for r, budget in picks}
    assert sorted(t.user_attrs["extends"] for t in extensions) == sorted(picked.values())
    assert all(t.state.name == "COMPLETE" and t.user_attrs["tuning_trials"] == 8
               for t in extensions)
    after = record_counts(workdir / "db")
    grown = {w for w in after if after[w] > before.get(w, 0)}
    assert grown and set(after) == set(before)  # more records, no new workloads
    extended = set().union(*(model_tasks[n] for n in first_picks))
    in_round = set().union(*tuned_tasks[first_pass:rounds_seen[1][1] if len(rounds_seen) > 1
                                        else None])
    assert in_round and in_round <= extended  # only the extended configurations' tasks
    others = set().union(*(model_tasks[n] for n in range(3) if n not in first_picks)) - extended
    assert others and not in_round & others  # the dominated ones' own tasks: not tuned

    client = MlflowClient(uri)
    held = []  # the extensions that hold their configuration's row
    for trial in extensions:  # the faster build holds the row; the other round is under it
        earlier = client.get_run(trial.user_attrs["extends_run"])
        later = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert later.data.tags[tracking.EXTENDS] == earlier.info.run_id
        assert later.data.params["compiler.trials"] == "8"
        assert later.data.metrics["tuning_new_trials"] <= 4
        first, second = (earlier, later) if later.data.metrics["latency_ms"] <= \
            earlier.data.metrics["latency_ms"] else (later, earlier)
        assert first.data.tags[tracking.SUPERSEDED] == second.info.run_id
        assert first.data.tags["mlflow.parentRunId"] == second.info.run_id
        assert tracking.SUPERSEDED not in second.data.tags
        held += [trial.number] if second is later else []
    rows = pareto.load_trials(uri, "rounds").rows
    assert len(rows) == 3  # one row per configuration
    assert sorted(r["trial"] for r in rows if r["params"]["compiler.trials"] == "8") == held
    assert optuna.load_study(study_name="rounds", storage=f"sqlite:///{workdir}/tracking/"
                             "optuna.db").trials  # the study is whole


def test_the_faster_round_keeps_the_row():
    from dlas_search.rounds import keeps_row
    assert keeps_row({"latency_ms": 2.0}, {"latency_ms": 1.5})
    assert keeps_row({"latency_ms": 2.0}, {"latency_ms": 2.0})
    assert not keeps_row({"latency_ms": 2.0}, {"latency_ms": 2.1})  # tuned longer, timed slower
    assert keeps_row({}, {"latency_ms": 2.1})  # nothing to compare: the latest round
