"""Layer 5, systems software: a PyTorch module in, a compiled TVM Relax executable out.

torch.export -> Relax (weights as constants) -> BatchNorm folded into convs -> the algorithm
layer's rewrite and legalisation -> `tvm.compile` for the hardware layer's target.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import tvm
from tvm import relax
from tvm.relax.frontend.torch import from_exported_program

from .algorithms import Primitive

TUNERS = ("none",)


@dataclass(frozen=True)
class CompilerConfig:
    backend: str = field(default="tvm", metadata={"choices": ("tvm",)})
    tuner: str = field(default="none", metadata={"choices": TUNERS})


@dataclass
class Compiled:
    """What layer 5 gives the hardware layer."""
    executable: relax.VMExecutable
    metrics: dict[str, float]


def _count(mod: tvm.IRModule, op_name: str) -> int:
    return str(mod).count(op_name)


def import_module(module: torch.nn.Module, example: torch.Tensor) -> tvm.IRModule:
    """Export with torch.export and import into Relax with the weights as constants."""
    with torch.no_grad():
        exported = torch.export.export(module.eval(), (example,))
    return from_exported_program(exported)


def fold_batchnorm(mod: tvm.IRModule) -> tvm.IRModule:
    """Fold BatchNorm into the preceding convs; decompose any that cannot fold."""
    mod = relax.transform.FoldBatchnormToConv2D()(mod)
    mod = relax.transform.FoldConstant()(mod)
    return relax.transform.DecomposeOpsForInference()(mod)


def compile(module: torch.nn.Module, example: torch.Tensor, algo: Primitive,
            cfg: CompilerConfig, target: tvm.target.Target) -> Compiled:
    """Compile `module` for `target`, lowering convs with the primitive `algo`."""
    start = time.perf_counter()
    mod = import_module(module, example)
    batchnorms = _count(mod, "R.nn.batch_norm")
    mod = fold_batchnorm(mod)
    mod = algo.rewrite(mod)
    convs = _count(mod, "R.nn.conv2d")  # before a custom legalisation lowers them away
    custom = algo.legalize_map()
    if custom:
        mod = relax.transform.LegalizeOps(customize_legalize_map=custom)(mod)
    executable = tvm.compile(mod, target)
    return Compiled(executable, {
        "compile_s": time.perf_counter() - start,
        "batchnorm_folded": float(batchnorms),
        "conv_layers": float(convs),
    })


def max_relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    """max |ours - reference| / max |reference|: the check that compilation kept the maths."""
    return float(np.abs(ours - reference).max() / max(np.abs(reference).max(), 1e-12))
