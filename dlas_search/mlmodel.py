"""Every finished trial as an MLflow Model: what a user deploys, loads or registers.

A trial compiled for the local CPU logs an MLflow 3 LoggedModel `compiled` linked to its run: a
pyfunc (tvm_pyfunc.py, copied into the model) whose `predict` runs the compiled library the
trial timed, with its input and output signature and an input example; the validation split
as the run's and the model's dataset input (name, digest, source); the trial's metrics linked
to the model and that dataset. The library is stored once, in the model (the run's `model/`
folder keeps the PyTorch weights); the run's tag `dlas.model_id` names the model.

    model_id = log_compiled(tracking_uri, run_id, Path("model/model.so"), deploy, metrics)
    mlflow.pyfunc.load_model(f"models:/{model_id}").predict(images)

`artifacts: {model: false}` in the space turns it off (the library then stays in `model/`).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["MODEL_ID", "NAME", "REQUIREMENTS", "log_compiled", "library_of", "model_uri",
           "using"]

MODEL_ID = "dlas.model_id"  # the run's tag: its logged model
NAME = "compiled"  # not `model`: the run's artifact folder of that name (weights.pt)
# what loading the model needs: TVM's runtime (as the library was built with), numpy, MLflow
REQUIREMENTS = ["apache-tvm==0.27.0.post1", "apache-tvm-ffi==0.1.14.post0", "numpy>=1.26"]
PYFUNC = Path(__file__).with_name("tvm_pyfunc.py")


def model_uri(model_id: str) -> str:
    return f"models:/{model_id}"


def using(tracking_uri: str):
    """MLflow's fluent API (which LoggedModels and the registry need) pointed at
    `tracking_uri` for a `with` block; what was set before is restored after."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    return _use_tracking_uri(tracking_uri)


def _dataset(deploy: dict):
    """The validation split as an MLflow dataset (a MetaDataset: no data copied)."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.filesystem_dataset_source import FileSystemDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    info = deploy["dataset"]
    source = FileSystemDatasetSource(info["source"]) if info["source"].startswith("/") else \
        CodeDatasetSource({"mlflow.source.name": info["source"]})
    return MetaDataset(source, name=info["name"], digest=info["digest"])


def log_compiled(tracking_uri: str, run_id: str, library: Path, deploy: dict,
                 metrics: dict[str, float]) -> str:
    """Log the compiled `library` of run `run_id` as its MLflow Model; its id. `deploy`:
    what stages.py recorded (input shape, classes, precision, example, dataset)."""
    import mlflow
    from mlflow.entities import LoggedModelInput
    from mlflow.models import infer_signature

    folder = Path(tempfile.mkdtemp(prefix="dlas-mlmodel-"))
    meta = folder / "meta.json"
    meta.write_text(json.dumps({k: deploy[k] for k in ("input_shape", "classes", "precision",
                                                      "target", "preprocessing")}, indent=1))
    example = np.asarray(deploy["example"], dtype=np.float32)
    signature = infer_signature(example, np.zeros((1, deploy["classes"]), np.float32))
    launcher = os.environ.pop("MLFLOW_RUN_ID", None)  # under `mlflow run`: not that run
    try:
        with using(tracking_uri), mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=NAME, python_model=str(PYFUNC),
                artifacts={"library": str(library), "meta": str(meta)},
                signature=signature, input_example=example, pip_requirements=REQUIREMENTS,
                metadata={"dlas.precision": deploy["precision"],
                          "dlas.target": deploy["target"]})
            dataset = _dataset(deploy)
            mlflow.log_input(dataset, context="validation",
                             model=LoggedModelInput(info.model_id))
            mlflow.log_metrics({k: float(v) for k, v in metrics.items()
                                if v is not None and np.isfinite(v)},
                               model_id=info.model_id, dataset=dataset)
            mlflow.set_tag(MODEL_ID, info.model_id)
        return info.model_id
    finally:
        if launcher is not None:
            os.environ["MLFLOW_RUN_ID"] = launcher
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()


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
