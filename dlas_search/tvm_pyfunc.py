"""The MLflow pyfunc of a trial's compiled model: `predict` runs the TVM library the trial
built and timed (`model.so`) on this machine's CPU with TVM's runtime.

MLflow copies this file into every logged model ("models from code"), so a model loads with
`mlflow.pyfunc.load_model(uri)` where only numpy, TVM and MLflow are installed (dlas-search
itself is not needed). Its artifacts: `library` (model.so) and `meta` (meta.json: the input
shape the library was compiled for, the class count, the precision, the preprocessing).

    model = mlflow.pyfunc.load_model("models:/m-...")
    logits = model.predict(images)   # float32 NCHW (n, C, H, W), normalised like the dataset
"""
from __future__ import annotations

import json

import mlflow
import numpy as np

__all__ = ["CompiledClassifier"]


class CompiledClassifier(mlflow.pyfunc.PythonModel):
    """Images in, class scores out, through the compiled library (batch size as compiled: a
    larger input is run in slices, the last one padded)."""

    def load_context(self, context) -> None:
        import tvm
        from tvm import relax
        with open(context.artifacts["meta"]) as f:
            self.meta = json.load(f)
        self.device = tvm.cpu()
        executable = relax.VMExecutable(tvm.runtime.load_module(context.artifacts["library"]))
        self.vm = relax.VirtualMachine(executable, self.device)
        self.shape = tuple(self.meta["input_shape"])

    def predict(self, context, model_input, params=None) -> np.ndarray:
        import tvm
        x = np.asarray(getattr(model_input, "values", model_input), dtype=np.float32)
        if x.shape[1:] != self.shape[1:]:
            try:
                x = x.reshape((-1, *self.shape[1:]))
            except ValueError:
                raise ValueError(f"input of shape {x.shape}: this model takes float32 images "
                                 f"of shape (n, {', '.join(map(str, self.shape[1:]))}) "
                                 "(NCHW, normalised like its dataset)") from None
        batch, out = self.shape[0], []
        for start in range(0, len(x), batch):
            chunk = x[start:start + batch]
            padded = np.concatenate([chunk, np.zeros((batch - len(chunk), *chunk.shape[1:]),
                                                     np.float32)]) if len(chunk) < batch else chunk
            result = self.vm["main"](tvm.runtime.tensor(np.ascontiguousarray(padded),
                                                        self.device))
            while not hasattr(result, "numpy"):  # the importer returns a tuple of outputs
                result = result[0]
            out.append(result.numpy()[:len(chunk)].astype(np.float32))
        return np.concatenate(out) if out else np.zeros((0, self.meta["classes"]), np.float32)


mlflow.models.set_model(CompiledClassifier())
