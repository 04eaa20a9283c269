"""Layer 4, algorithms and data formats: how each convolution is computed.

A primitive is a small class registered by the name the YAML uses (`algo.conv`). It rewrites
the imported Relax module before legalisation (a layout change) and/or supplies a custom
legalisation for `relax.nn.conv2d` (a different TOPI compute). `algo.format` names the weight
format; this release computes dense weights only.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import tvm
from tvm import relax

PRIMITIVES: dict[str, "Primitive"] = {}
FORMATS = ("dense",)


def primitive(name: str):
    def register(cls):
        PRIMITIVES[name] = cls()
        return cls
    return register


@dataclass(frozen=True)
class AlgoConfig:
    conv: str = field(default="direct", metadata={"choices": PRIMITIVES})
    format: str = field(default="dense", metadata={"choices": FORMATS})


class Primitive:
    """Contract for a conv primitive: `rewrite` runs on the imported module (weights are
    constants, so weight transforms fold away); `legalize_map` overrides TOPI lowering."""

    def rewrite(self, mod: tvm.IRModule) -> tvm.IRModule:
        return mod

    def legalize_map(self) -> dict:
        return {}


@primitive("direct")
class DirectNCHW(Primitive):
    """Direct convolution in NCHW, TOPI's default lowering of `relax.nn.conv2d`."""


@primitive("direct_nhwc")
class DirectNHWC(Primitive):
    """Direct convolution in NHWC (channels innermost, OHWI weights): vectorises along C."""

    def rewrite(self, mod):
        mod = relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "OHWI"]})(mod)
        return relax.transform.FoldConstant()(mod)


def plan(cfg: AlgoConfig) -> Primitive:
    """The primitive that lowers every conv of the trial."""
    return PRIMITIVES[cfg.conv]
