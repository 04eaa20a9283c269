"""confirm.py and `dlas confirm`: the front's candidates timed again side by side."""
import csv

import pytest
from mlflow.tracking import MlflowClient

from dlas_search import cli, pareto, tracking
from dlas_search.search import run_search
from dlas_search.space import load_space


@pytest.mark.slow  # a study of three compiled trials, then two confirmations
def test_a_study_ends_with_a_confirmed_front(tiny_space, cache_dir, capsys):
    space = load_space(tiny_space)
    run_search(space, trials=3, cache_dir=cache_dir, confirm_rounds=2)
    uri = tracking.default_tracking_uri()
    trials = pareto.load_trials(uri, "tiny")
    client = MlflowClient(uri)
    confirmed = [row for row in trials.rows if "latency_search_ms" in row["metrics"]]
    assert confirmed and trials.confirmed == len(confirmed)
    front = {row["trial"] for row in trials.front()}
    assert front <= {row["trial"] for row in confirmed}  # every front point was confirmed
    for row in confirmed:
        m = row["metrics"]
        assert m["latency_ms"] == m["latency_confirmed_ms"]  # the front uses it
        assert m["latency_confirmed_ci_low_ms"] <= m["latency_ms"] \
            <= m["latency_confirmed_ci_high_ms"]
        # every number beside it is the confirmed one too; the search's are kept by name
        for name in ("latency_ci_low_ms", "latency_ci_high_ms", "latency_p90_ms",
                     "torch_latency_ms", "speedup_vs_torch", "speedup_vs_torch_ci_low"):
            assert m[name] == m[name.replace("latency", "latency_confirmed", 1)
                                .replace("speedup_vs_torch", "speedup_vs_torch_confirmed")]
        assert m["latency_search_ci_low_ms"] <= m["latency_search_ms"]
        assert m["confirm_rounds"] == 2
        run = client.get_run(row["run_id"])
        assert run.info.status == "FINISHED" and run.data.tags["dlas.confirmed"]
        assert run.data.metrics["latency_ms"] == m["latency_search_ms"]  # the search's kept
    with open("tracking/pareto/tiny/pareto.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r["confirmed"] == "True" for r in rows) and "tied_with" in rows[0]

    # again by hand, from the kept libraries: nothing is compiled
    assert cli.main(["confirm", "--experiment", "tiny", "--rounds", "1",
                     "--cache-dir", str(cache_dir)]) == 0
    out = capsys.readouterr()
    assert "timed again in 1 rounds" in out.out and "the confirmed numbers of" in out.out
    assert "interleaved rounds, each beside its PyTorch baseline" in out.err
    again = pareto.load_trials(uri, "tiny")
    assert all(row["metrics"]["confirm_rounds"] == 1 for row in again.rows
               if row["trial"] in front)


def test_confirm_names_a_missing_experiment_and_bad_rounds(tiny_space, capsys):
    assert cli.main(["confirm", "--experiment", "nope"]) == 2
    assert "no MLflow database there yet" in capsys.readouterr().err
    assert cli.main(["search", "--space", str(tiny_space), "--confirm-rounds", "-1"]) == 2
    assert "--confirm-rounds -1: rounds of timing the front again, >= 0" \
        in capsys.readouterr().err


def _row(trial: int, latency: float, accuracy: float = 0.9) -> dict:
    return {"trial": trial, "run_id": f"run{trial}", "params": {},
            "metrics": {"accuracy": accuracy, "latency_ms": latency,
                        "latency_ci_low_ms": latency * 0.98,
                        "latency_ci_high_ms": latency * 1.02}}


def test_a_trial_the_confirmed_numbers_let_onto_the_front_is_timed_with_the_others(
        monkeypatch, tmp_path):
    """Trial 0 is certainly dominated by trial 1 in the search's numbers, but trial 1 times
    at 3 ms when confirmed: trial 0 joins, and both are timed again together."""
    from dlas_search import confirm

    trials = pareto.Trials("s", {"accuracy": "maximize", "latency_ms": "minimize"},
                           [_row(0, 2.0), _row(1, 1.0), _row(2, 5.0, accuracy=0.5)])
    true_ms = {0: 2.0, 1: 3.0, 2: 5.0}
    timed, logged, said = [], {}, []
    monkeypatch.setattr(pareto, "load_trials", lambda uri, experiment: trials)
    monkeypatch.setattr(confirm, "_prepare",
                        lambda client, t, row, cache, scratch: confirm.Candidate(row))

    def fake_round(candidates, start):
        timed.append(sorted(c.row["trial"] for c in candidates))
        for c in candidates:
            c.torch_ms += [4.0, 4.1, 3.9]
            c.tvm_ms += [true_ms[c.row["trial"]] + d for d in (0.0, 0.01, -0.01)]

    monkeypatch.setattr(confirm, "_round", fake_round)
    monkeypatch.setattr(confirm, "add_to_run",
                        lambda client, run_id, metrics, tags: logged.update({run_id: metrics}))
    out = confirm.confirm(f"sqlite:///{tmp_path}/unused.db", "s", rounds=2, say=said.append)
    assert timed == [[1], [1], [0, 1], [0, 1]]  # pass 1: trial 1 alone; pass 2: both
    assert set(out.confirmed) == {0, 1} and set(logged) == {"run0", "run1"}
    assert logged["run1"]["latency_confirmed_ms"] == pytest.approx(3.0, abs=0.02)
    assert logged["run0"]["confirm_rounds"] == 2
    assert any("let trial(s) 0 onto the front" in line for line in said)
