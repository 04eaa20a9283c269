"""Bad input against stores that already hold a study: exit status 2, one message naming the
file, the key and what is allowed, and the Optuna and MLflow stores exactly as they were.

Every test here is listed in docs/reliability.md (tools/reliability_table.py): its id says what
was tried, the message the command printed is recorded, and the docstring says what is kept."""
from __future__ import annotations

import hashlib
import os
import shutil
import socket
import sqlite3
from pathlib import Path

import optuna
import pytest
import torch

from conftest import TINY_SPACE, write_space
from dlas_search import tracking
from dlas_search.cli import main


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


@pytest.fixture(scope="session")
def stores_template(tmp_path_factory) -> Path:
    """tracking/ as a finished study leaves it: Optuna's database with the study `tiny` (one
    complete trial) and `other` (two objectives), MLflow's database with the study's parent
    run, a trial run and their artifact folder."""
    root = tmp_path_factory.mktemp("stores")
    (root / "tracking").mkdir()
    storage = f"sqlite:///{root / 'tracking' / 'optuna.db'}"
    study = optuna.create_study(study_name="tiny", storage=storage,
                                directions=["maximize", "minimize", "minimize"])
    study.add_trial(optuna.trial.create_trial(
        params={"compress.method": "none"}, values=[0.9, 5.0, 40.0],
        distributions={"compress.method": optuna.distributions.CategoricalDistribution(
            ["none", "unstructured"])}))
    optuna.create_study(study_name="other", storage=storage, directions=["maximize", "minimize"])
    tracker = tracking.Tracker(f"sqlite:///{root / 'tracking' / 'mlflow.db'}", "tiny")
    tracker.open_study({"accuracy": "maximize"}, "tiny.yaml", TINY_SPACE, {})
    run_id = tracker.start_trial(0, "resnet18 none", {"compress.method": "none"})
    tracker.finish_trial(run_id, {"accuracy": 0.9}, {}, {})
    tracker.close_study("FINISHED")
    return root / "tracking"


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder`: a SQLite database by its rows (a dump), others by hash."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_dir():
            continue
        name = str(path.relative_to(folder))
        if path.suffix == ".db":
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
                out[name] = "\n".join(db.iterdump())
        else:
            out[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture
def stores(workdir, stores_template) -> Path:
    shutil.copytree(stores_template, workdir / "tracking")
    return workdir / "tracking"


@pytest.fixture
def refused(workdir, stores, capsys, record_property):
    """Run `dlas ARGS`; assert exit 2, the words in the message, the stores unchanged and no
    other file made; record the message (as the user saw it) for the reliability table."""
    def run(argv: list[str], words: list[str]) -> str:
        before, files = snapshot(stores), sorted(os.listdir(workdir))
        assert main(argv) == 2
        err = capsys.readouterr().err
        message = err.strip().splitlines()[-1].replace(f"{workdir}/", "")
        record_property("reliability.message", message)
        for word in words:
            assert word in err, (word, err)
        assert snapshot(stores) == before
        assert sorted(os.listdir(workdir)) == files
        return err
    return run


def space(workdir, old: str = "", new: str = "", extra: str = "") -> str:
    assert old in TINY_SPACE
    return str(write_space(workdir, TINY_SPACE.replace(old, new) + extra, "bad.yaml"))


# id -> (old text of the tiny space, new text, words the message must hold)
YAML_CASES = {
    "malformed YAML": ("model: {arch: resnet18, epochs: 1}", "model: {arch: resnet18, epochs: 1",
                       ["bad.yaml", "line", "not valid YAML"]),
    "unknown top-level key": ("objectives:", "objective:",
                              ["bad.yaml", "objective", "did you mean 'objectives'"]),
    "unknown parameter": ("finetune: {epochs: 0}", "finetune: {epoch: 0}",
                          ["space.finetune", "'epoch'", "did you mean 'epochs'"]),
    "unknown layer": ("finetune: {epochs: 0}", "fintune: {epochs: 0}",
                      ["bad.yaml: space", "'fintune'", "did you mean 'finetune'", "algo"]),
    "unknown value": ("arch: resnet18,", "arch: resnt18,",
                      ["model.arch", "'resnt18'", "did you mean 'resnet18'"]),
    "unknown objective": ("accuracy: maximize", "acuracy: maximize",
                          ["objectives", "did you mean 'accuracy'", "latency_ms"]),
    "wrong type": ("epochs: 1}", "epochs: one}", ["space.model.epochs", "'one'", "expected int"]),
    "empty choices": ("conv: [direct, direct_nhwc]", "conv: []",
                      ["space.algo.conv", "empty", "at least one"]),
    "reversed range": ("amount: [0.5, 0.8]", "amount: {low: 0.9, high: 0.5}",
                       ["space.compress.amount", "low 0.9 is greater than high 0.5"]),
    "condition on an unknown parameter": (
        "arch: resnet18,", "arch: resnet18, stem: {choices: [cifar], when: {model.archh: "
        "resnet18}},", ["space.model.stem.when", "model.archh", "did you mean 'model.arch'"]),
    "out of range value": ("amount: [0.5, 0.8]", "amount: [0.5, 1.5]",
                           ["compress.amount", "1.5", "0.99"]),
    "constraint rules out the whole space": (
        "method: [none, unstructured]\n    amount: [0.5, 0.8]\n  finetune: {epochs: 0}\n"
        "  algo: {conv: [direct, direct_nhwc]}",
        "method: none\n  finetune: {epochs: 0}\n  algo: {conv: direct, format: sparse}",
        ["bad.yaml", "rule out every configuration", "algo.format sparse", "dense"]),
    "unknown sampler": ("name: nsga2,", "name: nsga,",
                        ["bad.yaml: sampler", "'nsga'", "did you mean 'nsga2'", "tpe"]),
    "negative trial budget": ("trials: 2", "trials: -3",
                              ["bad.yaml: budget.trials", "-3", "positive integer"]),
    "negative timeout": ("trials: 2", "trials: 2, timeout_s: -1",
                         ["budget.timeout_s", "positive number"]),
    "thresholds min above max": ("", "", ["thresholds.latency_ms", "above max"]),
    "missing dataset folder": ("name: digits,", "name: imagefolder, root: no_such_folder,",
                               ["data.root", "no_such_folder", "train"]),
    "missing checkpoint": ("arch: resnet18,", "arch: resnet18, weights: missing.pt,",
                           ["model.weights", "missing.pt", "random, imagenet"]),
}
EXTRA = {"thresholds min above max": "thresholds: {latency_ms: {min: 5, max: 1}}\n"}


@pytest.mark.parametrize("case", list(YAML_CASES))
def test_bad_space_file(workdir, refused, case):
    """exit 2 and a message naming the file, the key path and what is allowed

    Optuna and MLflow databases row for row as before, artifacts unchanged, no file made."""
    old, new, words = YAML_CASES[case]
    refused(["search", "--space", space(workdir, old, new, EXTRA.get(case, ""))], words)


FLAG_CASES = {
    "unreachable storage": (lambda: ["--storage", "postgresql://127.0.0.1:1/x"],
                            ["--storage", "cannot connect", "127.0.0.1", "refused"]),
    "unreachable tracking server": (lambda: ["--tracking-uri", f"http://127.0.0.1:{closed_port()}"],
                                    ["--tracking-uri", "no tracking server answers",
                                     "sqlite:///"]),
    "unreachable tracking database": (
        lambda: ["--tracking-uri", f"postgresql://u@127.0.0.1:{closed_port()}/mlflow"],
        ["--tracking-uri", "cannot connect", "refused"]),
    "negative --trials": (lambda: ["--trials", "-1"], ["--trials -1", "at least 1"]),
    "study exists with other objectives": (
        lambda: ["--study", "other"],
        ["study 'other' already exists", "['maximize', 'minimize']", "another --study"]),
    "unknown --set key": (lambda: ["--set", "model.archh=resnet18"],
                          ["--set", "model.archh", "did you mean 'model.arch'"]),
    "unknown target": (lambda: ["--set", "hw.target=locall"],
                       ["hw.target", "locall", "local", "rpc://HOST:PORT/KEY"]),
}


@pytest.mark.parametrize("case", list(FLAG_CASES))
def test_bad_flag(tiny_space, refused, case):
    """exit 2 before the study opens, a message naming the flag and what is allowed

    Optuna and MLflow databases row for row as before, artifacts unchanged, no file made."""
    argv, words = FLAG_CASES[case]
    refused(["search", "--space", str(tiny_space), *argv()], words)


@pytest.mark.parametrize("command", ["trial", "pareto"])
def test_unreachable_tracking_server_for_other_commands(tiny_space, refused, command):
    """exit 2: no tracking server answers at --tracking-uri

    Optuna and MLflow databases row for row as before, no file made."""
    target = ["--space", str(tiny_space)] if command == "trial" else ["--experiment", "tiny"]
    refused([command, *target, "--tracking-uri", f"http://127.0.0.1:{closed_port()}"],
            ["--tracking-uri", "no tracking server answers"])


def test_missing_space_file(workdir, refused):
    """exit 2: the space file cannot be read (and why)

    Stores unchanged, no file made."""
    refused(["search", "--space", "nowhere.yaml"], ["nowhere.yaml", "cannot read",
                                                    "No such file"])


def test_non_utf8_space_file(workdir, refused):
    """exit 2: the file is not UTF-8 text, with the offending byte and its offset

    Stores unchanged, no file made."""
    path = workdir / "latin1.yaml"
    path.write_bytes(TINY_SPACE.replace("study: tiny", "study: caf\xe9").encode("latin-1"))
    refused(["search", "--space", str(path)], ["latin1.yaml", "not UTF-8", "0xe9", "offset 10"])


def test_huge_space_file(workdir, refused):
    """exit 2 without reading it: a 50 MB space file is over the 1 MB limit

    Stores unchanged, no file made."""
    path = workdir / "huge.yaml"
    line = "# " + "x" * 98 + "\n"
    path.write_text(TINY_SPACE + line * 500_000)
    assert path.stat().st_size > 50_000_000
    refused(["search", "--space", str(path)], ["huge.yaml", "50.5 MB", "at most 1 MB"])


def test_huge_target_registry(workdir, refused):
    """exit 2: a targets: file over the size limit is named as such

    Stores unchanged, no file made."""
    (workdir / "boards.yaml").write_text("targets: {}\n" + "#\n" * 600_000)
    path = space(workdir, extra="targets: boards.yaml\n")
    refused(["search", "--space", path], ["targets", "boards.yaml", "at most 1 MB"])


def test_yaml_python_tag_is_refused_not_run(workdir, refused):
    """exit 2: a `!!python/...` tag is refused (YAML is safe-loaded); its code never runs

    Stores unchanged, the command in the tag did not run (no file made)."""
    path = space(workdir, "seed: 0", 'seed: !!python/object/apply:os.system ["touch pwned"]')
    refused(["search", "--space", path], ["bad.yaml", "line 2", "python/object/apply:os.system",
                                          "only plain YAML"])
    assert not (workdir / "pwned").exists()


def test_corrupt_checkpoint(workdir, refused):
    """exit 2 before the study: the checkpoint is not loadable, and what is allowed

    Stores unchanged, no file made."""
    (workdir / "broken.pt").write_bytes(b"\x80\x04 not a checkpoint" * 10)
    refused(["search", "--space", space(workdir, "arch: resnet18,",
                                        "arch: resnet18, weights: broken.pt,")],
            ["model.weights", "broken.pt", "not a loadable checkpoint", "Unsupported operand",
             "weights_only=True"])


class _Payload:
    """Pickles as a call to os.system: loading it unsafely would run the command."""
    def __reduce__(self):
        return os.system, ("touch pwned",)


def test_checkpoint_with_code_is_refused_not_run(workdir, refused):
    """exit 2: a checkpoint that pickles code is refused (weights_only=True); the code never runs

    Stores unchanged, the command in the pickle did not run (no file made)."""
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}, "hook": _Payload()},
               workdir / "evil.pt")
    refused(["search", "--space", space(workdir, "arch: resnet18,",
                                        "arch: resnet18, weights: evil.pt,")],
            ["model.weights", "evil.pt", "not a loadable checkpoint",
             "unsupported GLOBAL posix.system"])
    assert not (workdir / "pwned").exists()


def test_mismatched_checkpoint_fails_each_trial_alone(workdir, stores, cache_dir, capsys,
                                                      record_property):
    """each trial fails: "checkpoint other.pt does not match resnet18", naming the layers

    The study goes on and finishes; the earlier trial and runs are kept; each failed trial's
    MLflow run is FAILED with the reason."""
    state = torch.nn.Linear(3, 2).state_dict()  # a checkpoint of another model
    torch.save(state, workdir / "other.pt")
    path = space(workdir, "arch: resnet18,", "arch: resnet18, weights: other.pt,")
    before = snapshot(stores)
    assert main(["search", "--space", path, "--trials", "2", "--cache-dir", str(cache_dir)]) == 0
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{stores / 'optuna.db'}")
    first, *new = study.trials
    assert first.state.name == "COMPLETE" and first.values == [0.9, 5.0, 40.0]
    assert new and all(t.state.name == "FAIL" for t in new)
    for trial in new:
        assert "checkpoint" in trial.user_attrs["error"]
        assert "does not match resnet18" in trial.user_attrs["error"]
    record_property("reliability.message", new[0].user_attrs["error"].strip().splitlines()[-1]
                    .replace(f"{workdir}/", ""))
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{stores / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    statuses = sorted(r.info.status for r in runs if r.data.tags.get(tracking.ROLE) == "trial")
    assert statuses.count("FINISHED") == 1 and statuses.count("FAILED") == len(new)
    assert set(before) <= set(snapshot(stores))  # nothing removed


def test_tracking_uri_of_a_server_that_is_not_mlflow(tiny_space, refused):
    """exit 2: the server at --tracking-uri answers but is not an MLflow tracking server

    Optuna and MLflow databases row for row as before, no file made."""
    import http.server
    import threading
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        refused(["search", "--space", str(tiny_space), "--tracking-uri",
                 f"http://127.0.0.1:{server.server_port}"],
                ["--tracking-uri", "not an MLflow tracking server", "HTTP 404"])
    finally:
        server.shutdown()
        server.server_close()

