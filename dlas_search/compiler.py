"""Layer 5, systems software: a PyTorch module in, a compiled TVM Relax executable out.

torch.export -> Relax (weights as constants; int8 convs and matmuls as integer arithmetic) ->
fp16 mixed precision if asked -> BatchNorm folded into convs -> the algorithm layer's rewrite and
legalisation -> MetaSchedule tuning if asked (tuning.py) -> `tvm.compile` for the hardware
layer's target. `compiler.backend: torch` skips all of it: PyTorch eager runs the model, timed
under the same protocol, so a search can find where TVM does not pay.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import tvm
from tvm import relax
from tvm.relax.frontend.torch import from_exported_program

from . import hardware, lowering, tuning
from .algorithms import Plan, Primitive, schedules
from .errors import BadInput
from .faults import layer
from .registry import Registry

__all__ = ["BACKENDS", "TUNERS", "DEFAULT_TRIALS", "DEFAULT_DATABASE", "CompilerConfig",
           "Compiled", "save", "load", "check", "compile", "imported", "import_module",
           "fold_batchnorm", "exportable", "max_relative_error", "LIBRARY", "INFO", "RECORDS"]

BACKENDS = Registry("compiler.backend", "compiler backend")
TUNERS = Registry("compiler.tuner", "tuner")
DEFAULT_TRIALS = 200
DEFAULT_DATABASE = "tracking/tuning"


def _eager_runs_locally(config) -> str | None:
    """PyTorch eager (`compiler.backend: torch`) runs in this process, on the local CPU."""
    try:
        device = config.target().device
    except BadInput:
        return None  # an unknown target is reported as such, by the hardware check
    if hardware.DEVICES.attr(device, "eager", False):  # the device kind says
        return None
    return (f"compiler.backend torch runs PyTorch eager on the local CPU only; hw.target "
            f"{config.hw.target} is a {device} device (use compiler.backend tvm there)")


BACKENDS.register("tvm", "Apache TVM: torch.export -> Relax -> tvm.compile",
                  label="tvm")
BACKENDS.register("torch", "PyTorch eager, timed under the same protocol (layers 4-5 unused)",
                  label="eager", infeasible=_eager_runs_locally, reads=("hw.target",))
TUNERS.register("none", "TVM's default lowering (plain loops)", label="untuned")
TUNERS.register("metaschedule", "MetaSchedule-tuned schedules (records kept in a database)",
                label="tuned", settings=("trials", "database", "cold_weights", "transfer"))


@dataclass(frozen=True)
class CompilerConfig:
    backend: str = field(default="tvm", metadata={"choices": BACKENDS})
    # `none`: TVM's default lowering (plain loops); `metaschedule`: tuned schedules.
    tuner: str = field(default="none", metadata={"choices": TUNERS})
    # MetaSchedule's measurement budget for the model's tasks not yet in the database.
    trials: int | None = field(default=None, metadata={
        "min": 1, "max": 1_000_000, "when": {"compiler.tuner": ("metaschedule",)},
        "unset": DEFAULT_TRIALS})
    # Tuning database folder (one subfolder per target); unset: tracking/tuning.
    database: str | None = field(default=None, metadata={
        "when": {"compiler.tuner": ("metaschedule",)}, "unset": DEFAULT_DATABASE})
    # Measure tuning candidates with their weights evicted from the caches (as in a whole
    # model whose weights exceed the last-level cache); records kept apart. Unset: false.
    cold_weights: bool | None = field(default=None, metadata={
        "when": {"compiler.tuner": ("metaschedule",)}, "unset": False})
    # Tasks left without a record try the schedules of similar tuned tasks (other shapes of
    # the same operators), kept where faster than the default lowering (tuning's `transfer`).
    # Unset: true. Added after stores existed: keys a stage only when set ("keyed_if_set").
    transfer: bool | None = field(default=None, metadata={
        "when": {"compiler.tuner": ("metaschedule",)}, "unset": True, "keyed_if_set": True})


@dataclass
class Compiled:
    """What layer 5 gives the hardware layer."""
    executable: relax.VMExecutable
    metrics: dict[str, float]
    # dtypes of the compiled conv and matmul kernels, e.g. {"conv2d": {"uint8xint8->int32"}}
    arithmetic: dict[str, set[str]] = field(default_factory=dict)
    tuning: tuning.TuningReport | None = None
    # the compiled module as a shared library on disk, when one exists (a stage cache entry)
    library: Path | None = None


LIBRARY, INFO, RECORDS = "model.so", "compiled.pt", "tuning"


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def save(built: Compiled, folder: Path, records: Path | None = None) -> None:
    """Store a build as files: the library (`export_library`), what the build reported, and
    the tuning records it used; `load` reads them back."""
    built.executable.export_library(str(folder / LIBRARY))
    torch.save({"metrics": built.metrics, "arithmetic": built.arithmetic,
                "tuning": built.tuning, "sha256": _sha256(folder / LIBRARY)}, folder / INFO)
    if records is not None and records.is_dir():
        shutil.copytree(records, folder / RECORDS)


def load(folder: Path) -> Compiled:
    """A build stored by `save`: the library loaded back into a Relax VM executable. The
    library's hash is checked first: loading a truncated library can crash the process."""
    info = torch.load(folder / INFO, weights_only=False)
    if _sha256(folder / LIBRARY) != info["sha256"]:
        raise ValueError(f"{folder / LIBRARY}: not the library that was stored")
    executable = relax.VMExecutable(tvm.runtime.load_module(str(folder / LIBRARY)))
    return Compiled(executable, dict(info["metrics"]), info["arithmetic"], info["tuning"],
                    library=folder / LIBRARY)


def check(cfg: CompilerConfig) -> None:
    """Checks that need no work: a tuning database must be a folder this user can write."""
    if cfg.tuner != "metaschedule":
        return
    path = Path(cfg.database or DEFAULT_DATABASE)
    if path.exists() and not path.is_dir():
        raise BadInput(f"compiler.database: {path} is not a folder; give a folder (it holds a "
                       "JSON database per target), e.g. tracking/tuning")
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if not os.access(existing, os.W_OK):
        raise BadInput(f"compiler.database: cannot write in {existing}; give a writable folder")


def _count(mod: tvm.IRModule, op_name: str) -> int:
    return str(mod).count(op_name)


def exportable(module: torch.nn.Module) -> torch.nn.Module:
    """The form of `module` that torch.export takes: wrappers whose PyTorch form TVM cannot
    import (half precision, a quantised graph) give their own (already in inference form)."""
    return module.for_export() if hasattr(module, "for_export") else module.eval()


def import_module(module: torch.nn.Module, example: torch.Tensor,
                  precision: str = "fp32") -> tvm.IRModule:
    """Export with torch.export and import into Relax with the weights as constants, keeping
    the int8 arithmetic of a quantised model (see lowering.py); fp16 comes later, after
    BatchNorm folding, so the folded weights are rounded once."""
    if precision not in lowering.PRECISIONS:
        raise ValueError(f"precision {precision!r}; allowed: {', '.join(lowering.PRECISIONS)}")
    module = exportable(module)
    if precision == "int8":
        lowering.register_quantized_ops()
    with torch.no_grad():
        exported = torch.export.export(module, (example,))
    mod = from_exported_program(exported, custom_convert_map=lowering.INT8_CONVERTERS)
    return relax.transform.DeadCodeElimination()(mod)  # the weights' unused dequantise ops


def fold_batchnorm(mod: tvm.IRModule) -> tvm.IRModule:
    """Fold BatchNorm into the preceding convs; decompose any that cannot fold."""
    mod = lowering.fold_constants(relax.transform.FoldBatchnormToConv2D()(mod))
    return relax.transform.DecomposeOpsForInference()(mod)


_IMPORTS: OrderedDict = OrderedDict()  # model key -> (Relax module, BatchNorms folded)
_KEEP_IMPORTS = 2


def imported(module: torch.nn.Module, example: torch.Tensor, precision: str,
             model_key: str | None) -> tuple[tvm.IRModule, int]:
    """The model in Relax with BatchNorm folded (and in fp16 if asked), and how many
    BatchNorms were folded. torch.export and the import are most of an untuned compile (6 of
    10 s for mobilenet_v2); a worker's next trials often compile the same model with other
    layer 4-6 settings, so the last few imports are kept in memory (IRModules are immutable)."""
    key = model_key and f"{model_key}|{precision}|{tuple(example.shape)}|{example.dtype}"
    if key in _IMPORTS:
        _IMPORTS.move_to_end(key)
        return _IMPORTS[key]
    mod = import_module(module, example, precision)
    batchnorms = _count(mod, "R.nn.batch_norm")
    mod = fold_batchnorm(mod)
    if precision == "fp16":
        mod = lowering.fold_constants(lowering.to_fp16(mod))
    if key:
        _IMPORTS[key] = (mod, batchnorms)
        while len(_IMPORTS) > _KEEP_IMPORTS:
            _IMPORTS.popitem(last=False)
    return mod, batchnorms


def compile(module: torch.nn.Module, example: torch.Tensor, algo: Plan | Primitive,
            cfg: CompilerConfig, target: tvm.target.Target, precision: str = "fp32",
            records_to: Path | None = None,
            measure_on: tuple[str, int, str] | None = None,
            model_key: str | None = None, extend_tuning: bool = False) -> Compiled:
    """Compile `module` for `target` in `precision`, lowering convs with `algo` (a primitive
    or a Plan) and tuning with `cfg.tuner`; `records_to` receives the tuning records used;
    `measure_on` (tracker host, port, device key) has MetaSchedule measure on that device;
    `model_key` (a hash of the model's weights and structure) lets a later compile of the same
    model, with other algorithms or for another target, reuse its import; `extend_tuning`
    spends `cfg.trials` on tasks already in the database too. `cfg.trials` 0 (possible here,
    not in a space) tunes nothing: the tasks without a record only get transferred schedules."""
    start = time.perf_counter()
    algo = algo if isinstance(algo, Plan) else Plan(algo)  # a bare primitive: a one-off plan
    mod, batchnorms = imported(module, example, precision, model_key)
    convs = _count(mod, "R.nn.conv2d")  # before the sparse kernels and legalisation take them
    # the sparse kernels (some emitted by the rewrite) read the vector width from the target;
    # primitives may lower differently for a well-tuned build (algorithms.tuning_budget)
    trials = DEFAULT_TRIALS if cfg.trials is None else cfg.trials  # 0: reuse records only
    budget = trials / max(convs, 1) if cfg.tuner != "none" else 0.0
    with target, schedules(budget):
        mod = algo.rewrite(mod)
        mod = relax.transform.LegalizeOps(
            customize_legalize_map=algo.legalize_map() or None)(mod)
    dtypes = lowering.arithmetic_dtypes(mod)  # of the TIR kernels tvm.compile builds
    report = None
    if cfg.tuner == "metaschedule":
        threads = int(target.attrs.get("num-cores", 1))
        with layer("tune"):
            mod, report = tuning.tune(mod, target, trials, cfg.database or DEFAULT_DATABASE,
                                      threads=threads, export_to=records_to, rpc=measure_on,
                                      extend=extend_tuning,
                                      cold_weights=bool(cfg.cold_weights),
                                      transfer=cfg.transfer is not False)
    elif target.kind.name == "cuda":  # a GPU kernel needs a thread binding even untuned
        from tvm.s_tir import dlight
        with target:
            mod = dlight.ApplyDefaultSchedule(dlight.gpu.Fallback())(mod)
    executable = tvm.compile(mod, target)
    metrics = {"compile_s": time.perf_counter() - start,
               "batchnorm_folded": float(batchnorms), "conv_layers": float(convs),
               **algo.metrics(),
               **(report.metrics() if report else {})}
    return Compiled(executable, metrics, dtypes, report)


def max_relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    """max |ours - reference| / max |reference|: the check that compilation kept the maths."""
    return float(np.abs(ours - reference).max() / max(np.abs(reference).max(), 1e-12))
