"""A trial's worker: recorded when it starts; a dead one on this host fails its trial at once,
a live one never; the others are named in the summary with when they go stale. Real processes
(killed with SIGKILL) and a real SQLite storage; only the pipeline is replaced by a quick one."""
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import optuna
import pytest

from conftest import ROOT, write_space
from dlas_search import pipeline, workers
from dlas_search.cli import main
from dlas_search.objective import config_key, set_config
from dlas_search.search import default_storage
from dlas_search.space import load_space

# a process that records itself as the worker of trial <id> in <storage>, then waits to die
RECORDER = """\
import sys, time, optuna
from dlas_search import workers
storage = optuna.storages.RDBStorage(sys.argv[1])
for key, value in workers.identity().items():
    storage.set_trial_user_attr(int(sys.argv[2]), key, value)
print("recorded", flush=True)
time.sleep(600)
"""


def worker_of(storage: str, trial_id: int) -> subprocess.Popen:
    """Start a real process that records itself as the trial's worker; once it has."""
    proc = subprocess.Popen([sys.executable, "-c", RECORDER, storage, str(trial_id)],
                            env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "recorded"
    return proc


def killed(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_a_process_is_named_by_host_pid_and_start_time():
    me = workers.identity()
    assert me == {"worker_host": socket.gethostname(), "worker_pid": os.getpid(),
                  "worker_started": workers.started(os.getpid())}
    assert me["worker_started"].isdigit()
    assert workers.tags(me)["dlas.worker_pid"] == str(os.getpid())
    assert workers.gone(me) is None  # this process: alive


def test_dead_recycled_and_zombie_workers_are_gone_live_and_foreign_ones_not():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        record = {"worker_host": socket.gethostname(), "worker_pid": child.pid,
                  "worker_started": workers.started(child.pid)}
        assert workers.gone(record) is None  # alive
        recycled = {**record, "worker_started": str(int(record["worker_started"]) + 1)}
        assert "pid now belongs to another process" in workers.gone(recycled)
        assert workers.gone({**record, "worker_host": "elsewhere"}) is None  # cannot tell
        assert workers.gone({}) is None  # no record (a study from before): cannot tell
        child.send_signal(signal.SIGKILL)
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # dead, not reaped: a zombie
        assert workers.started(child.pid) is None
        reason = workers.gone(record)
        assert f"host {socket.gethostname()}, pid {child.pid}" in reason
        assert "process is gone" in reason
    finally:
        child.kill()
        child.wait()
    assert "process is gone" in workers.gone(record)  # reaped


def test_heartbeats_off_never_go_stale(workdir):
    storage = f"sqlite:///{workdir}/optuna.db"
    study = optuna.create_study(study_name="s", storage=storage)
    trial = study.ask()
    study._storage.set_trial_user_attr(trial._trial_id, "worker_host", "elsewhere")
    study._storage.set_trial_user_attr(trial._trial_id, "worker_pid", 7)
    assert workers.still_running(study) == [
        f"trial {trial.number} still RUNNING (host elsewhere, pid 7): no heartbeat (heartbeats "
        "off): never declared stale automatically"]


def quick_pipeline(monkeypatch):
    """The pipeline is not what is tested here: each trial returns at once."""
    ran = []

    def run_instantly(config, cache=None, gates=None):
        ran.append(config)
        return pipeline.TrialResult({"accuracy": 0.5, "latency_ms": float(len(ran)),
                                     "size_mb": 1.0, "speedup_vs_torch": 1.0, "sparsity": 0.0})
    monkeypatch.setattr(pipeline, "run", run_instantly)
    return ran


@pytest.mark.slow  # a whole search over four left-over trials (12 s); the fast tier keeps the rest
@pytest.mark.reliability(
    "trials left RUNNING by a SIGKILLed worker on this host, a live one, and two on another "
    "host (one beating, one silent for 10 min); then dlas search (default heartbeat)",
    "the dead worker's trial FAIL at once (reason names host and pid) and run again; the "
    "silent one failed by its heartbeats; the live and beating ones named in the summary, "
    "with when they go stale", kept="a live worker's trial is never failed")
def test_search_settles_the_trials_of_lost_and_live_workers(workdir, monkeypatch, capsys):
    ran = quick_pipeline(monkeypatch)
    path = write_space(workdir)
    space = load_space(path)
    storage = default_storage()
    (workdir / "tracking").mkdir()
    study = optuna.create_study(study_name="tiny", storage=storage, directions=space.directions)
    trials = {}
    for name, params in {"dead": {"compress.method": "none", "algo.conv": "direct"},
                         "live": {"compress.method": "none", "algo.conv": "direct_nhwc"},
                         "beating": {"compress.method": "unstructured",
                                     "compress.amount": 0.5, "algo.conv": "direct"},
                         "silent": {"compress.method": "unstructured",
                                    "compress.amount": 0.8, "algo.conv": "direct"}}.items():
        study.enqueue_trial(params)
        trial = study.ask()
        set_config(trial, config_key(space.suggest(trial)))
        trials[name] = trial
    dead = worker_of(storage, trials["dead"]._trial_id)
    dead_pid = dead.pid
    killed(dead)
    live = worker_of(storage, trials["live"]._trial_id)
    beats = optuna.storages.RDBStorage(storage, heartbeat_interval=60)
    for name in ("beating", "silent"):
        for key, value in {"worker_host": f"{name}-host", "worker_pid": 4242}.items():
            trials[name].set_user_attr(key, value)
        beats.record_heartbeat(trials[name]._trial_id)
    with sqlite3.connect(storage.removeprefix("sqlite:///")) as db:
        db.execute("UPDATE trial_heartbeats SET heartbeat = datetime('now', '-10 minutes') "
                   "WHERE trial_id = ?", (trials["silent"]._trial_id,))
    beaten = datetime.now(timezone.utc).replace(tzinfo=None, microsecond=0)
    try:
        assert main(["search", "--space", str(path), "--trials", "2",
                     "--cache-dir", "none"]) == 0
        out, err = capsys.readouterr()
        after = {t.number: t for t in optuna.load_study(study_name="tiny",
                                                        storage=storage).trials}
        number = {name: t.number for name, t in trials.items()}
        failed = after[number["dead"]]
        assert failed.state.name == "FAIL"
        assert f"host {socket.gethostname()}, pid {dead_pid}" in failed.user_attrs["error"]
        assert f"pid {dead_pid}) died" in err
        assert after[number["silent"]].state.name == "FAIL"
        assert "stopped sending heartbeats" in err
        for name in ("live", "beating"):
            assert after[number[name]].state.name == "RUNNING"  # never failed
        reruns = [t for t in after.values() if t.number > number["silent"]]
        assert sorted(t.params["algo.conv"] + t.params["compress.method"] for t in reruns
                      if t.state.name == "COMPLETE") == sorted(
            t.params["algo.conv"] + t.params["compress.method"]
            for t in (failed, after[number["silent"]]))  # both lost ones ran again, only they
        assert len(ran) == 2
        for t in reruns:  # not the dead run's worker, error or MLflow run
            assert t.user_attrs["worker_pid"] == os.getpid() and "error" not in t.user_attrs
        assert ", 2 still running)" in out and "(made with 2 trial(s) still running)" in out
        assert (f"trial {number['live']} still RUNNING (host {socket.gethostname()}, pid "
                f"{live.pid}): its worker is alive on this host") in out
        line = re.search(rf"trial {number['beating']} still RUNNING \(host beating-host, pid "
                         r"4242\): declared stale at (\S+ \S+) UTC", out)
        assert line, out
        stale = datetime.strptime(line.group(1), "%Y-%m-%d %H:%M:%S")
        assert abs(stale - (beaten + timedelta(seconds=180))) <= timedelta(seconds=5)
        front = (workdir / "tracking" / "pareto" / "tiny" / "pareto.json").read_text()
        assert '"trials_running": 2' in front
    finally:
        live.kill()
        live.wait()
