"""Every finished trial as an MLflow Model (mlmodel.py, tvm_pyfunc.py): the pyfunc runs the
compiled library and reproduces the trial's accuracy (fp32 and int8), carries its signature,
input example, metrics and dataset, and `mlflow models serve` answers with it."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from dlas_search import data, mlmodel, tracking

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("compiled_study")]


def trial_runs(study: dict) -> dict[str, object]:
    """compress.method -> the trial's run."""
    client = MlflowClient(study["uri"])
    experiment = client.get_experiment_by_name("compiled").experiment_id
    runs = client.search_runs([experiment], f"tags.`{tracking.ROLE}` = 'trial'")
    return {run.data.params["compress.method"]: run for run in runs}


def validation(study: dict) -> tuple[np.ndarray, np.ndarray]:
    config = study["space"].defaults()
    loaded = data.load(config.data, config.seed)
    images, labels = zip(*[(x.numpy(), y.numpy()) for x, y in loaded.val])
    return np.concatenate(images), np.concatenate(labels)


@pytest.mark.parametrize("method", ["none", "int8"])
def test_the_pyfunc_reproduces_the_trials_accuracy(compiled_study, method):
    run = trial_runs(compiled_study)[method]
    model_id = run.data.tags[mlmodel.MODEL_ID]
    mlflow.set_tracking_uri(compiled_study["uri"])
    try:
        model = mlflow.pyfunc.load_model(mlmodel.model_uri(model_id))
        images, labels = validation(compiled_study)
        scores = model.predict(images)
        logged = mlflow.get_logged_model(model_id)
    finally:
        mlflow.set_tracking_uri(None)
    assert scores.shape == (len(labels), 10) and scores.dtype == np.float32
    accuracy = float((scores.argmax(1) == labels).mean())
    assert accuracy == pytest.approx(run.data.metrics["accuracy"], abs=0.02)
    assert accuracy > 0.3  # it learned: the comparison means something (chance is 0.1)
    # the model: linked to its run, its metrics, the signature and an input example
    assert logged.source_run_id == run.info.run_id and logged.name == mlmodel.NAME
    metrics = {m.key: m for m in logged.metrics}
    assert metrics["accuracy"].value == run.data.metrics["accuracy"]
    assert metrics["accuracy"].dataset_name == "digits 16px validation"
    signature = model.metadata.signature
    assert json.loads(signature.inputs.to_json())[0]["tensor-spec"]["shape"] == [-1, 3, 16, 16]
    assert model.metadata.metadata["dlas.precision"] == method.replace("none", "fp32")
    # the library is stored once: in the model, not again in the run's model/ folder
    assert "model" not in {a.path for a in MlflowClient(compiled_study["uri"]).list_artifacts(
        run.info.run_id)}
    # the run's dataset input: the validation split, named, with a digest and a source
    inputs = MlflowClient(compiled_study["uri"]).get_run(run.info.run_id).inputs
    dataset = inputs.dataset_inputs[0].dataset
    assert dataset.name == "digits 16px validation" and len(dataset.digest) == 16
    assert "sklearn.datasets.load_digits" in dataset.source
    assert model_id in [m.model_id for m in inputs.model_inputs]  # and the PyTorch model


@pytest.mark.parametrize("method", ["none", "int8"])
def test_the_pytorch_model_reproduces_the_accuracy_with_its_weights_once(compiled_study,
                                                                          method):
    """The LoggedModel `pytorch` (torch.export): loaded without dlas-search's code, it gives
    the trial's accuracy; its weights are stored once, at the precision it computes in (int8:
    about size_mb, not the fp32 and int8 copies the quantiser leaves)."""
    run = trial_runs(compiled_study)[method]
    model_id = run.data.tags[mlmodel.PYTORCH_MODEL_ID]
    with mlmodel.using(compiled_study["uri"]):
        module = mlflow.pytorch.load_model(mlmodel.model_uri(model_id))
        logged = mlflow.get_logged_model(model_id)
        folder = mlflow.artifacts.download_artifacts(logged.artifact_location)
    images, labels = validation(compiled_study)
    with torch.no_grad():
        predicted = torch.cat([module(torch.from_numpy(images[i:i + 64])).argmax(1)
                               for i in range(0, len(images), 64)]).numpy()
    assert float((predicted == labels).mean()) == pytest.approx(run.data.metrics["accuracy"],
                                                                abs=0.005)
    assert logged.name == "pytorch" and logged.source_run_id == run.info.run_id
    assert {m.key for m in logged.metrics} >= {"accuracy", "latency_ms", "size_mb"}
    stored_mb = sum(p.stat().st_size for p in Path(folder).rglob("*.pt2")) / 2 ** 20
    assert stored_mb == pytest.approx(run.data.metrics["size_mb"], rel=0.1)


def test_one_image_and_a_wrong_shape(compiled_study):
    run = trial_runs(compiled_study)["none"]
    mlflow.set_tracking_uri(compiled_study["uri"])
    try:
        model = mlflow.pyfunc.load_model(mlmodel.model_uri(run.data.tags[mlmodel.MODEL_ID]))
    finally:
        mlflow.set_tracking_uri(None)
    images, _ = validation(compiled_study)
    assert np.allclose(model.predict(images[:1]), model.predict(images[:3])[:1], atol=1e-5)
    with pytest.raises(Exception, match=r"expected shape \(-1, 3, 16, 16\)"):  # the signature
        model.predict(np.zeros((2, 3, 8, 8), np.float32))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_models_serve_answers_on_localhost(compiled_study, tmp_path):
    """`mlflow models serve` (local environment) on 127.0.0.1: a request with two validation
    images gets the compiled model's scores back; the server is stopped by the test."""
    run = trial_runs(compiled_study)["int8"]
    uri = mlmodel.model_uri(run.data.tags[mlmodel.MODEL_ID])
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": compiled_study["uri"]}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port), "-w", "1"], env=env, cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        images, _ = validation(compiled_study)
        body = json.dumps({"inputs": images[:2].tolist()}).encode()
        deadline, answer = time.monotonic() + 120, None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/invocations", data=body,
                    headers={"Content-Type": "application/json"})
                answer = json.loads(urllib.request.urlopen(request, timeout=30).read())
                break
            except OSError:
                time.sleep(1)
        assert answer is not None, server.communicate(timeout=5)[0][-3000:] \
            if server.poll() is not None else "no answer in 120 s"
        scores = np.array(answer["predictions"], dtype=np.float32)
        mlflow.set_tracking_uri(compiled_study["uri"])
        try:
            expected = mlflow.pyfunc.load_model(uri).predict(images[:2])
        finally:
            mlflow.set_tracking_uri(None)
        assert scores.shape == (2, 10) and np.allclose(scores, expected, atol=1e-4)
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


def test_each_metric_is_linked_once_to_each_model(compiled_study):
    """The run's metrics, once per model (MLflow links a run's earlier metrics to a model
    logged after them: the models are logged first), each with the validation split."""
    run = trial_runs(compiled_study)["none"]
    client = MlflowClient(compiled_study["uri"])
    assert len(client.get_metric_history(run.info.run_id, "accuracy")) == 1  # the run: once
    models = {run.data.tags[mlmodel.MODEL_ID], run.data.tags[mlmodel.PYTORCH_MODEL_ID]}
    with mlmodel.using(compiled_study["uri"]):
        for model_id in models:
            metrics = mlflow.get_logged_model(model_id).metrics
            keys = [m.key for m in metrics]
            assert len(keys) == len(set(keys)) and "accuracy" in keys  # each model: once
            assert {m.dataset_name for m in metrics} == {"digits 16px validation"}


def test_using_a_store_restores_the_environment(monkeypatch, tmp_path):
    """Under `mlflow run`, MLFLOW_TRACKING_URI names the launcher's store: logging a model into
    the study's store must leave it as it was (MLflow's own restore unsets it)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///launcher.db")
    with mlmodel.using(f"sqlite:///{tmp_path}/study.db"):
        assert mlflow.get_tracking_uri().endswith("study.db")
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:///launcher.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with mlmodel.using(f"sqlite:///{tmp_path}/study.db"):
        pass
    assert "MLFLOW_TRACKING_URI" not in os.environ
