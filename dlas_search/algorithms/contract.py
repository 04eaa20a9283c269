"""What every conv algorithm of layer 4 agrees on: the names a space may choose, one conv.

- the registries of `algo.conv` (PRIMITIVES), `algo.format` (FORMATS) and `algo.block`
  (BLOCKS): each choice registers itself where it is defined (direct.py, winograd.py, ...,
  sparse/), and `AlgoConfig` offers exactly the registered names;
- `Conv`: the one description of a `relax.nn.conv2d` call (shapes, attributes, dtypes as plain
  Python values), read by the dense primitives, the sparse eligibility check and the sparse
  kernels alike;
- `Primitive`, the interface a conv algorithm implements, `CannotExpress`, how it refuses a
  conv, and `Format`, what a data format entry provides;
- `transform_weight`: weight transforms (packing, G·g·Gᵀ, reshapes) evaluated at compile time.

Kept apart from the algorithms so that each of them, and the plan that dispatches to them,
depends on this file only (no import cycles, one place to read the rules).
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import tvm
import tvm_ffi
from tvm import relax, te, topi

from ..registry import Registry

__all__ = ["schedules", "tuning_budget", "PRIMITIVES", "FORMATS", "BLOCKS", "DEFAULT_BLOCK", "DEFAULT_THRESHOLD", "AlgoConfig",
           "CannotExpress", "Conv", "Primitive", "Format", "transform_weight", "pad",
           "constant_array", "log"]

# the plan's and the sparse lowering's log ("winograd: kernel 1x1" fallbacks, unfused epilogues)
log = logging.getLogger("dlas_search.algorithms")

PRIMITIVES = Registry("algo.conv", "conv primitive", instantiate=True)
FORMATS = Registry("algo.format", "data format", instantiate=True)
# BSR block shapes, rows x columns of the [out, in*kh*kw] weight matrix (sparse/formats.py)
BLOCKS = Registry("algo.block", "sparse block shape")
DEFAULT_BLOCK, DEFAULT_THRESHOLD = "1x1", 0.5


@dataclass(frozen=True)
class AlgoConfig:
    conv: str = field(default="direct", metadata={"choices": PRIMITIVES})
    format: str = field(default="dense", metadata={"choices": FORMATS})
    # CSR (1x1) or BSR block of the sparse weights (sparse format only; unset: 1x1).
    block: str | None = field(default=None, metadata={
        "choices": BLOCKS, "when": {"algo.format": ("sparse",)}, "unset": DEFAULT_BLOCK})
    # Least fraction of zero weights for a layer to go sparse; denser layers stay dense
    # (sparse format only; unset: 0.5).
    threshold: float | None = field(default=None, metadata={
        "min": 0.0, "max": 1.0, "when": {"algo.format": ("sparse",)},
        "unset": DEFAULT_THRESHOLD})


class CannotExpress(Exception):
    """A primitive has no algorithm for this conv; the message is the short reason that the
    plan counts (e.g. "kernel 1x1") before it falls back. `instead`: primitives the plan tries
    next for this conv, before the rest of its chain (a primitive's own choice of fallback)."""

    def __init__(self, reason: str, instead: tuple["Primitive", ...] = ()):
        super().__init__(reason)
        self.instead = instead


@dataclass(frozen=True)
class Conv:
    """One `relax.nn.conv2d` call with its attributes as plain Python values (`call`, `data`
    and `weight` are None for a geometry made with `Conv.nchw`)."""
    call: relax.Call | None
    data: relax.Expr | None
    weight: relax.Expr | None
    data_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    strides: tuple[int, int]
    padding: tuple[int, int, int, int]  # top, left, bottom, right
    dilation: tuple[int, int]
    groups: int
    data_layout: str
    kernel_layout: str
    out_layout: str
    dtype: str         # of the data
    weight_dtype: str
    out_dtype: str     # of the result (int32 for uint8 x int8, float32 for fp16 x fp16)

    @classmethod
    def of(cls, call: relax.Call) -> "Conv":
        data, weight = call.args
        attrs = call.attrs
        padding = _ints(attrs.padding)
        padding = {1: padding * 4, 2: padding * 2}.get(len(padding), padding)
        return cls(call, data, weight, _static_shape(data), _static_shape(weight),
                   _ints(attrs.strides), padding, _ints(attrs.dilation), int(attrs.groups),
                   str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout),
                   str(data.ty.dtype), str(weight.ty.dtype), str(call.ty.dtype))

    @classmethod
    def nchw(cls, n: int, ic: int, h: int, w: int, oc: int, kh: int, kw: int,
             strides=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1), groups: int = 1,
             dtype: str = "float32") -> "Conv":
        """An NCHW/OIHW conv's geometry alone, without a Relax call (to plan a kernel)."""
        return cls(None, None, None, (n, ic, h, w), (oc, ic // groups, kh, kw), tuple(strides),
                   tuple(padding), tuple(dilation), groups, "NCHW", "OIHW", "NCHW", dtype,
                   dtype, dtype)

    @property
    def batch(self) -> int:
        return self.data_shape[self.data_layout.index("N")]

    @property
    def in_channels(self) -> int:
        return self.data_shape[self.data_layout.index("C")]

    @property
    def out_channels(self) -> int:
        return self.weight_shape[self.kernel_layout.index("O")]

    @property
    def kernel(self) -> tuple[int, int]:
        return tuple(self.weight_shape[self.kernel_layout.index(axis)] for axis in "HW")

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.data_shape[self.data_layout.index(axis)] for axis in "HW")

    @property
    def output_size(self) -> tuple[int, int]:
        (h, w), (kh, kw) = self.input_size, self.kernel
        (sh, sw), (dh, dw), (pt, pl, pb, pr) = self.strides, self.dilation, self.padding
        return ((h + pt + pb - dh * (kh - 1) - 1) // sh + 1,
                (w + pl + pr - dw * (kw - 1) - 1) // sw + 1)

    def require_nchw(self) -> None:
        """The NCHW-only primitives' first check."""
        self.require_layout("NCHW", "OIHW")

    def require_layout(self, data: str, kernel: str) -> None:
        """Static shapes in the layouts a primitive is written for (the output like the data)."""
        if not (self.data_shape and self.weight_shape):
            raise CannotExpress("dynamic shape")
        if (self.data_layout, self.kernel_layout, self.out_layout) != (data, kernel, data):
            raise CannotExpress(f"layout {self.data_layout}/{self.kernel_layout}")

    def require_ungrouped(self) -> None:
        """No groups ("depthwise" when each group has one input channel)."""
        if self.groups != 1:
            in_per_group = self.weight_shape[self.kernel_layout.index("I")]
            raise CannotExpress("depthwise" if in_per_group == 1 else "groups")


def _ints(values) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


def _static_shape(expr: relax.Expr) -> tuple[int, ...]:
    """The shape as ints, or () when any dimension is symbolic."""
    shape = expr.ty.shape
    if shape is None or not all(isinstance(d, (int, tvm.tirx.IntImm)) for d in shape):
        return ()
    return _ints(shape)


def constant_array(expr: relax.Expr) -> np.ndarray | None:
    """The value of a relax constant (0.27: `tvm.ir.GenericConst`), or None."""
    if isinstance(expr, tvm.ir.GenericConst) and hasattr(expr.value, "numpy"):
        return expr.value.numpy()
    return None


_BUDGET = contextvars.ContextVar("dlas_tuning_budget", default=0.0)


@contextlib.contextmanager
def schedules(trials_per_conv: float):
    """While lowering a build that MetaSchedule will tune with about `trials_per_conv` trials
    for each conv of the model (0: untuned): what `tuning_budget()` answers to the primitives
    (the compiler sets it)."""
    token = _BUDGET.set(float(trials_per_conv))
    try:
        yield
    finally:
        _BUDGET.reset(token)


def tuning_budget() -> float:
    """MetaSchedule trials per conv of the build being lowered (0: untuned; see `schedules`)."""
    return _BUDGET.get()


class Primitive:
    """A conv algorithm: `rewrite` runs on the imported module (a layout change), `lower`
    turns one conv into TE kernels or raises CannotExpress. `ops` are the Relax ops it
    lowers; `sparse_kernel` is the sparse kernel that stands in for it on pruned layers;
    `label` names it in run names and reports. `lower` may ask `tuning_budget()` how much the
    build will be tuned (a layout that suits well-tuned schedules can slow TVM's default ones
    and the few-trial ones)."""
    name = ""
    label = ""
    ops: tuple[str, ...] = ("relax.nn.conv2d",)
    sparse_kernel = "direct"
    # bumped when the code this primitive generates changes: part of the stage cache's key of
    # a compiled module (left out at 1, so the keys of unchanged primitives stay as they were)
    revision = 1

    def rewrite(self, mod: tvm.IRModule,
                claimed: Callable[[relax.Call], bool] = lambda call: False,
                lowered: Counter | None = None) -> tvm.IRModule:
        """`claimed(call)`: a conv an earlier lowering of the plan takes, which a layout
        rewrite must leave as it is; `lowered`: the plan's count of layers per lowering, for a
        rewrite that lowers some itself."""
        return mod

    def claims(self, call: relax.Call) -> bool:
        """Whether `lower` takes this conv (asked before the layout rewrites of later
        lowerings, which then leave it alone)."""
        return False

    def lower(self, bb: relax.BlockBuilder, conv: Conv) -> relax.Expr:
        raise NotImplementedError

    def metrics(self) -> dict[str, float]:
        """Totals of what it lowered, added into `Plan.metrics` (none for the dense ones)."""
        return {}


class Format:
    """A data format of the weights (`algo.format`): which lowerings a plan puts before the
    dense primitive, and `infeasible(config)`, why a whole trial configuration cannot use it
    (None: it can)."""
    name = ""
    label = ""

    def lowerings(self, cfg: AlgoConfig, dense: Primitive) -> tuple[Primitive, ...]:
        raise NotImplementedError

    def infeasible(self, config: Any) -> str | None:
        return None


# --- weight transforms: computed once at compile time ------------------------------------------

_EVALUATED: dict = {}  # StructuralKey(PrimFunc) -> compiled: shapes repeat across a network


def transform_weight(bb: relax.BlockBuilder, fcompute: Callable, weight: relax.Expr,
                     name: str) -> relax.Expr:
    """`fcompute(w)` (a TE compute) applied to the conv weight. A constant weight is
    transformed here, so the kernel gets the result as a constant (no FoldConstant pass
    needed after legalisation); a weight that is a graph input gets a kernel call."""
    if not isinstance(weight, tvm.ir.expr.Constant):
        return bb.emit(bb.call_te(fcompute, weight, primfunc_name_hint=name))
    value = weight.value
    w = te.placeholder(tuple(value.shape), str(value.dtype), "w")
    result = fcompute(w)
    func = te.create_prim_func([w, result])
    key = tvm_ffi.StructuralKey(func)
    if key not in _EVALUATED:
        _EVALUATED[key] = tvm.compile(func, target=tvm.target.Target({"kind": "llvm"}))
    compiled = _EVALUATED[key]
    out = tvm.runtime.tensor(np.empty([int(d) for d in result.shape], str(result.dtype)))
    compiled(value, out)
    return relax.const(out.numpy())


def pad(x: te.Tensor, before, after, name="data_pad") -> te.Tensor:
    """Zero padding in TE, or `x` itself when there is none."""
    return topi.nn.pad(x, before, after, name=name) if any(before) or any(after) else x
