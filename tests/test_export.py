"""`dlas export`: pick rules against a front, and the deployable folder of a trial (the
library, the MLflow Model, weights, configuration, a predict script that runs), registered
in the MLflow Model Registry on request."""
import json
import subprocess
import sys

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from dlas_search import data, export, mlmodel, tracking
from dlas_search.cli import main
from dlas_search.errors import BadInput
from dlas_search.pareto import Trials

OBJECTIVES = {"accuracy": "maximize", "latency_ms": "minimize", "size_mb": "minimize"}


def front_of(points: dict[str, tuple]) -> Trials:
    rows = [{"trial": i, "run_id": f"r{i}", "name": name, "params": {},
             "metrics": dict(zip(OBJECTIVES, values))}
            for i, (name, values) in enumerate(points.items())]
    return Trials("hand", OBJECTIVES, rows, {"accuracy": {"min": 0.5}})


TRIALS = front_of({"fast": (0.90, 1.0, 11.0), "accurate": (0.97, 4.0, 11.0),
                   "small": (0.93, 3.0, 2.8), "dominated": (0.91, 5.0, 12.0),
                   "broken": (0.10, 0.5, 1.0)})  # below the floor: never picked


@pytest.mark.parametrize("rule,expected", [
    ("accuracy>=0.92, min latency_ms", "small"),
    ("min latency_ms", "fast"),                   # not "broken": infeasible
    ("max accuracy", "accurate"),
    ("size_mb<5", "small"),                        # the first objective's direction: max acc
    ("accuracy > 0.9,latency_ms<=4, min size_mb", "small"),
    ("latency_ms<=4.5", "accurate")])
def test_a_pick_takes_the_best_front_trial_that_meets_the_rules(rule, expected):
    assert export.pick(TRIALS, export.parse_pick(rule))["name"] == expected


def test_a_pick_never_takes_a_dominated_trial():
    with pytest.raises(BadInput, match="no trial on the front of hand meets it; the front: "
                                       "fast: accuracy 0.9"):
        export.pick(TRIALS, export.parse_pick("latency_ms>4.5"))  # only "dominated" does


@pytest.mark.parametrize("rule,words", [
    ("accuracy=>0.9", "cannot read 'accuracy=>0.9'; allowed: METRIC>=NUMBER"),
    ("min latency_ms, max accuracy", "more than one goal"),
    ("", "--pick: empty"),
    ("top1>=0.9", "no metric 'top1' on the front of hand; allowed: accuracy, latency_ms")])
def test_bad_pick_rules_are_named(rule, words):
    with pytest.raises(BadInput, match=words.replace("(", r"\(")):
        export.pick(TRIALS, export.parse_pick(rule))


@pytest.mark.reliability("dlas export of an unknown run, the study's own run, a trial with no "
                         "MLflow Model, and --pick without --experiment",
                         "exit 2, naming the run or the flag and what is needed",
                         kept="no folder under --out, no staging folder left")
def test_export_refuses_bad_runs_and_writes_nothing(workdir, capsys):
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    tracker = tracking.Tracker(uri, "bare")
    tracker.open_study(OBJECTIVES, "space.yaml", "study: bare\n", {})
    run_id = tracker.start_trial(0, "resnet18", {"model.arch": "resnet18"})
    tracker.finish_trial(run_id, {"accuracy": 0.9}, {})  # no model: a remote target, say
    for args, words in ((["--run", "nope"], "no such run"),
                        (["--run", tracker.parent_id], "not a finished dlas-search trial"),
                        (["--run", run_id], "logged no MLflow Model"),
                        (["--pick", "min latency_ms"], "--pick needs --experiment")):
        assert main(["export", *args, "--out", str(workdir / "out"),
                     "--tracking-uri", uri]) == 2
        assert words in capsys.readouterr().err
        assert not (workdir / "out").exists() and not (workdir / "out.partial").exists()


@pytest.mark.slow
@pytest.mark.xdist_group("compiled_study")
def test_the_exported_folder_runs_and_is_registered(compiled_study, tmp_path, capsys):
    """The front's most accurate trial, picked by rule, exported and registered: its
    predict.py (TVM and numpy only) gives the classes the MLflow pyfunc gives."""
    uri = compiled_study["uri"]
    out = tmp_path / "deploy"
    assert main(["export", "--experiment", "compiled", "--pick", "max accuracy",
                 "--out", str(out), "--tracking-uri", uri, "--register", "compiled-best"]) == 0
    said = capsys.readouterr().out
    assert "picked " in said and "registered in the MLflow Model Registry as compiled-best " \
        "version 1" in said
    assert {"model.so", "meta.json", "example.npy", "predict.py", "config.json",
            "metrics.json", "mlflow_model", "pytorch_model"} <= {p.name for p in out.iterdir()}
    import torch
    module = torch.export.load(str(out / "pytorch_model" / "data" / "model.pt2")).module()
    config = json.loads((out / "config.json").read_text())
    assert config["layers"]["model"]["arch"] == "resnet18"
    metrics = json.loads((out / "metrics.json").read_text())
    run = MlflowClient(uri).get_run(config["run_id"])
    assert metrics["accuracy"] == run.data.metrics["accuracy"]
    assert config["model_id"] == run.data.tags[mlmodel.MODEL_ID]

    defaults = compiled_study["space"].defaults()
    images = next(iter(data.load(defaults.data, defaults.seed).val))[0][:3].numpy()
    np.save(tmp_path / "images.npy", images)
    ran = subprocess.run([sys.executable, str(out / "predict.py"), str(tmp_path / "images.npy")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert ran.returncode == 0, ran.stderr[-2000:]
    with mlmodel.using(uri):
        expected = mlflow.pyfunc.load_model(str(out / "mlflow_model")).predict(images)
        version = MlflowClient(uri).get_model_version("compiled-best", "1")
    assert [int(line) for line in ran.stdout.split()] == list(expected.argmax(1))
    with torch.no_grad():  # the PyTorch model agrees on these inputs' classes too
        agree = (module(torch.from_numpy(images)).argmax(1).numpy() == expected.argmax(1))
    assert agree.all()
    assert version.run_id == config["run_id"] or version.model_id == config["model_id"]
    # the same folder again: refused, the first export untouched
    assert main(["export", "--run", config["run_id"], "--out", str(out),
                 "--tracking-uri", uri]) == 2
    assert "not empty" in capsys.readouterr().err and (out / "model.so").is_file()
