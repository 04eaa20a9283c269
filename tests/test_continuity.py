"""Stores written by the release before the restructuring into packages and a registry
(commit 1cac00f) keep working with today's code: its study continues with `dlas search` (same
Optuna study, same MLflow parent run, a completed configuration not run again) and its stage
cache is hit by today's `dlas trial` (the cache keys did not change)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import io

import optuna
import pytest
from mlflow.tracking import MlflowClient
from dlas_search.objective import config_of

from conftest import ROOT, write_space

pytestmark = pytest.mark.slow

BEFORE = "1cac00f"  # the last commit before the restructuring (issue 24)

SPACE = """\
study: continued
seed: 0
objectives: {accuracy: maximize, latency_ms: minimize, size_mb: minimize}
sampler: {name: random}
budget: {trials: 1}
space:
  data: {name: digits, image_size: 16, val_fraction: 0.3}
  model: {arch: resnet18, epochs: 1}
  compress: {method: [none, fp16]}
  finetune: {epochs: 0}
  algo: {conv: direct}
  hw: {threads: 1, warmup: 1, repeat: 3, min_repeat_ms: 1}
"""


def old_release(folder):
    """The package as it was at BEFORE, unpacked into `folder` (skip without git history)."""
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", BEFORE,
                                  "dlas_search"], capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"commit {BEFORE} is not in this checkout's history: {e}")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return folder


def dlas(*args, code_from, cwd):
    env = {**os.environ, "PYTHONPATH": str(code_from)}
    done = subprocess.run([sys.executable, "-m", "dlas_search", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_a_study_of_the_release_before_continues_and_its_cache_is_hit(workdir, tmp_path_factory):
    old = old_release(tmp_path_factory.mktemp("before"))
    space = write_space(workdir, SPACE)
    common = ["--space", str(space), "--trials", "1", "--cache-dir", str(workdir / "cache")]
    dlas("search", *common, code_from=old, cwd=workdir)
    storage = f"sqlite:///{workdir / 'tracking' / 'optuna.db'}"
    first = optuna.load_study(study_name="continued", storage=storage).trials
    assert [t.state.name for t in first] == ["COMPLETE"]

    dlas("search", *common, code_from=ROOT, cwd=workdir)  # today's code, same stores
    trials = optuna.load_study(study_name="continued", storage=storage).trials
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == 2, [(t.state.name, t.user_attrs) for t in trials]  # no repeat
    assert config_of(complete[0]) != config_of(complete[1])
    assert complete[0].params["compress.method"] != complete[1].params["compress.method"]

    client = MlflowClient(f"sqlite:///{workdir / 'tracking' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("continued")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("dlas.role") == "study"]
    children = [r for r in runs if r.data.tags.get("dlas.role") == "trial"]
    assert len(parents) == 1 and len(children) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}

    # the old trial's stages, asked for by today's `dlas trial`: every one a cache hit
    method = first[0].params["compress.method"]
    out = dlas("trial", "--space", str(space), "--set", f"compress.method={method}", "--json",
               "--cache-dir", str(workdir / "cache"), code_from=ROOT, cwd=workdir)
    outcome = json.loads(out)
    assert outcome["status"] == "FINISHED"
    tags = client.get_run(outcome["run_id"]).data.tags
    assert (tags["cache.finetune"], tags["cache.compile"]) == ("hit", "hit"), tags
