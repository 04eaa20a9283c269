"""The MLproject entry points, run as a user runs them (`mlflow run . -e ...`); the `dlas`
command run the same way is in test_cli.py."""
import csv
import json
import os
import subprocess

import pytest
from mlflow.tracking import MlflowClient

from conftest import ROOT

# `mlflow run` starts a whole study (and an export) in subprocesses
pytestmark = pytest.mark.slow


def run(argv, cwd, env=None, timeout=900):
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_mlflow_run_search_then_pareto(tiny_space, workdir):
    """`mlflow run . -e search` on a minimal space, then `-e pareto` from MLflow alone."""
    store = f"sqlite:///{workdir}/store/mlflow.db"
    out_dir = workdir / "front"
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{workdir}/launcher.db"}
    search = run(["mlflow", "run", str(ROOT), "-e", "search", "--env-manager", "local",
                  "-P", f"space={tiny_space}", "-P", "trials=2", "-P", f"tracking_uri={store}",
                  "-P", f"storage=sqlite:///{workdir}/store/optuna.db",
                  "-P", f"out={out_dir}"], cwd=workdir, env=env)
    assert search.returncode == 0, search.stderr[-3000:]
    assert "[trial 0]" in search.stderr and "[trial 1]" in search.stderr
    front = json.loads((out_dir / "pareto.json").read_text())
    assert front["study"] == "tiny" and front["trials"] == 2 and front["front"]
    assert set(front["objectives"]) == {"accuracy", "latency_ms", "size_mb"}
    with open(out_dir / "pareto.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(front["front"]) and float(rows[0]["latency_ms"]) > 0
    assert "<html" in (out_dir / "pareto.html").read_text()[:1000].lower()

    # the launcher's own run points at the study and carries the export, but the plot page
    # (plotly inlined), which the study's run holds: stored once in MLflow
    launcher = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = launcher.search_runs(["0"], "tags.`dlas.study` = 'tiny'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    kept = {a.path for a in launcher.list_artifacts(runs[0].info.run_id, "pareto")}
    assert kept >= {"pareto/pareto.json", "pareto/pareto.csv", "pareto/pareto.png"}
    assert "pareto/pareto.html" not in kept
    study_run = runs[0].data.tags["dlas.study_run_id"]
    assert "pareto/pareto.html" in {a.path for a in MlflowClient(store).list_artifacts(
        study_run, "pareto")}

    again = workdir / "again"
    pareto = run(["mlflow", "run", str(ROOT), "-e", "pareto", "--env-manager", "local",
                  "-P", "experiment=tiny", "-P", f"tracking_uri={store}", "-P", f"out={again}"],
                 cwd=workdir, env=env)
    assert pareto.returncode == 0, pareto.stderr[-3000:]
    assert json.loads((again / "pareto.json").read_text())["front"] == front["front"]

    # and -e confirm times the front again from the kept libraries, then exports it
    confirmed = workdir / "confirmed"
    confirm = run(["mlflow", "run", str(ROOT), "-e", "confirm", "--env-manager", "local",
                   "-P", "experiment=tiny", "-P", "rounds=1", "-P", f"tracking_uri={store}",
                   "-P", f"out={confirmed}"], cwd=workdir, env=env)
    assert confirm.returncode == 0, confirm.stderr[-3000:]
    assert "timed again in 1 rounds" in confirm.stdout
    assert json.loads((confirmed / "pareto.json").read_text())["confirmed"] >= 1
