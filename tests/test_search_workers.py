"""`dlas search --workers N`: several processes, one study, one parent run, an exact budget;
against the embedded SQLite stores and against a real PostgreSQL + MLflow tracking server."""
import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request

import optuna
import pytest
from mlflow.tracking import MlflowClient

from conftest import ROOT, TINY_SPACE, write_space
from dlas_search import tracking
from dlas_search.search import default_storage, shares

# A small CNN instead of resnet18: the tests are about processes and stores, not models.
NETS = """\
import multiprocessing
import os

from torch import nn


def small(num_classes):
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, num_classes))


def dies_in_worker_1(num_classes):
    if multiprocessing.current_process().name == "dlas-worker-1":
        os._exit(3)  # the whole worker process dies, as with an OOM kill
    return small(num_classes)
"""


def small_space(folder, arch="dlas_test_nets:small"):
    (folder / "dlas_test_nets.py").write_text(NETS)
    return write_space(folder, TINY_SPACE.replace("arch: resnet18", f"arch: {arch}"))


def dlas(argv, cwd, timeout=900):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(cwd)])}
    return subprocess.run([sys.executable, "-m", "dlas_search", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def study_runs(uri: str, experiment: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], "", max_results=1000)
    parents = [r for r in runs if r.data.tags.get(tracking.ROLE) == "study"]
    children = [r for r in runs if r.data.tags.get(tracking.ROLE) == "trial"]
    return client, parents, children


def check_one_study(storage: str, uri: str, trials: int):
    """Exactly `trials` finished trials, one MLflow run each, one parent run, FINISHED."""
    study = optuna.load_study(study_name="tiny", storage=storage)
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "FAIL")]
    assert len(finished) == trials, [t.state.name for t in study.trials]
    assert not [t for t in study.trials if t.state.name in ("RUNNING", "WAITING")]
    client, parents, children = study_runs(uri, "tiny")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.info.end_time
    assert parent.data.metrics["trials_complete"] + parent.data.metrics.get(
        "trials_failed", 0) == trials
    numbers = [int(c.data.tags[tracking.TRIAL]) for c in children]
    assert len(children) == trials and len(set(numbers)) == trials  # no duplicate runs
    assert sorted(numbers) == sorted(t.number for t in finished)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    by_id = {c.info.run_id: c for c in children}
    for t in finished:
        run = by_id[t.user_attrs["mlflow_run_id"]]  # every trial's run is in the store
        assert int(run.data.tags[tracking.TRIAL]) == t.number
        assert run.info.status == ("FINISHED" if t.state.name == "COMPLETE" else "FAILED")
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "pareto")}
    assert {"pareto/pareto.csv", "pareto/pareto.json"} <= artifacts
    return study


@pytest.mark.parametrize("trials, workers, expected", [
    (4, 2, [2, 2]), (5, 2, [3, 2]), (7, 3, [3, 2, 2]), (1, 3, [1]), (2, 1, [2])])
def test_the_budget_is_split_exactly(trials, workers, expected):
    assert shares(trials, workers) == expected
    assert sum(shares(trials, workers)) == trials


@pytest.mark.slow  # a `dlas` subprocess each (test_cli.py::test_space_show is the fast one)
@pytest.mark.parametrize("workers", ["0", "-2"])
def test_workers_must_be_positive(workdir, workers):
    path = small_space(workdir)
    out = dlas(["search", "--space", str(path), "--workers", workers], workdir)
    assert out.returncode == 2, out.stderr[-3000:]
    assert f"--workers {workers}" in out.stderr and "at least 1" in out.stderr
    assert not (workdir / "tracking").exists()  # nothing half-written


@pytest.mark.slow  # a whole study in worker subprocesses
def test_two_workers_share_one_sqlite_study(workdir, cache_dir):
    path = small_space(workdir)
    out = dlas(["search", "--space", str(path), "--workers", "2", "--trials", "3",
                "--cache-dir", str(cache_dir)], workdir)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "shares 2, 1" in out.stderr
    for worker in (0, 1):  # progress names the worker and the trial
        assert f"[worker {worker}] [trial " in out.stderr, out.stderr[-3000:]
    # 3 finished; more trials only if a sample repeated a configuration (pruned, no work)
    assert re.search(r"study tiny: \d+ trials \(3 complete, 0 failed\)", out.stdout), out.stdout
    check_one_study(default_storage(), tracking.default_tracking_uri(), 3)
    # the workers trained in parallel but never timed at once (one timing lock per device)
    _, _, children = study_runs(tracking.default_tracking_uri(), "tiny")
    phases = sorted((c.data.metrics["timing_start"], c.data.metrics["timing_end"])
                    for c in children)
    assert len(phases) == 3
    for (_, end), (start, _) in zip(phases, phases[1:]):
        assert end <= start, phases


@pytest.mark.slow  # a whole study in worker subprocesses
def test_a_dead_worker_is_reported_and_the_others_finish(workdir):
    path = small_space(workdir, arch="dlas_test_nets:dies_in_worker_1")
    out = dlas(["search", "--space", str(path), "--workers", "2", "--trials", "2",
                "--cache-dir", "none"], workdir)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "worker 1 exited with code 3" in out.stderr
    study = optuna.load_study(study_name="tiny", storage=default_storage())
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 1  # worker 0 ran its whole share
    _, parents, children = study_runs(tracking.default_tracking_uri(), "tiny")
    assert len(parents) == 1 and parents[0].info.status == "FAILED"  # closed once, by the launcher
    assert (workdir / "tracking" / "pareto" / "tiny" / "pareto.json").exists()


# --- a real PostgreSQL server and a real MLflow tracking server ---------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, what: str, seconds: float = 60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what} did not come up in {seconds:.0f} s")


def postgres_bin() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


@pytest.fixture
def postgres():
    """A throw-away PostgreSQL cluster on 127.0.0.1 with a database `optuna`; its URL."""
    psycopg2 = pytest.importorskip("psycopg2")
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) not found")
    root = tempfile.mkdtemp(prefix="dlas-pg-")  # not under pytest's 0700 tmp: postgres reads it
    os.chmod(root, 0o755)
    as_user: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root
        shutil.chown(root, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = os.path.join(root, "data"), free_port()
    subprocess.run([*as_user, f"{bindir}/initdb", "-D", data, "-U", "postgres",
                    "--auth=trust", "-E", "UTF8"], check=True, capture_output=True)
    subprocess.run([*as_user, f"{bindir}/pg_ctl", "-D", data, "-l", f"{root}/log", "-w",
                    "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"],
                   check=True, capture_output=True)
    try:
        def connect():
            return psycopg2.connect(host="127.0.0.1", port=port, user="postgres",
                                    dbname="postgres")
        wait_for(lambda: connect().close() or True, "PostgreSQL")
        conn = connect()
        conn.autocommit = True
        conn.cursor().execute("CREATE DATABASE optuna")
        conn.close()
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/optuna"
    finally:
        subprocess.run([*as_user, f"{bindir}/pg_ctl", "-D", data, "-m", "fast", "-w", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` on 127.0.0.1 that stores artifacts itself (clients upload over HTTP)."""
    port = free_port()
    log = open(tmp_path / "mlflow-server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow-server.db",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: urllib.request.urlopen(f"{url}/health", timeout=2).status == 200,
                 "mlflow server", seconds=120)
        yield url, tmp_path / "server-artifacts"
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its web workers
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


@pytest.mark.slow  # starts PostgreSQL and an mlflow server, a study in worker subprocesses
def test_two_workers_on_postgresql_and_a_tracking_server(workdir, cache_dir, postgres,
                                                         mlflow_server):
    uri, server_artifacts = mlflow_server
    path = small_space(workdir)
    out = dlas(["search", "--space", str(path), "--workers", "2", "--trials", "4",
                "--storage", postgres, "--tracking-uri", uri, "--cache-dir", str(cache_dir)],
               workdir)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[worker 0] [trial " in out.stderr and "[worker 1] [trial " in out.stderr
    study = check_one_study(postgres, uri, 4)
    assert {t.user_attrs["mlflow_run_id"] for t in study.trials
            if t.state.name == "COMPLETE"}  # ran for real
    assert not (workdir / "tracking" / "mlflow.db").exists()  # nothing went to the defaults
    assert not (workdir / "tracking" / "optuna.db").exists()
    assert list(server_artifacts.rglob("pareto.json"))  # artifacts landed on the server


# --- several launchers (machines) starting at once -----------------------------------------

RACER = """\
import os, sys, time
from dlas_search import search
url, ready, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
open(os.path.join(ready, str(os.getpid())), "w").close()
while len(os.listdir(ready)) < n:  # all start creating together
    time.sleep(0.001)
search._create_study("raced", lambda: url, ["minimize"])
"""


@pytest.mark.slow  # four racing subprocesses
def test_launchers_creating_one_new_storage_at_once_all_get_the_study(workdir):
    """Without the retry this fails ("table ... already exists" or "UNIQUE constraint failed:
    alembic_version", seen with plain optuna.create_study)."""
    (workdir / "racer.py").write_text(RACER)
    (workdir / "ready").mkdir()
    url = f"sqlite:///{workdir}/raced.db"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "racer.py", url, "ready", "4"], cwd=workdir,
                              env=env, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(errors)[-3000:]
    assert [s.study_name for s in optuna.get_all_study_summaries(url)] == ["raced"]


def test_two_launchers_creating_the_parent_run_at_once_keep_the_earliest(workdir, monkeypatch):
    uri = f"sqlite:///{workdir}/mlflow.db"
    first = tracking.Tracker(uri, "tiny")
    earliest = first.open_study({"accuracy": "maximize"}, "s.yaml", "text", {})
    time.sleep(0.01)
    second = tracking.Tracker(uri, "tiny")
    real, calls = second._first_parent, []

    def racing():  # the second launcher looked before the first had created its run
        calls.append(1)
        return None if len(calls) == 1 else real()
    monkeypatch.setattr(second, "_first_parent", racing)
    assert second.open_study({"accuracy": "maximize"}, "s.yaml", "text", {}) == earliest
    _, parents, _ = study_runs(uri, "tiny")
    assert [p.info.run_id for p in parents] == [earliest]  # the duplicate was deleted
