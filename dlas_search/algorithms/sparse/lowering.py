"""The sparse format in a plan: `algo.format: sparse`, the SparseLowering and its epilogues.

With the sparse format a plan puts a `SparseLowering` before the dense primitive: each conv
and linear layer (`relax.matmul` with a constant 2-D weight) whose weight has at least
`algo.threshold` zeros is stored as CSR/BSR (`algo.block`) and computed by the kernels of
kernels.py (NCHW fp32); the others go on to the dense primitive, counted as fallbacks
("sparse direct: sparsity 0.31 < 0.5"). The sparse kernel follows the dense primitive:
`im2col_gemm` -> sparse im2col, every other primitive -> sparse direct (no im2col buffer).
Winograd has no sparse form (G·g·Gᵀ fills in the zeros), so with `winograd` the pruned
layers run sparse direct and the rest Winograd; with `direct_nhwc` and `winograd_nhwc` the
sparse layers stay in NCHW and only the dense ones are converted to NHWC. Before
legalisation the lowering fuses into each sparse conv the bias add, residual add and ReLU
that follow it (`_FuseSparseEpilogues`).

The format declares its constraint beside it: only unstructured-pruned fp32 models.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ...errors import BadInput
from ..contract import (DEFAULT_BLOCK, DEFAULT_THRESHOLD, FORMATS, AlgoConfig, CannotExpress,
                        Conv, Format, Primitive, constant_array, log)
from .formats import (BlockShape, block_shape, check_dtypes, check_sparsity, constant_weight,
                      sparse_weight)
from .kernels import KERNELS, emit_conv, emit_linear, static_shape

__all__ = ["SparseLowering", "Sparse"]


class SparseLowering(Primitive):
    """Pruned constant weights as CSR/BSR, computed by the kernels of kernels.py. Goes first in
    a plan: a conv (or a linear layer: `relax.matmul` by a constant 2-D weight) whose weight is a
    float32 constant with at least `threshold` zeros is lowered to the sparse `kernel`
    ("direct" or "im2col") in NCHW; any other layer is refused with the reason, so the plan
    counts it and hands it on to the dense primitive. Keeps the totals `Plan.metrics` reports
    (layers made sparse, their bytes as sparse constants and as dense weights)."""
    ops = ("relax.nn.conv2d", "relax.matmul")
    linear_name = "sparse linear"

    def __init__(self, kernel: str = "direct", block: BlockShape = BlockShape(),
                 threshold: float = DEFAULT_THRESHOLD):
        if kernel not in KERNELS:
            raise ValueError(f"unknown sparse kernel {kernel!r}; choose from {KERNELS}")
        self.kernel, self.block, self.threshold = kernel, block, threshold
        self.name = f"sparse {kernel}"
        self.layers = self.sparse_bytes = self.dense_bytes = 0

    def claims(self, call):
        try:
            self._sparse_enough(Conv.of(call))
        except CannotExpress:
            return False
        return True

    def lower(self, bb, conv):
        weight = self._sparse_enough(conv)
        try:
            return self._counted(emit_conv(bb, conv, self.kernel, self.block), weight)
        except NotImplementedError as e:  # what the checks above missed
            raise CannotExpress(str(e)) from None

    def rewrite(self, mod, claimed=lambda call: False, lowered=None):
        """Lowers here, before legalisation, each sparse conv that a bias add, a residual add
        or a ReLU follows (each the only user of what it reads): the kernel applies them as it
        stores its output, so they cost no pass of their own (0.7 ms of a 3.6 ms resnet18
        pruned to 90%)."""
        fuse = _FuseSparseEpilogues(mod, self)
        mod = fuse.run()
        if lowered is not None and fuse.fused:
            lowered[self.name] += fuse.fused
        return mod

    def lower_fused(self, bb: relax.BlockBuilder, chain: "_EpilogueChain") -> relax.Expr | None:
        """The sparse kernel for `chain`'s conv with its epilogue, or None where it cannot."""
        conv = Conv.of(chain.conv)
        try:
            weight = self._sparse_enough(conv)
            call = emit_conv(bb, conv, self.kernel, self.block, chain.bias, chain.residual,
                             chain.relu)
        except (CannotExpress, NotImplementedError) as e:
            log.info("conv %s: epilogue not fused (%s)", conv.data_shape, e)
            return None
        return self._counted(call, weight)

    def lower_matmul(self, bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        """y = x @ W for a 2-D float32 x and a constant W [in, out] (how a torch Linear imports,
        the bias added after)."""
        x, weight = call.args
        check_dtypes(str(weight.ty.dtype), str(x.ty.dtype), str(call.ty.dtype))
        value = constant_weight(weight)
        if x.ty.ndim != 2 or value.ndim != 2:
            raise CannotExpress(f"{x.ty.ndim}-D input" if x.ty.ndim != 2 else
                                f"{value.ndim}-D weight")
        check_sparsity(value, self.threshold)
        try:
            return self._counted(emit_linear(bb, x, value.T, self.block), value)
        except NotImplementedError as e:
            raise CannotExpress(str(e)) from None

    def _sparse_enough(self, conv: Conv) -> np.ndarray:
        """The conv's weight if the sparse kernels take it, else CannotExpress saying why."""
        return sparse_weight(conv, self.threshold)

    def _counted(self, call: relax.Call, weight: np.ndarray) -> relax.Call:
        """Adds the layer to the totals: the kernel's constants (values, offsets, indptr; not
        the bias, which the dense layer has too) against the dense float32 weight."""
        constants = call.args[1].fields[1:4]
        self.layers += 1
        self.sparse_bytes += sum(c.value.numpy().nbytes for c in constants)
        self.dense_bytes += weight.nbytes
        return call

    def metrics(self) -> dict[str, float]:
        return {"sparse_layers": float(self.layers),
                "sparse_weight_bytes": float(self.sparse_bytes),
                "dense_weight_bytes": float(self.dense_bytes)}


@dataclass
class _EpilogueChain:
    """A conv and what follows it that its sparse kernel can apply: + bias, + residual, ReLU,
    in that order. `end` is the last call of the chain, whose result the kernel's replaces."""
    conv: relax.Call
    end: relax.Call
    bias: np.ndarray | None = None
    residual: relax.Expr | None = None
    relu: bool = False


def _epilogue_chains(func: relax.Function, takes: Callable[[relax.Call], bool]
                     ) -> list[_EpilogueChain]:
    """The chains conv -> [add constant bias] -> [add residual] -> [relu] in `func`'s dataflow
    blocks, for the convs `takes`, each step the only user of the previous one's result; a
    binding belongs to one chain at most."""
    if not isinstance(func.body, relax.SeqExpr):
        return []
    values, uses = {}, Counter(relax.analysis.free_vars(func.body.body))
    users = {}  # var -> (the var bound to a call reading it, that call); its last reader
    for block in func.body.blocks:
        for binding in block.bindings:
            if isinstance(binding, relax.VarBinding):
                values[binding.var] = binding.value
                for used in set(relax.analysis.free_vars(binding.value)):
                    uses[used] += 1
                    users[used] = (binding.var, binding.value)
    chains, taken = [], set()
    for var, value in values.items():
        if not (isinstance(value, relax.Call) and getattr(value.op, "name", "") ==
                "relax.nn.conv2d" and takes(value)):
            continue
        chain, cur, step = _EpilogueChain(value, value), var, 0
        out_shape = static_shape(var)
        while uses[cur] == 1 and cur in users and isinstance(users[cur][1], relax.Call) and \
                users[cur][0] not in taken:
            user_var, user = users[cur]
            op = getattr(user.op, "name", "")
            other = ([a for a in user.args if not a.same_as(cur)] or [None])[0] \
                if op == "relax.add" else None
            bias = constant_array(other) if other is not None else None
            if step < 1 and bias is not None and bias.size == out_shape[1] and \
                    bias.shape in ((1, out_shape[1], 1, 1), (out_shape[1], 1, 1)):
                chain.bias, step = bias.reshape(-1), 1
            elif step < 2 and isinstance(other, relax.Var) and \
                    tuple(getattr(other.ty, "shape", ()) or ()) == tuple(var.ty.shape):
                chain.residual, step = other, 2
            elif step < 3 and op == "relax.nn.relu":
                chain.relu, step = True, 3
            else:
                break
            chain.end, cur = user, user_var
            taken.add(user_var)
        if step:
            chains.append(chain)
    return chains


@mutator
class _FuseSparseEpilogues(PyExprMutator):
    """Replaces the last call of each epilogue chain by the fused sparse kernel (counting them
    in `fused`); the calls it covers are left unused and removed."""

    def __init__(self, mod: tvm.IRModule, lowering: "SparseLowering"):
        super().__init__(mod)
        self.mod_, self.lowering, self.chains, self.fused = mod, lowering, [], 0

    def run(self) -> tvm.IRModule:
        for gv, func in self.mod_.functions_items():
            if isinstance(func, relax.Function):
                self.chains = _epilogue_chains(func, self.lowering.claims)
                if self.chains:
                    new = relax.analysis.remove_all_unused(self.visit_expr(func))
                    self.builder_.update_func(gv, new)
        return self.builder_.get()

    def visit_call_(self, call):
        chain = next((c for c in self.chains if c.end.same_as(call)), None)
        if chain is not None:
            conv = self.builder_.normalize(relax.Call(
                chain.conv.op, [self.visit_expr(chain.conv.args[0]), chain.conv.args[1]],
                chain.conv.attrs))
            residual = None if chain.residual is None else self.visit_expr(chain.residual)
            fused = self.lowering.lower_fused(self.builder_, _EpilogueChain(
                conv, call, chain.bias, residual, chain.relu))
            if fused is not None:
                self.fused += 1
                return fused
        return super().visit_call_(call)


@FORMATS.register("sparse")
class Sparse(Format):
    """Pruned conv and linear weights as CSR/BSR through our own kernels, each applying the
    bias add, residual add and ReLU that follow its conv as it stores; denser layers stay
    dense. Only for unstructured-pruned fp32 models."""
    label = "sparse (CSR/BSR)"
    reads = ("compress.method",)  # what `infeasible` reads besides algo.format

    def lowerings(self, cfg: AlgoConfig, dense: Primitive) -> tuple[Primitive, ...]:
        """A SparseLowering with the dense primitive's sparse kernel, `algo.block` and
        `algo.threshold` (BadInput for a bad one), then the dense primitive."""
        threshold = DEFAULT_THRESHOLD if cfg.threshold is None else cfg.threshold
        if not 0.0 <= threshold <= 1.0:
            raise BadInput(f"algo.threshold: {threshold!r} is out of range; allowed: 0.0 to 1.0")
        block = block_shape(DEFAULT_BLOCK if cfg.block is None else cfg.block)
        return SparseLowering(dense.sparse_kernel, block, threshold), dense

    def infeasible(self, config: Any) -> str | None:
        """The sparse kernels store the zeros a method leaves in same-shape weights
        (unstructured pruning: the method declares `sparse`) and compute in fp32
        (`config`: the whole space.TrialConfig)."""
        from ... import compression
        method = config.compress.method
        if config.algo.format != "sparse":
            return None
        try:
            precision = compression.technique(method).precision
        except BadInput:
            return None  # an unknown method is reported as such, by the space
        sparse = compression.prunes_unstructured(method)
        if sparse and precision == "fp32":
            return None
        eligible = [name for name in compression.METHODS.names() if "+" not in name and
                    compression.prunes_unstructured(name) and
                    compression.technique(name).precision == "fp32"]
        problem = ("no unstructured pruning" if not sparse else
                   f"{precision} arithmetic; the sparse kernels are fp32")
        return (f"algo.format sparse needs an unstructured-pruned fp32 model: compress.method "
                f"{' or '.join(eligible)} (got {method}: {problem}); otherwise use algo.format "
                "dense")
