"""Faults: a trial that breaks (in any layer, by a NaN loss, a hang, too much memory, a full
disk) fails alone with the layer and the reason in Optuna and MLflow; the study goes on."""
import errno
import math
import re
import tempfile
import time

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import TINY_SPACE, slow_except, write_space
from dlas_search import (compiler, compression, data, faults, hardware, models, pipeline,
                         tracking, training, tuning)
from dlas_search.errors import BadInput
from dlas_search.search import run_search
from dlas_search.space import load_space

# two configurations (compress.method none or unstructured 0.5) of a small CNN: cheap to
# train and compile, so every layer can really run without the stage cache
TWO_TRIALS = TINY_SPACE.replace("amount: [0.5, 0.8]", "amount: 0.5").replace(
    "algo: {conv: [direct, direct_nhwc]}", "algo: {conv: direct}").replace(
    "arch: resnet18", "arch: 'test_faults:small_cnn'")


def small_cnn(num_classes: int) -> torch.nn.Module:
    """A user model (`model.arch: test_faults:small_cnn`): two convs, a few thousand weights."""
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))


def trial_runs(study: str) -> tuple[MlflowClient, dict]:
    client = MlflowClient(tracking.default_tracking_uri())
    experiment = client.get_experiment_by_name(study)
    runs = client.search_runs([experiment.experiment_id], f"tags.`{tracking.ROLE}` = 'trial'")
    return client, {r.info.run_id: r for r in runs}


def assert_failed_alone(outcome, study: str, layer: str, words: str, traceback: bool = True):
    """One trial is FAIL in Optuna (layer and reason as user attributes) and FAILED in MLflow
    (tag dlas.failed_layer, traceback in error.txt); the other one completed."""
    ran = sorted((t for t in outcome.study.trials if t.state.name != "PRUNED"),
                 key=lambda t: t.state.name != "FAIL")
    assert [t.state.name for t in ran] == ["FAIL", "COMPLETE"], [t.user_attrs for t in ran]
    failed = ran[0]
    assert failed.user_attrs["failed_layer"] == layer
    assert words in failed.user_attrs["error"]
    client, runs = trial_runs(study)
    run = runs[failed.user_attrs["mlflow_run_id"]]
    assert run.info.status == "FAILED"
    assert run.data.tags["dlas.failed_layer"] == layer
    assert words in run.data.tags["dlas.error"]
    error = open(client.download_artifacts(run.info.run_id, "error.txt")).read()
    assert words in error and ("Traceback" in error or not traceback)
    assert runs[ran[1].user_attrs["mlflow_run_id"]].info.status == "FINISHED"
    return failed, run


def break_once(monkeypatch, module, name: str, message: str, when=lambda *a, **k: True):
    """Make `module.name` raise on its first call for which `when(...)` holds (first trial)."""
    real, calls = getattr(module, name), []

    def breaks_once(*args, **kwargs):
        if when(*args, **kwargs):
            calls.append(1)
        if len(calls) == 1 and when(*args, **kwargs):
            raise RuntimeError(message)
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, breaks_once)
    return calls


LAYER_FUNCTIONS = {  # the layer -> the function its stage calls
    "data": (data, "load"),
    "model": (models, "build"),
    "compression": (compression, "compress"),
    "fine-tune": (training, "fit"),
    "compile": (compiler, "compile"),
    "tune": (tuning, "tune"),
    "measure": (hardware.timing, "time_tvm"),
}


@pytest.mark.parametrize("layer", slow_except(LAYER_FUNCTIONS, "data", "compile"))  # a study each
def test_an_exception_in_a_layer_fails_the_trial_with_that_layer(workdir, monkeypatch, layer):
    """A trial that raises in one layer is FAIL, names the layer and the error, and the study
    runs its next trial."""
    text = TWO_TRIALS
    if layer == "tune":  # the tuner is only called when the space asks for one
        text += "  compiler: {tuner: metaschedule, trials: 4}\n"
        text = text.replace("  hw: {", "  hw: {warmup: 1, ").replace("warmup: 1, threads",
                                                                     "threads")
    module, name = LAYER_FUNCTIONS[layer]
    fine_tuning = lambda *args, desc="", **kwargs: desc.startswith("fine-tune")  # noqa: E731
    calls = break_once(monkeypatch, module, name, f"injected fault in {layer}",
                       # training.fit also trains the model (layer 2): break fine-tuning only
                       **({"when": fine_tuning} if layer == "fine-tune" else {}))
    if layer == "tune":  # the second trial need not really tune to show the study goes on
        monkeypatch.setattr(tuning, "tune", _fail_first_then_skip(calls))
    outcome = run_search(load_space(write_space(workdir, text)), study_name=f"fault-{layer}",
                         trials=2, cache_dir="")  # no stage cache: every layer really runs
    assert_failed_alone(outcome, f"fault-{layer}", layer, f"injected fault in {layer}")


def _fail_first_then_skip(calls):
    def tune(mod, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected fault in tune")
        return mod, None
    return tune


def test_a_nan_loss_fails_the_trial_and_reports_no_accuracy(workdir, monkeypatch):
    """A fine-tuning loss that becomes NaN fails the trial with "loss became nan at epoch E,
    step S"; no accuracy is reported for it."""
    text = TWO_TRIALS.replace("finetune: {epochs: 0}", "finetune: {epochs: 1}")
    real_fit, calls = training.fit, []

    def fit_with_a_poisoned_model(model, loader, epochs, lr, desc, teacher=None):
        calls.append(desc)
        if desc.startswith("fine-tune") and len([c for c in calls if "fine" in c]) == 1:
            with torch.no_grad():  # what a diverging run leaves: NaN weights
                next(model.parameters()).fill_(math.nan)
        return real_fit(model, loader, epochs, lr, desc, teacher)

    monkeypatch.setattr(training, "fit", fit_with_a_poisoned_model)
    outcome = run_search(load_space(write_space(workdir, text)), study_name="nan", trials=2,
                         cache_dir="")
    failed, run = assert_failed_alone(outcome, "nan", "fine-tune",
                                      "loss became nan at epoch 1, step 1")
    assert "accuracy" not in failed.user_attrs and failed.values is None
    assert "accuracy" not in run.data.metrics


def test_a_full_disk_fails_the_trial_naming_the_path(workdir, monkeypatch):
    """When the trial's artifacts cannot be written (disk full), the trial fails with a message
    naming the path, and its run is FAILED, not FINISHED with half its artifacts."""
    text = TWO_TRIALS + "  compiler: {tuner: metaschedule, trials: 4}\n"
    monkeypatch.setattr(tuning, "tune", _records_only)
    real, calls = tracking.Tracker.finish_trial, []

    def finish_on_a_full_disk(self, run_id, metrics, tags, artifacts=None, deploy=None):
        calls.append(1)
        if len(calls) == 1:
            import shutil
            real_copy = shutil.copy2

            def copy_fails(src, dst, *a, **k):
                raise OSError(errno.ENOSPC, "No space left on device", str(dst))
            monkeypatch.setattr(shutil, "copy2", copy_fails)
            try:
                return real(self, run_id, metrics, tags, artifacts, deploy)
            finally:
                monkeypatch.setattr(shutil, "copy2", real_copy)
        return real(self, run_id, metrics, tags, artifacts, deploy)

    monkeypatch.setattr(tracking.Tracker, "finish_trial", finish_on_a_full_disk)
    outcome = run_search(load_space(write_space(workdir, text)), study_name="full",
                         trials=2, cache_dir="")
    failed, run = assert_failed_alone(outcome, "full", "artifacts", "No space left on device")
    error = failed.user_attrs["error"]
    assert "could not store the trial's results" in error
    path = re.search(r"No space left on device: '(/[^']+)'", error)[1]  # where it failed:
    assert path.startswith((str(workdir / "tracking" / "artifacts" / "full"),  # the store,
                            tempfile.gettempdir()))  # or staging the MLflow Model


def _records_only(mod, target, trials, database, threads=1, export_to=None, rpc=None,
                  extend=False, cold_weights=False, transfer=True):
    """Tuning stand-in: writes a records file (the artifact) without tuning."""
    export_to.mkdir(parents=True)
    (export_to / "records.json").write_text("{}")
    return mod, None


# --- per-trial limits: the trial runs in a child process that is killed past a limit ------

def _fake_result() -> pipeline.TrialResult:
    return pipeline.TrialResult({"accuracy": 0.5, "latency_ms": 1.0, "size_mb": 1.0})


def hanging_run(config, cache, gates=None):
    """Pipeline stand-in (runs in the child): compiling method `none` never returns; it
    leaves its process id in child.pid so the test can check the process is gone."""
    import os
    from pathlib import Path
    if config.compress.method != "none":
        return _fake_result()
    Path("child.pid").write_text(str(os.getpid()))
    with faults.layer("compile"):
        time.sleep(3600)


def hungry_run(config, cache, gates=None):
    """Pipeline stand-in: measuring method `none` allocates (and touches) 100 MB a step, up to
    8 GB."""
    if config.compress.method != "none":
        return _fake_result()
    with faults.layer("measure"):
        hoard = []
        for _ in range(80):
            hoard.append(b"\x01" * (100 * 2 ** 20))
            time.sleep(0.05)


LIMITED = TWO_TRIALS.replace("budget: {trials: 2}", "budget: {trials: 2, %s}")


@pytest.mark.slow  # a study whose trials run in spawned child processes
def test_a_hanging_trial_is_stopped_at_the_time_limit(workdir, monkeypatch):
    """A trial that hangs is stopped after budget.trial_timeout_s: FAIL with "timed out after
    N s", its process is gone, and the worker runs the next trial."""
    import psutil
    monkeypatch.setattr(pipeline, "run", hanging_run)
    space = load_space(write_space(workdir, LIMITED % "trial_timeout_s: 10"))
    start = time.monotonic()
    outcome = run_search(space, study_name="hang", trials=2, cache_dir="")
    assert time.monotonic() - start < 300  # not the hour the trial asked for
    failed, run = assert_failed_alone(outcome, "hang", "compile", "timed out after 10 s",
                                      traceback=False)  # stopped from outside: no traceback
    pid = int((workdir / "child.pid").read_text())
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@pytest.mark.slow  # a study whose trials run in spawned child processes
def test_a_trial_over_the_memory_limit_fails_alone(workdir, monkeypatch):
    """A trial whose process grows past budget.trial_memory_mb is killed and fails with the
    memory it used and the limit; the next trial runs."""
    monkeypatch.setattr(pipeline, "run", hungry_run)
    space = load_space(write_space(workdir, LIMITED % "trial_memory_mb: 2500"))
    outcome = run_search(space, study_name="hungry", trials=2, cache_dir="")
    failed, _ = assert_failed_alone(outcome, "hungry", "measure",
                                    "over the limit of 2500 MB (budget.trial_memory_mb",
                                    traceback=False)


@pytest.mark.slow  # a study whose trials run in spawned child processes
def test_a_limited_trial_runs_the_real_pipeline_in_a_child(workdir):
    """With a time limit, a trial runs in a child process and logs what it would have logged
    in-process: its metrics, tags and stage-cache use."""
    space = load_space(write_space(workdir, LIMITED % "trial_timeout_s: 600"))
    outcome = run_search(space, study_name="child", trials=1, cache_dir="")
    [trial] = outcome.study.trials
    assert trial.state.name == "COMPLETE", trial.user_attrs
    _, runs = trial_runs("child")
    run = runs[trial.user_attrs["mlflow_run_id"]]
    assert run.info.status == "FINISHED"
    assert {"accuracy", "latency_ms", "size_mb", "compile_s", "finetune_s", "trial_s",
            "speedup_vs_torch"} <= set(run.data.metrics)
    assert trial.values == [run.data.metrics[m] for m in space.objectives]
    assert run.data.tags["cache.model"] == "miss" and run.data.tags["dlas.precision"] == "fp32"


@pytest.mark.parametrize("budget,words", [
    ("{trial_timeout_s: 0}", "budget.trial_timeout_s: 0 must be a positive number"),
    ("{trial_memory_mb: lots}", "budget.trial_memory_mb: 'lots' must be a positive number"),
    ("{trial_timeout: 5}", "trial_timeout_s"),
])
def test_bad_limits_are_named(workdir, budget, words):
    """A bad limit in budget: is refused with the key and what is allowed."""
    with pytest.raises(BadInput, match=words):
        load_space(write_space(workdir, TWO_TRIALS.replace("budget: {trials: 2}",
                                                           f"budget: {budget}")))


# --- the MLflow tracking server goes away mid-study -----------------------------------------

def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 over a SQLite store in `folder`; start() again
    after stop() brings the same store back."""

    def __init__(self, folder):
        self.folder, self.port, self.process = folder, _free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self):
        import subprocess
        import sys
        import urllib.request
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.folder}/mlflow.db",
             "--artifacts-destination", str(self.folder / "artifacts")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "mlflow server exited"
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                    return self
            except OSError:
                time.sleep(0.5)
        raise TimeoutError("mlflow server did not come up")

    def stop(self):
        import os
        import signal
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)  # gone, as a crashed server is
            self.process.wait()


@pytest.fixture
def mlflow_server(workdir, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # fail fast in the test
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    (workdir / "server").mkdir()
    server = MlflowServer(workdir / "server").start()
    yield server
    server.stop()


THREE_TRIALS = TWO_TRIALS.replace("algo: {conv: direct}", "algo: {conv: [direct, im2col_gemm]}")


@pytest.mark.slow  # starts an mlflow server (twice) and runs a study
def test_mlflow_going_away_stops_the_study_and_reconcile_backfills(workdir, monkeypatch,
                                                                   mlflow_server, capsys):
    """When the MLflow server dies mid-study, the study stops with a message naming the trial
    Optuna kept but MLflow lacks; `dlas reconcile` lists it (--dry-run) and back-fills it."""
    from dlas_search.cli import main
    calls = []

    def run_then_kill_the_server(config, cache=None, gates=None):  # the pipeline is not tested here
        calls.append(1)
        if len(calls) == 2:
            mlflow_server.stop()
        return pipeline.TrialResult({"accuracy": 0.5 + len(calls) / 10,
                                     "latency_ms": float(len(calls)), "size_mb": 1.0})

    monkeypatch.setattr(pipeline, "run", run_then_kill_the_server)
    storage = f"sqlite:///{workdir}/optuna.db"
    outcome = run_search(load_space(write_space(workdir, THREE_TRIALS)), study_name="gone",
                         trials=3, storage=storage, tracking_uri=mlflow_server.uri)
    assert len(calls) == 2  # stopped after the trial MLflow could not take
    assert "stopped answering" in outcome.tracking_lost
    assert "dlas reconcile --study gone" in outcome.tracking_lost
    trials = [t for t in outcome.study.trials if t.state.name == "COMPLETE"]
    assert len(trials) == 2
    lost = [t for t in trials if "mlflow_missing" in t.user_attrs]
    assert [t.number for t in lost] == [trials[1].number]  # said so, on the trial itself

    mlflow_server.start()
    client = MlflowClient(mlflow_server.uri)
    args = ["reconcile", "--study", "gone", "--storage", storage,
            "--tracking-uri", mlflow_server.uri]
    capsys.readouterr()
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "1 finished trial(s) missing" in out and f"trial {lost[0].number} (complete)" in out
    assert client.get_run(lost[0].user_attrs["mlflow_run_id"]).info.status == "RUNNING"

    assert main(args) == 0
    run = client.get_run(lost[0].user_attrs["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["dlas.backfilled"] == "true"
    assert [run.data.metrics[m] for m in ("accuracy", "latency_ms", "size_mb")] == \
        lost[0].values
    assert run.data.params["compress.method"] == str(lost[0].params["compress.method"])
    assert main([*args, "--dry-run"]) == 0
    assert "0 finished trial(s) missing" in capsys.readouterr().out
    finished = client.search_runs([client.get_experiment_by_name("gone").experiment_id],
                                  "attributes.status = 'FINISHED' and tags.`dlas.role` = "
                                  "'trial'")
    assert len(finished) == 2  # nothing lost, nothing duplicated


def test_reconcile_of_an_unknown_study_is_bad_input(workdir, capsys):
    """`dlas reconcile` of a study the storage does not hold: exit 2 naming the studies."""
    from dlas_search.cli import main
    optuna.create_study(study_name="there", storage=f"sqlite:///{workdir}/o.db")
    assert main(["reconcile", "--study", "elsewhere", "--storage",
                 f"sqlite:///{workdir}/o.db", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "'elsewhere': no such study" in err and "there" in err
