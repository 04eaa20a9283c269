"""`dlas export`: from a study's front to a folder someone can deploy.

    dlas export --run RUN_ID --out deploy/
    dlas export --experiment quickstart --pick "accuracy>=0.9, min latency_ms" --out deploy/
    dlas export ... --register quickstart-best      # also into the MLflow Model Registry

The folder: `model.so` (the compiled library the trial timed), `meta.json` (input shape,
classes, precision, target, preprocessing), `example.npy` (one input), `predict.py` (runs
the library with TVM's runtime and numpy alone), `config.json` (the trial's whole
configuration, by layer), `metrics.json`, `tuning/` (the MetaSchedule records its schedules
came from, for a tuned trial), `mlflow_model/` (the compiled MLflow Model, for `mlflow models
serve -m mlflow_model`) and `pytorch_model/` (the PyTorch model as an MLflow Model;
`torch.export.load("pytorch_model/data/model.pt2").module()` without MLflow), or
`weights.pt` for a run that kept a state_dict instead.

A pick is a comma-separated list of conditions on metrics (`accuracy>=0.9`, `size_mb<20`) and
at most one goal (`min latency_ms` or `max accuracy`; default: the first objective's
direction), applied to the experiment's Pareto front (pareto.py): the front, not every trial,
so the pick is never dominated.
"""
from __future__ import annotations

import json
import operator
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BadInput

__all__ = ["Pick", "parse_pick", "pick", "export_run", "PREDICT"]

OPERATORS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt,
             "==": operator.eq}
_CONDITION = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(>=|<=|==|>|<)\s*([-+0-9.eE]+)\s*$")
_GOAL = re.compile(r"^\s*(min|max)\s+([A-Za-z_][\w.]*)\s*$")


@dataclass
class Pick:
    """Conditions (metric, operator, bound) and a goal (min|max, metric)."""
    conditions: list[tuple[str, str, float]] = field(default_factory=list)
    goal: tuple[str, str] | None = None

    def __str__(self) -> str:
        parts = [f"{m}{op}{bound:g}" for m, op, bound in self.conditions]
        return ", ".join(parts + ([f"{self.goal[0]} {self.goal[1]}"] if self.goal else []))


def parse_pick(text: str) -> Pick:
    """`"accuracy>=0.9, min latency_ms"` -> Pick; BadInput naming the part it cannot read."""
    out = Pick()
    for part in (p for p in text.split(",") if p.strip()):
        if (found := _CONDITION.match(part)):
            out.conditions.append((found[1], found[2], float(found[3])))
        elif (found := _GOAL.match(part)):
            if out.goal:
                raise BadInput(f"--pick {text!r}: more than one goal ({part.strip()!r}); give "
                               "one 'min METRIC' or 'max METRIC'")
            out.goal = (found[1], found[2])
        else:
            raise BadInput(f"--pick {text!r}: cannot read {part.strip()!r}; allowed: "
                           "METRIC>=NUMBER (or <=, >, <, ==) and one 'min METRIC' or "
                           "'max METRIC', comma-separated, e.g. 'accuracy>=0.9, min latency_ms'")
    if not out.conditions and not out.goal:
        raise BadInput("--pick: empty; e.g. 'accuracy>=0.9, min latency_ms'")
    return out


def pick(trials, rule: Pick) -> dict:
    """The front row `rule` picks (pareto.Trials); BadInput listing the front if none fits."""
    front = trials.front()
    known = set(trials.objectives) | {k for row in front for k in row["metrics"]}
    for metric in [m for m, _, _ in rule.conditions] + ([rule.goal[1]] if rule.goal else []):
        if metric not in known:
            raise BadInput(f"--pick: no metric {metric!r} on the front of {trials.study}; "
                           f"allowed: {', '.join(sorted(known))}")
    if not front:
        raise BadInput(f"--pick: the study {trials.study} has no feasible trial on its front")
    fits = [row for row in front if all(
        m in row["metrics"] and OPERATORS[op](row["metrics"][m], bound)
        for m, op, bound in rule.conditions)]
    if not fits:
        shown = "; ".join(f"{row['name']}: " + ", ".join(
            f"{m} {row['metrics'][m]:.4g}" for m in trials.objectives) for row in front)
        raise BadInput(f"--pick {str(rule)!r}: no trial on the front of {trials.study} meets "
                       f"it; the front: {shown}")
    direction, metric = rule.goal or (trials.objectives[next(iter(trials.objectives))][:3],
                                      next(iter(trials.objectives)))
    choose = max if direction == "max" else min
    return choose(fits, key=lambda row: row["metrics"].get(metric, float("nan")))


PREDICT = '''\
"""Run the compiled model on images: python predict.py [images.npy]  (default: example.npy).
Needs numpy and TVM's runtime (pip install apache-tvm==0.27.0.post1); prints each image's
predicted class. Input: float32 NCHW, normalised as meta.json's preprocessing says."""
import json
import sys
from pathlib import Path

import numpy as np
import tvm
from tvm import relax

here = Path(__file__).resolve().parent
meta = json.loads((here / "meta.json").read_text())
images = np.load(sys.argv[1] if len(sys.argv) > 1 else here / "example.npy").astype(np.float32)
images = images.reshape((-1, *meta["input_shape"][1:]))
vm = relax.VirtualMachine(relax.VMExecutable(tvm.runtime.load_module(str(here / "model.so"))),
                          tvm.cpu())
batch = meta["input_shape"][0]
for start in range(0, len(images), batch):
    chunk = images[start:start + batch]
    padded = np.zeros((batch, *chunk.shape[1:]), np.float32)
    padded[:len(chunk)] = chunk
    out = vm["main"](tvm.runtime.tensor(padded, tvm.cpu()))
    while not hasattr(out, "numpy"):
        out = out[0]
    for scores in out.numpy()[:len(chunk)]:
        print(int(scores.argmax()))
'''


def export_run(tracking_uri: str, run_id: str, out: Path, register: str | None = None) -> dict:
    """Write run `run_id`'s deployable folder into `out` (it must not exist or be empty);
    what was written and, with `register`, the registered model version."""
    import mlflow
    import numpy as np
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from . import mlmodel
    from .tracking import ROLE
    client = MlflowClient(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise BadInput(f"--run {run_id!r}: no such run at {tracking_uri}") from None
    if run.data.tags.get(ROLE) != "trial" or run.info.status != "FINISHED":
        raise BadInput(f"--run {run_id!r}: not a finished dlas-search trial (role "
                       f"{run.data.tags.get(ROLE)!r}, status {run.info.status})")
    model_id = run.data.tags.get(mlmodel.MODEL_ID)
    if not model_id:
        raise BadInput(f"--run {run_id!r}: the trial logged no MLflow Model (a remote target, "
                       "or artifacts: {model: false} / {library: false}): nothing to deploy")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise BadInput(f"--out {out}: not empty; give a new folder")
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        got = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=client.get_logged_model(model_id).artifact_location,
            dst_path=str(staging / "download")))
        model_dir = staging / "mlflow_model"  # the folder that holds MLmodel
        shutil.move(got, model_dir)
        shutil.rmtree(staging / "download", ignore_errors=True)
        shutil.copyfile(model_dir / "artifacts" / "model.so", staging / "model.so")
        shutil.copyfile(model_dir / "artifacts" / "meta.json", staging / "meta.json")
        from mlflow.models import Model
        example = Model.load(str(model_dir)).load_input_example(str(model_dir))
        np.save(staging / "example.npy", np.asarray(example, np.float32))
        (staging / "predict.py").write_text(PREDICT)
        params = dict(run.data.params)
        by_layer: dict[str, dict] = {}
        for key, value in sorted(params.items()):
            layer, _, name = key.partition(".")
            by_layer.setdefault(layer, {})[name] = value
        (staging / "config.json").write_text(json.dumps(
            {"run_id": run_id, "name": run.info.run_name, "model_id": model_id,
             "layers": by_layer}, indent=2))
        (staging / "metrics.json").write_text(json.dumps(run.data.metrics, indent=2,
                                                         sort_keys=True))
        pytorch = run.data.tags.get(mlmodel.PYTORCH_MODEL_ID)
        if pytorch:  # the PyTorch model (torch.export's model.pt2 inside)
            got = Path(mlflow.artifacts.download_artifacts(
                artifact_uri=client.get_logged_model(pytorch).artifact_location,
                dst_path=str(staging / "download")))
            shutil.move(got, staging / "pytorch_model")
            shutil.rmtree(staging / "download", ignore_errors=True)
        kept = {a.path for a in client.list_artifacts(run_id)}
        if "model" in kept and "model/weights.pt" in {
                a.path for a in client.list_artifacts(run_id, "model")}:
            got = Path(client.download_artifacts(run_id, "model/weights.pt", str(staging)))
            if got != staging / "weights.pt":
                shutil.move(got, staging / "weights.pt")
                shutil.rmtree(staging / "model", ignore_errors=True)
        if "tuning" in kept:
            client.download_artifacts(run_id, "tuning", str(staging))
        version = None
        if register:
            with mlmodel.using(tracking_uri):
                version = mlflow.register_model(mlmodel.model_uri(model_id), register)
        if out.exists():
            out.rmdir()
        staging.rename(out)  # all or nothing: no half-written folder under --out
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"folder": out, "files": sorted(p.name for p in out.iterdir()),
            "registered": f"{register} version {version.version}" if version else None}
