"""One trial's conv dispatcher: which lowering computes each conv, and what fell back.

`plan(cfg)` turns the trial's `algo.*` choices into a `Plan`: the data format's lowerings
(the sparse format puts a SparseLowering first) and then the dense primitive. The compiler
calls `Plan.rewrite(mod)` before legalisation and hands `Plan.legalize_map()` to LegalizeOps;
each conv goes to the first lowering that can express it, else to `direct`, and the plan
counts what lowered each conv (`lowered`) and every refusal with its reason (`fallbacks`), the
numbers a trial logs (`metrics()`). The `dense` format is registered here; `sparse` beside
its lowering (sparse/lowering.py).
"""
from __future__ import annotations

from collections import Counter

import tvm
from tvm import relax

from .contract import (FORMATS, PRIMITIVES, AlgoConfig, CannotExpress, Conv, Format, Primitive,
                       log)
from .direct import DIRECT

__all__ = ["Plan", "plan", "primitive_named", "Dense"]


class Plan:
    """How one trial lowers its convs: each conv goes to the first of `lowerings` that can
    express it (a sparse lowering goes before the dense primitive), else to `direct`; a
    lowering that refuses a conv may name primitives to try next for it (`CannotExpress.instead`).
    `lowered` counts layers per lowering name (convs, and linear layers a sparse lowering
    took: "sparse linear"); `fallbacks` counts each refusal by "<name>: <reason>" (e.g.
    "winograd: kernel 1x1", "sparse direct: sparsity 0.31 < 0.5"). A matmul no lowering takes
    gets Relax's own legalisation. The compiler calls `rewrite(mod)` before and
    `LegalizeOps(customize_legalize_map=legalize_map())` for legalisation; `metrics()` is what
    the trial logs."""

    def __init__(self, *lowerings: Primitive):
        self.lowerings = lowerings
        self.chain = lowerings + (() if DIRECT in lowerings else (DIRECT,))
        self.lowered: dict[str, int] = Counter()
        self.fallbacks: dict[str, int] = Counter()

    def rewrite(self, mod: tvm.IRModule) -> tvm.IRModule:
        for i, lowering in enumerate(self.lowerings):
            earlier = self.lowerings[:i]
            mod = lowering.rewrite(mod, claimed=lambda call: any(e.claims(call) for e in earlier),
                                   lowered=self.lowered)
        return mod

    def legalize_map(self) -> dict:
        handlers = {"relax.nn.conv2d": self.lower}
        if self._matmul_lowerings():
            handlers["relax.matmul"] = self.lower_matmul
        return handlers

    def lower(self, bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        conv = Conv.of(call)
        chain = list(self.chain)
        while chain:
            lowering = chain.pop(0)
            try:
                lowered = lowering.lower(bb, conv)
            except CannotExpress as why:
                self._refused(lowering.name, why, f"conv {conv.data_shape} "
                                                   f"{list(conv.weight_shape)}")
                chain[:0] = why.instead
                continue
            self.lowered[lowering.name] += 1
            return lowered
        return call  # not even direct: LegalizeOps leaves it and the build says why

    def lower_matmul(self, bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        for lowering in self._matmul_lowerings():
            try:
                lowered = lowering.lower_matmul(bb, call)
            except CannotExpress as why:
                self._refused(lowering.linear_name, why, f"matmul {call.ty}")
                continue
            self.lowered[lowering.linear_name] += 1
            return lowered
        return tvm.ir.Op.get("relax.matmul").get_attr("FLegalize")(bb, call)  # Relax's own

    def _matmul_lowerings(self) -> list[Primitive]:
        return [lowering for lowering in self.lowerings if "relax.matmul" in lowering.ops]

    def _refused(self, name: str, why: CannotExpress, what: str) -> None:
        reason = f"{name}: {why}"
        self.fallbacks[reason] += 1
        log.info("%s: falls back (%s)", what, reason)

    def metrics(self) -> dict[str, float]:
        """Flat numbers for MLflow: `convs_<lowering>` for every conv lowering of the plan,
        `conv_fallbacks` (refusals), `linears_sparse`, and `sparse_layers`,
        `sparse_weight_bytes`, `dense_weight_bytes` of the layers made sparse (zeros for a
        dense plan, so every trial has the same keys)."""
        linear_names = {getattr(lowering, "linear_name", None) for lowering in self.lowerings}
        metrics = {f"convs_{_metric_name(lowering.name)}": float(self.lowered[lowering.name])
                   for lowering in self.chain}
        metrics["conv_fallbacks"] = float(sum(
            count for reason, count in self.fallbacks.items()
            if reason.split(": ", 1)[0] not in linear_names))
        metrics["linears_sparse"] = float(sum(self.lowered[name] for name in linear_names
                                              if name))
        metrics.update({"sparse_layers": 0.0, "sparse_weight_bytes": 0.0,
                        "dense_weight_bytes": 0.0})
        for lowering in self.lowerings:
            for key, value in lowering.metrics().items():
                metrics[key] = metrics.get(key, 0.0) + value
        return metrics


    def revisions(self) -> dict[str, int]:
        """The revisions of its lowerings past the first (for the stage cache's key)."""
        return {p.name or type(p).__name__: p.revision for p in self.chain if p.revision > 1}


def _metric_name(name: str) -> str:
    return name.lower().replace(" ", "_")


primitive_named = PRIMITIVES.lookup  # BadInput listing the allowed names for an unknown one


@FORMATS.register("dense")
class Dense(Format):
    """Dense weights: every conv goes to the dense primitive."""
    label = "dense"

    def lowerings(self, cfg, dense):
        return (dense,)


def plan(cfg: AlgoConfig) -> Plan:
    """A fresh dispatcher for one trial (its counters start at zero): the format's lowerings
    (sparse: a SparseLowering with the dense primitive's sparse kernel, `algo.block`,
    `algo.threshold`, then the dense primitive)."""
    dense = PRIMITIVES.lookup(cfg.conv)
    return Plan(*FORMATS.lookup(cfg.format).lowerings(cfg, dense))

