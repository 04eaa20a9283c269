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
