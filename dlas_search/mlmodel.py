"""Every finished trial as MLflow Models: what a user deploys, loads or registers.

Each finished trial logs MLflow 3 LoggedModels linked to its run, with the trial's metrics
(linked to the model and the dataset) and the validation split as dataset input (name,
digest, source; also the run's input):

- `compiled` (trials compiled for the local CPU; tag `dlas.model_id`): a pyfunc
  (tvm_pyfunc.py, copied into the model) whose `predict` runs the compiled library the trial
  timed, with its input and output signature and an input example. The library is stored
  once, here.
- `pytorch` (tag `dlas.pytorch_model_id`): the compressed PyTorch model (fp32, pruned, fp16,
  or int8's quantised graph) saved with torch.export, its weights once, at the precision it
  computes in; `mlflow.pytorch.load_model` gives it back without the code that built it.

    model_id = log_compiled(tracking_uri, run_id, Path("model/model.so"), deploy)
    mlflow.pyfunc.load_model(f"models:/{model_id}").predict(images)

`artifacts: {model: false}` in the space turns both off (the library then stays in `model/`,
the weights in `model/weights.pt`).
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["MODEL_ID", "PYTORCH_MODEL_ID", "NAME", "PYTORCH", "REQUIREMENTS", "log_compiled",
           "save_pytorch", "log_saved", "link_metrics", "library_of", "model_uri", "using",
           "in_run"]

MODEL_ID = "dlas.model_id"  # the run's tag: its compiled model
PYTORCH_MODEL_ID = "dlas.pytorch_model_id"  # the run's tag: its PyTorch model
NAME = "compiled"  # not `model`: the run's artifact folder of that name
PYTORCH = "pytorch"
# what loading the model needs: TVM's runtime (as the library was built with), numpy, MLflow
REQUIREMENTS = ["apache-tvm==0.27.0.post1", "apache-tvm-ffi==0.1.14.post0", "numpy>=1.26"]
PYFUNC = Path(__file__).with_name("tvm_pyfunc.py")


def model_uri(model_id: str) -> str:
    return f"models:/{model_id}"


@contextlib.contextmanager
def using(tracking_uri: str):
    """MLflow's fluent API (which LoggedModels and the registry need) pointed at
    `tracking_uri` for a `with` block; what was set before is restored after, the variable
    MLFLOW_TRACKING_URI included (MLflow's own restore unsets it, and under `mlflow run` it
    names the launcher's store)."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    environment = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with _use_tracking_uri(tracking_uri):
            yield
    finally:
        if environment is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = environment


@contextlib.contextmanager
def in_run(tracking_uri: str, run_id: str):
    """The trial's run `run_id` as MLflow's active run, in its store, for a `with` block (a
    model logged there links to it). Under `mlflow run`, MLFLOW_RUN_ID names the launcher's
    run: set aside meanwhile, so that nothing lands there."""
    import mlflow
    launcher = os.environ.pop("MLFLOW_RUN_ID", None)
    try:
        with using(tracking_uri), mlflow.start_run(run_id=run_id):
            yield
    finally:
        if launcher is not None:
            os.environ["MLFLOW_RUN_ID"] = launcher


def _dataset(deploy: dict):
    """The validation split as an MLflow dataset (a MetaDataset: no data copied)."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.filesystem_dataset_source import FileSystemDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    info = deploy["dataset"]
    source = FileSystemDatasetSource(info["source"]) if info["source"].startswith("/") else \
        CodeDatasetSource({"mlflow.source.name": info["source"]})
    return MetaDataset(source, name=info["name"], digest=info["digest"])


def log_compiled(tracking_uri: str, run_id: str, library: Path, deploy: dict) -> str:
    """Log the compiled `library` of run `run_id` as its MLflow Model; its id. `deploy`:
    what stages.py recorded (input shape, classes, precision, example, dataset). Log it
    before the run's metrics (MLflow links a run's metrics to a model logged after them,
    without their dataset): link_metrics logs them once per model."""
    import mlflow
    from mlflow.entities import LoggedModelInput
    from mlflow.models import infer_signature

    folder = Path(tempfile.mkdtemp(prefix="dlas-mlmodel-"))
    meta = folder / "meta.json"
    meta.write_text(json.dumps({k: deploy[k] for k in ("input_shape", "classes", "precision",
                                                      "target", "preprocessing")}, indent=1))
    example = np.asarray(deploy["example"], dtype=np.float32)
    signature = infer_signature(example, np.zeros((1, deploy["classes"]), np.float32))
    try:
        with in_run(tracking_uri, run_id):
            info = mlflow.pyfunc.log_model(
                name=NAME, python_model=str(PYFUNC),
                artifacts={"library": str(library), "meta": str(meta)},
                signature=signature, input_example=example, pip_requirements=REQUIREMENTS,
                metadata={"dlas.precision": deploy["precision"],
                          "dlas.target": deploy["target"]})
            mlflow.log_input(_dataset(deploy), context="validation",
                             model=LoggedModelInput(info.model_id))
            mlflow.set_tag(MODEL_ID, info.model_id)
        return info.model_id
    finally:
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()


def save_pytorch(module, example, folder: Path) -> Path:
    """Save the compressed PyTorch model as an MLflow Model in `folder` (torch.export's pt2:
    the graph and its weights, no pickled code); int8's quantised module gives its exported
    graph. Done where the module is (a trial's child process, say); log_saved logs it."""
    import mlflow
    import torch
    program = getattr(module, "program", None)  # compression.Quantized: the exported graph
    # two images: MLflow exports a batch of one with the batch size fixed at 1
    mlflow.pytorch.save_model(program.module() if program is not None else module.eval(),
                              str(folder), input_example=torch.cat([example, example]).numpy(),
                              serialization_format="pt2",
                              pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
    return folder


def log_saved(tracking_uri: str, run_id: str, folder: Path, deploy: dict,
              name: str = PYTORCH) -> str:
    """Log the MLflow Model saved in `folder` as run `run_id`'s LoggedModel `name`, with the
    run's dataset; its id (also the run's tag PYTORCH_MODEL_ID)."""
    import mlflow
    from mlflow.entities import LoggedModelInput, LoggedModelOutput
    from mlflow.tracking import MlflowClient
    with in_run(tracking_uri, run_id):
        model = mlflow.initialize_logged_model(
            name=name, source_run_id=run_id, model_type=name,
            tags={"dlas.precision": deploy.get("precision", "")})
        client = MlflowClient(tracking_uri)
        client.log_model_artifacts(model.model_id, str(folder))
        mlflow.finalize_logged_model(model.model_id, "READY")
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, 0)])
        if "dataset" in deploy:
            mlflow.log_input(_dataset(deploy), context="validation",
                             model=LoggedModelInput(model.model_id))
        mlflow.set_tag(PYTORCH_MODEL_ID, model.model_id)
    return model.model_id


def link_metrics(client, run_id: str, metrics: list, model_ids: list[str],
                 deploy: dict) -> None:
    """Log the run's metrics (mlflow.entities.Metric) once per model, linked to it and to
    the validation split: what the model's page lists and the run's metrics are."""
    from mlflow.entities import Metric
    dataset = deploy.get("dataset") or {}
    linked = [Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id,
                     dataset_name=dataset.get("name"), dataset_digest=dataset.get("digest"))
              for model_id in model_ids for m in metrics]
    for start in range(0, len(linked), 1000):  # MLflow's batch limit
        client.log_batch(run_id, metrics=linked[start:start + 1000])


def library_of(client, run, folder: Path) -> Path | None:
    """The compiled library run `run` kept: its model's (`dlas.model_id`) or, for a run
    without one, `model/model.so`; downloaded into `folder`; None if it kept neither."""
    model_id = run.data.tags.get(MODEL_ID)
    if model_id:
        import mlflow
        location = client.get_logged_model(model_id).artifact_location
        return Path(mlflow.artifacts.download_artifacts(
            artifact_uri=f"{location}/artifacts/model.so", dst_path=str(folder)))
    kept = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    if "model/model.so" not in kept:
        return None
    return Path(client.download_artifacts(run.info.run_id, "model/model.so", str(folder)))
