"""Bad input: exit status 2, a message naming the key, the bad value and what is allowed, and
nothing written (no study, no MLflow run, no tracking folder); and the `dlas` command run as a
user runs it (`python -m dlas_search ...`)."""
import json
import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from conftest import TINY_SPACE, write_space
from dlas_search.cli import main
from dlas_search.errors import BadInput
from dlas_search.space import load_space

CASES = {
    "unknown model": (("arch: resnet18", "arch: [resnet18, resnet19]"),
                      ["model.arch", "resnet19", "mobilenet_v2"]),
    "unknown dataset": (("name: digits", "name: digitz"), ["data.name", "digitz", "digits"]),
    "unknown compression": (("method: [none, unstructured]", "method: [none, prune]"),
                            ["compress.method", "prune", "unstructured"]),
    "unknown sampler": (("name: nsga2, population_size: 2", "name: anneal"),
                        ["sampler", "anneal", "tpe", "nsga2", "random"]),
    "wrong type": (("epochs: 1}", "epochs: one}"), ["model.epochs", "one", "int"]),
    "empty choices": (("conv: [direct, direct_nhwc]", "conv: []"), ["algo.conv", "empty"]),
    "unknown layer key": (("finetune: {epochs: 0}", "finetune: {epoch: 0}"),
                          ["space.finetune", "epoch", "epochs"]),
    "missing ratio": (("method: [none, unstructured]", "method: [none, unstructured, channel]"),
                      ["compress.ratio", "required", "channel"]),
    "out of range": (("amount: [0.5, 0.8]", "amount: [0.5, 1.5]"),
                     ["compress.amount", "1.5", "0.99"]),
}


def broken(workdir, case):
    (old, new), _ = CASES[case]
    assert old in TINY_SPACE
    return write_space(workdir, TINY_SPACE.replace(old, new), "bad.yaml")


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_yaml_is_named(workdir, case):
    path = broken(workdir, case)
    with pytest.raises(BadInput) as error:
        load_space(path)
    for word in CASES[case][1] + ["bad.yaml"]:
        assert word in str(error.value), (word, str(error.value))


@pytest.mark.reliability("a mistake in the space file (with no stores yet)",
                         "exit 2: the file, the key, the bad value and what is allowed",
                         kept="nothing written (no tracking folder)")
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("command", ["search", "trial"])
def test_bad_yaml_exits_2_and_writes_nothing(workdir, case, command, capsys):
    path = broken(workdir, case)
    assert main([command, "--space", str(path)]) == 2
    err = capsys.readouterr().err
    assert "error" in err and CASES[case][1][1] in err
    assert sorted(p.name for p in workdir.iterdir()) == ["bad.yaml"]


@pytest.mark.reliability("a bad command-line flag (with no stores yet)",
                         "exit 2: the flag, the bad value and what is allowed",
                         kept="nothing written (no tracking folder)")
@pytest.mark.parametrize("argv,words", [
    (["--set", "model.arch=vgg99"], ["model.arch", "vgg99", "resnet18"]),
    (["--set", "model.depth=3"], ["--set", "model.depth", "model.arch"]),
    (["--set", "noequals"], ["KEY=VALUE"]),
    (["--storage", "notaurl"], ["--storage", "notaurl"]),
    (["--tracking-uri", "ftp://x"], ["--tracking-uri", "ftp://x", "sqlite"]),
    (["--storage", "sqlite:///tiny.yaml/optuna.db"], ["--storage", "cannot create"]),
    (["--tracking-uri", "sqlite:///tiny.yaml/m.db"], ["--tracking-uri", "cannot create"]),
    (["--trials", "0"], ["--trials", "at least 1"]),
])
def test_bad_flags_exit_2_and_write_nothing(tiny_space, workdir, argv, words, capsys):
    assert main(["search", "--space", str(tiny_space), *argv]) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, (word, err)
    assert sorted(p.name for p in workdir.iterdir()) == ["tiny.yaml"]


def test_missing_space_file(workdir, capsys):
    assert main(["search", "--space", "nowhere.yaml"]) == 2
    assert "nowhere.yaml" in capsys.readouterr().err
    assert list(workdir.iterdir()) == []


@pytest.mark.reliability("dlas pareto before any study ran",
                         "exit 2: no MLflow database there yet", kept="nothing written")
def test_pareto_of_unknown_experiment(workdir, capsys):
    assert main(["pareto", "--experiment", "nope"]) == 2
    assert "no MLflow database" in capsys.readouterr().err


def test_every_subcommand_has_help():
    for argv in (["--help"], ["search", "--help"], ["trial", "--help"], ["pareto", "--help"],
                 ["targets", "--help"], ["space", "show", "--help"]):
        out = subprocess.run([sys.executable, "-m", "dlas_search", *argv], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0 and "usage: dlas" in out.stdout, argv


@pytest.mark.reliability("a dataset folder or checkpoint that is not there",
                         "exit 2 before the study starts, naming the path",
                         kept="nothing written (no tracking folder)")
@pytest.mark.parametrize("old,new,words", [
    ("name: digits,", "name: imagefolder, root: no_such_folder,", ["no_such_folder", "train"]),
    ("arch: resnet18,", "arch: resnet18, weights: missing.pt,", ["missing.pt"]),
])
@pytest.mark.parametrize("command", ["search", "trial"])
def test_missing_files_stop_before_anything_is_written(workdir, old, new, words, command,
                                                      capsys):
    """A dataset folder or checkpoint that is not there: found before the study starts."""
    assert old in TINY_SPACE
    path = write_space(workdir, TINY_SPACE.replace(old, new), "bad.yaml")
    assert main([command, "--space", str(path)]) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, (word, err)
    assert sorted(p.name for p in workdir.iterdir()) == ["bad.yaml"]


def run(argv, cwd, env=None, timeout=900):
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.mark.slow  # a whole trial in a `dlas` subprocess
def test_trial_json_prints_exactly_one_object(tiny_space, workdir, cache_dir):
    out = run([sys.executable, "-m", "dlas_search", "trial", "--space", str(tiny_space),
               "--set", "compress.method=unstructured", "--set", "compress.amount=0.8",
               "--cache-dir", str(cache_dir), "--json"], cwd=workdir)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)  # the whole of stdout is one JSON object
    assert set(result) == {"params", "metrics", "status", "run_id"}
    assert result["status"] == "FINISHED"
    assert result["params"]["compress.amount"] == 0.8
    assert result["metrics"]["sparsity"] == pytest.approx(0.8, abs=0.005)
    client = MlflowClient(f"sqlite:///{workdir}/tracking/mlflow.db")
    logged = client.get_run(result["run_id"])
    assert logged.info.status == "FINISHED"
    assert logged.data.params["compress.amount"] == "0.8"
    assert logged.data.metrics["latency_ms"] == pytest.approx(result["metrics"]["latency_ms"])


def test_space_show(tiny_space, workdir):
    out = run([sys.executable, "-m", "dlas_search", "space", "show", str(tiny_space)], workdir)
    assert out.returncode == 0
    assert "compress" in out.stdout and "amount: one of 0.5, 0.8 when compress.method" in \
        out.stdout
    assert "size: 6" in out.stdout  # (none + 2 amounts) x 2 conv algorithms
