"""Layer 4, algorithms and data formats: how each convolution is computed.

A primitive is a small class registered by the name the YAML uses (`algo.conv`):

- `direct`       direct convolution in NCHW (TOPI's compute, what Relax lowers by default);
- `direct_nhwc`  the same in NHWC (a layout rewrite before legalisation), HWIO weights;
- `im2col_gemm`  explicit im2col matrix [C/g*kh*kw, OH*OW] per image and group, then a GEMM;
- `spatial_pack` input packed to NCHW[c], weights to OIHW[i][o], a blocked conv, then unpacked;
- `winograd`     Winograd F(4x4,3x3) (F(2x2,3x3) on small outputs) for 3x3 stride-1 convs;
- `im2col_gemm_nhwc` im2col in NHWC: patches [N, OH, OW, KH, KW, C] (channels contiguous),
                 then a GEMM with HWIO weights whose result is already NHWC;
- `winograd_nhwc` Winograd in NHWC, its transforms vectorised along channels; strided convs
                 wider than 1x1 with 16 or more input channels run `im2col_gemm_nhwc`, the
                 others direct in NHWC.

A trial lowers its convs through one `Plan` (`plan(cfg)`): its `legalize_map()` hands every
`relax.nn.conv2d` to a dispatcher that tries the plan's lowerings in order and falls back to
`direct` for a conv none of them can express, counting the reason (`Plan.fallbacks`) and what
lowered each conv (`Plan.lowered`). Weight transforms (packing, G·g·Gᵀ, reshapes) are computed
at compile time when the weight is a constant (it is after import), so the kernels receive them
as constants.

`algo.format: sparse` puts a `SparseLowering` first: each conv and linear layer (`relax.matmul`
with a constant 2-D weight) whose weight has at least `algo.threshold` zeros is stored as CSR
(`algo.block: 1x1`) or BSR (`4x1`, ...) and computed by our own kernels (sparse.py, NCHW fp32);
the others go on to the dense primitive, counted as fallbacks ("sparse direct: sparsity 0.31 <
0.5"). The sparse kernel follows the dense primitive: `im2col_gemm` -> sparse im2col, every
other primitive -> sparse direct (no im2col buffer). Winograd has no sparse form (G·g·Gᵀ fills
in the zeros), so with `winograd` the pruned layers run sparse direct and the rest Winograd;
with `direct_nhwc` and `winograd_nhwc` the sparse layers stay in NCHW and only the dense ones are
converted to NHWC.
The space allows `sparse` only for unstructured-pruned fp32 models (space.infeasible).
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import numpy as np
import tvm
import tvm_ffi
from tvm import relax, te, topi
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm.topi.nn.winograd_util import winograd_transform_matrices

from . import sparse
from .lowering import clip_as_min_max, fold_constants
from .errors import BadInput, allowed

log = logging.getLogger(__name__)

PRIMITIVES: dict[str, "Primitive"] = {}
FORMATS = ("dense", "sparse")
# BSR block shapes for `algo.block`, rows x columns of the [out, in*kh*kw] weight matrix:
# 1x1 is CSR; row blocks (4x1, 8x1) share each input load across output channels.
SPARSE_BLOCKS = ("1x1", "2x1", "4x1", "8x1", "16x1", "1x4", "2x2", "4x4")
DEFAULT_BLOCK, DEFAULT_THRESHOLD = "1x1", 0.5
BLOCK_SIZES = (16, 8, 4, 2, 1)  # spatial_pack channel blocks, largest that divides first


def primitive(name: str):
    def register(cls):
        cls.name = name
        PRIMITIVES[name] = cls()
        return cls
    return register


@dataclass(frozen=True)
class AlgoConfig:
    conv: str = field(default="direct", metadata={"choices": PRIMITIVES})
    format: str = field(default="dense", metadata={"choices": FORMATS})
    # CSR (1x1) or BSR block of the sparse weights (sparse format only; unset: 1x1).
    block: str | None = field(default=None, metadata={
        "choices": SPARSE_BLOCKS, "when": {"algo.format": ("sparse",)}, "unset": DEFAULT_BLOCK})
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
    """One `relax.nn.conv2d` call with its attributes as plain Python values."""
    call: relax.Call
    data: relax.Expr
    weight: relax.Expr
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


def _ints(values) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


def _static_shape(expr: relax.Expr) -> tuple[int, ...]:
    """The shape as ints, or () when any dimension is symbolic."""
    shape = expr.ty.shape
    if shape is None or not all(isinstance(d, (int, tvm.tirx.IntImm)) for d in shape):
        return ()
    return _ints(shape)


class Primitive:
    """A conv algorithm: `rewrite` runs on the imported module (a layout change), `lower`
    turns one conv into TE kernels or raises CannotExpress. `ops` are the Relax ops it
    lowers; `sparse_kernel` is the sparse.py kernel that stands in for it on pruned layers."""
    name = ""
    ops: tuple[str, ...] = ("relax.nn.conv2d",)
    sparse_kernel = "direct"

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

    def legalize_map(self) -> dict:
        """A one-off plan's map, so a bare primitive still plugs into the compiler; use
        `plan()` to read what was lowered and what fell back."""
        return Plan(self).legalize_map()


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


def _pad(x: te.Tensor, before, after, name="data_pad") -> te.Tensor:
    return topi.nn.pad(x, before, after, name=name) if any(before) or any(after) else x


# --- primitives ----------------------------------------------------------------------------------

@primitive("direct")
class Direct(Primitive):
    """Direct convolution (TOPI's compute) in whatever layout the conv has: NCHW unless a
    rewrite changed it. Expresses every conv, so it is the fallback of all the others."""

    def lower(self, bb, conv):
        if conv.out_layout != conv.data_layout:
            raise CannotExpress(f"output layout {conv.out_layout}")
        weight, kernel_layout = conv.weight, conv.kernel_layout
        if (conv.data_layout, kernel_layout) == ("NHWC", "OHWI"):
            # output channels innermost in the weights too, as in the NHWC output, so the
            # vectorised loop over them loads weights contiguously (OHWI puts them KH*KW*C
            # apart; mobilenet_v2's 96->576 1x1 conv tuned to 55 us so, 131 us before)
            weight = transform_weight(bb, lambda w: topi.transpose(w, (1, 2, 3, 0)), weight,
                                      "weight_hwio")
            kernel_layout = "HWIO"
        return bb.call_te(topi.nn.conv, conv.data, weight, conv.strides, conv.padding,
                          conv.dilation, conv.groups, conv.data_layout, kernel_layout,
                          conv.out_dtype, primfunc_name_hint="conv2d")


DIRECT = PRIMITIVES["direct"]


@primitive("direct_nhwc")
class DirectNHWC(Direct):
    """Direct convolution in NHWC (channels innermost): the network is converted to NHWC with
    OHWI weights (ConvertLayout's), which `Direct` lowers with HWIO weights (transposed at
    compile time) so the loop over output channels vectorises on both operands."""

    def rewrite(self, mod, claimed=lambda call: False, lowered=None):
        nhwc, as_is = {"relax.nn.conv2d": ["NHWC", "OHWI"]}, {"relax.nn.conv2d": ["NCHW", "OIHW"]}

        def layouts(call):  # convs an earlier lowering claims (sparse ones) stay NCHW
            if getattr(call.op, "name", None) != "relax.nn.conv2d":
                return {}
            return as_is if claimed(call) else nhwc

        mod = relax.transform.ConvertLayout({}, layouts)(clip_as_min_max(mod))
        return fold_constants(mod)  # the weights' layout transform


@primitive("im2col_gemm")
class Im2colGemm(Primitive):
    """Explicit im2col: per image and group a [C/g*kh*kw, OH*OW] matrix of input patches, then
    a GEMM with the [O, C/g*kh*kw] weight matrix (each output channel reads its group's
    patches), its [O, OH*OW] result written as NCHW. Trades memory (kh*kw copies of the
    input) for a plain matrix product."""
    sparse_kernel = "im2col"

    def lower(self, bb, conv):
        conv.require_nchw()
        n, c, _, _ = conv.data_shape
        o, cg, kh, kw = conv.weight_shape
        g, og = conv.groups, o // conv.groups
        (oh, ow), (sh, sw), (dh, dw) = conv.output_size, conv.strides, conv.dilation
        pt, pl, pb, pr = conv.padding
        k_len, positions = cg * kh * kw, oh * ow

        def im2col(x):
            x = _pad(x, (0, 0, pt, pl), (0, 0, pb, pr))
            return te.compute(
                (n, g, k_len, positions),
                lambda b, gi, k, p: x[b, gi * cg + k // (kh * kw),
                                      p // ow * sh + k // kw % kh * dh,
                                      p % ow * sw + k % kw * dw],
                name="im2col")

        def group_of(oc):  # 0 without groups: affine indices let TVM fuse bias/ReLU in
            return oc // og if g > 1 else 0

        def gemm(cols, weights):  # [O, K] x [K, OH*OW] per image, written as NCHW
            k = te.reduce_axis((0, k_len), name="k")
            return te.compute(
                (n, o, oh, ow),
                lambda b, oc, y, x: te.sum(
                    cols[b, group_of(oc), k, y * ow + x].astype(conv.out_dtype)
                    * weights[oc, k].astype(conv.out_dtype), axis=k),
                name="gemm")

        cols = bb.emit(bb.call_te(im2col, conv.data, primfunc_name_hint="im2col"))
        weights = transform_weight(bb, lambda w: topi.reshape(w, (o, k_len)), conv.weight,
                                   "weight_matrix")
        return bb.call_te(gemm, cols, weights, primfunc_name_hint="conv2d_im2col_gemm")


@primitive("im2col_gemm_nhwc")
class Im2colGemmNHWC(DirectNHWC):
    """im2col in NHWC: the network converted as for `direct_nhwc`, each conv gathers its input
    patches into [N, OH, OW, KH, KW, C] (a copy of contiguous channel rows), then one GEMM
    with the [KH, KW, C, O] weights reduces over (KH, KW, C) straight into NHWC, output
    channels innermost. Where few output pixels share many weights (strided convs deep in a
    network) the GEMM tiles and vectorises far better than the direct loop nest. Grouped
    convs fall back to direct NHWC."""
    sparse_kernel = "im2col"

    def lower(self, bb, conv):
        conv.require_layout("NHWC", "OHWI")
        if conv.groups != 1:
            in_per_group = conv.weight_shape[conv.kernel_layout.index("I")]
            raise CannotExpress("depthwise" if in_per_group == 1 else "groups")
        n, _, _, c = conv.data_shape
        o, kh, kw, _ = conv.weight_shape
        (oh, ow), (sh, sw), (dh, dw) = conv.output_size, conv.strides, conv.dilation
        pt, pl, pb, pr = conv.padding

        def im2col(x):
            x = _pad(x, (0, pt, pl, 0), (0, pb, pr, 0))
            return te.compute((n, oh, ow, kh, kw, c),
                              lambda b, y, x_, ky, kx, ci: x[b, y * sh + ky * dh,
                                                             x_ * sw + kx * dw, ci],
                              name="im2col")

        def gemm(cols, weights):
            ky, kx = te.reduce_axis((0, kh), name="ky"), te.reduce_axis((0, kw), name="kx")
            ci = te.reduce_axis((0, c), name="ci")
            return te.compute(
                (n, oh, ow, o),
                lambda b, y, x_, oc: te.sum(
                    cols[b, y, x_, ky, kx, ci].astype(conv.out_dtype)
                    * weights[ky, kx, ci, oc].astype(conv.out_dtype), axis=[ky, kx, ci]),
                name="gemm")

        cols = bb.emit(bb.call_te(im2col, conv.data, primfunc_name_hint="im2col"))
        weights = transform_weight(bb, lambda w: topi.transpose(w, (1, 2, 3, 0)), conv.weight,
                                   "weight_matrix")
        return bb.call_te(gemm, cols, weights, primfunc_name_hint="conv2d_im2col_gemm_nhwc")


IM2COL_GEMM_NHWC = PRIMITIVES["im2col_gemm_nhwc"]


def _block(channels: int) -> int:
    return next(b for b in BLOCK_SIZES if channels % b == 0)


@primitive("spatial_pack")
class SpatialPack(Primitive):
    """Blocked (NCHWc) convolution: the input is packed to NCHW[ic_bn]c and the weights to
    OIHW[ic_bn]i[oc_bn]o so the innermost loops run over contiguous channel blocks (vector
    lanes); the output is unpacked to NCHW. Blocks are the largest of 16/8/4/2/1 dividing the
    channels per group; depthwise convs block the channels themselves."""

    def lower(self, bb, conv):
        conv.require_nchw()
        n, c, _, _ = conv.data_shape
        o, cg, kh, kw = conv.weight_shape
        g = conv.groups
        depthwise = g == c == o and cg == 1
        ic_bn = _block(c) if depthwise else _block(cg)
        oc_bn = ic_bn if depthwise else _block(o // g)
        (oh, ow), (sh, sw), (dh, dw) = conv.output_size, conv.strides, conv.dilation
        pt, pl, pb, pr = conv.padding
        out = conv.out_dtype

        def pack_data(x):
            _, _, h, w = x.shape
            return te.compute((n, c // ic_bn, h, w, ic_bn),
                              lambda b, ci, y, x_, cb: x[b, ci * ic_bn + cb, y, x_],
                              name="pack_data")

        def pack_weight(w):
            if depthwise:  # [C/bn, kh, kw, bn]
                return te.compute((c // ic_bn, kh, kw, ic_bn),
                                  lambda ci, y, x_, cb: w[ci * ic_bn + cb, 0, y, x_],
                                  name="pack_weight")
            return te.compute((o // oc_bn, cg // ic_bn, kh, kw, ic_bn, oc_bn),
                              lambda oc, ic, y, x_, ib, ob: w[oc * oc_bn + ob, ic * ic_bn + ib,
                                                               y, x_],
                              name="pack_weight")

        def conv_nchwc(x, w):
            x = _pad(x, (0, 0, pt, pl, 0), (0, 0, pb, pr, 0))
            ry = te.reduce_axis((0, kh), name="ry")
            rx = te.reduce_axis((0, kw), name="rx")
            if depthwise:
                return te.compute(
                    (n, c // ic_bn, oh, ow, ic_bn),
                    lambda b, ci, y, x_, cb: te.sum(
                        x[b, ci, y * sh + ry * dh, x_ * sw + rx * dw, cb].astype(out)
                        * w[ci, ry, rx, cb].astype(out), axis=[ry, rx]),
                    name="conv2d_NCHWc")
            ric = te.reduce_axis((0, cg), name="ric")
            oc_chunks_per_group, ic_chunks_per_group = o // g // oc_bn, cg // ic_bn
            return te.compute(
                (n, o // oc_bn, oh, ow, oc_bn),
                lambda b, oc, y, x_, ob: te.sum(
                    x[b, oc // oc_chunks_per_group * ic_chunks_per_group + ric // ic_bn,
                      y * sh + ry * dh, x_ * sw + rx * dw, ric % ic_bn].astype(out)
                    * w[oc, ric // ic_bn, ry, rx, ric % ic_bn, ob].astype(out),
                    axis=[ric, ry, rx]),
                name="conv2d_NCHWc")

        def unpack(y):
            return te.compute((n, o, oh, ow), lambda b, oc, y_, x_: y[b, oc // oc_bn, y_, x_,
                                                                        oc % oc_bn],
                              name="unpack_output")

        data = bb.emit(bb.call_te(pack_data, conv.data, primfunc_name_hint="pack_nchwc"))
        weight = transform_weight(bb, pack_weight, conv.weight, "pack_weight")
        packed = bb.emit(bb.call_te(conv_nchwc, data, weight, primfunc_name_hint="conv2d_nchwc"))
        return bb.call_te(unpack, packed, primfunc_name_hint="unpack_nchwc")


@primitive("winograd")
class Winograd(Primitive):
    """Winograd F(m x m, 3x3) in NCHW: input tiles transformed by Bᵀ·d·B, a batched GEMM over
    channels with the transformed weights U = G·g·Gᵀ (computed at compile time), and the
    inverse transform Aᵀ·M·A. m = 4 (36 multiplies per 16 outputs instead of 144), or 2 when
    the output is smaller than 8 pixels on a side (a 4x4 tile would mostly compute padding).
    Only 3x3, stride 1, dilation 1, groups 1, float32 convs; the stage structure follows
    TOPI's, and the transforms carry the MetaSchedule rules below."""

    def lower(self, bb, conv):
        conv.require_nchw()
        m = winograd_tile(conv)
        u = transform_weight(bb, partial(winograd_weight_transform, m=m), conv.weight,
                             "winograd_weight_transform")
        return bb.call_te(winograd_conv, conv.data, u, conv.padding, m,
                          primfunc_name_hint="conv2d_winograd")


def winograd_tile(conv: Conv) -> int:
    """The output tile m of a conv Winograd can express (else CannotExpress): 4, or 2 when
    the output is smaller than 8 pixels on a side (a 4x4 tile would mostly compute padding)."""
    if conv.kernel != (3, 3):
        raise CannotExpress(f"kernel {conv.kernel[0]}x{conv.kernel[1]}")
    if conv.strides != (1, 1):
        raise CannotExpress(f"stride {conv.strides[0]}x{conv.strides[1]}")
    if conv.dilation != (1, 1):
        raise CannotExpress(f"dilation {conv.dilation[0]}x{conv.dilation[1]}")
    if conv.groups != 1:
        in_per_group = conv.weight_shape[conv.kernel_layout.index("I")]
        raise CannotExpress("depthwise" if in_per_group == 1 else "groups")
    if {conv.dtype, conv.weight_dtype, conv.out_dtype} != {"float32"}:
        raise CannotExpress(f"dtype {conv.dtype}")
    return 4 if min(conv.output_size) >= 8 else 2


def winograd_weight_transform(weight: te.Tensor, m: int, layout: str = "OIHW") -> te.Tensor:
    """U[eps, nu, ci, co] = (G·g[co, ci]·Gᵀ)[eps, nu] for a 3x3 weight in `layout` (OIHW or
    OHWI; TOPI's own transform fails in TVM 0.27)."""
    o, c = (weight.shape[layout.index(axis)] for axis in "OI")
    _, _, g = winograd_transform_matrices(m, 3, str(weight.dtype))
    alpha = m + 2
    ry = te.reduce_axis((0, 3), name="ry")
    rx = te.reduce_axis((0, 3), name="rx")

    def tap(co, ci):
        index = {"O": co, "I": ci, "H": ry, "W": rx}
        return weight[tuple(index[axis] for axis in layout)]

    return te.compute(
        (alpha, alpha, c, o),
        lambda eps, nu, ci, co: te.sum(g[eps, ry] * tap(co, ci) * g[nu, rx], axis=[ry, rx]),
        name="winograd_weight")


# MetaSchedule rules for the two Winograd transforms (the `schedule_rule` of their blocks, looked
# up as s_tir.meta_schedule.<cpu|cuda>.<name>). TVM's own CPU rules sample where the input tile
# is computed, and when the search mutates that decision to "inline", the replayed trace refers
# to the inlined block: MetaSchedule stops with "The block no longer exists in the IRModule"
# (resnet18 224, seeds 0 and 1 alike). Ours fix those locations; the tiling stays searched.
WINOGRAD_DATA_PACK_RULE = "dlas_winograd_data_pack"
WINOGRAD_INVERSE_RULE = "dlas_winograd_inverse"


def _producer_inlining_constants(sch, block):
    """The one producer of `block` that reads memory; constant producers (the transform
    matrices, which read nothing) are inlined so their values fold into the unrolled code."""
    readers = []
    for producer in sch.get_producers(block):
        if sch.get(producer).reads:
            readers.append(producer)
        else:
            sch.compute_inline(producer)
    (reader,) = readers
    return reader


def _tile_and_unroll(sch, block, tiled: tuple[int, int], unrolled: tuple[int, ...]):
    """The two loops over channels and tiles split by sampled factors, the transform's four
    alpha/m loops unrolled innermost (TVM's ScheduleDataPack)."""
    loops = sch.get_loops(block)
    outer, inner = [], []
    for axis in tiled:
        factors = sch.sample_perfect_tile(loops[axis], n=2, max_innermost_factor=64)
        o, i = sch.split(loops[axis], factors)
        outer.append(o)
        inner.append(i)
    for axis in unrolled:
        sch.unroll(loops[axis])
    sch.reorder(*outer, *inner, *(loops[axis] for axis in unrolled))
    return inner[-1]


def _winograd_data_pack_rule(sch, data_pack):
    input_tile = _producer_inlining_constants(sch, data_pack)
    data_pad = _producer_inlining_constants(sch, input_tile)
    innermost = _tile_and_unroll(sch, data_pack, (2, 3), (0, 1, 4, 5))
    sch.compute_at(input_tile, innermost, preserve_unit_loops=True)
    sch.compute_inline(data_pad)
    return [sch]


def _winograd_inverse_rule(sch, inverse):
    _producer_inlining_constants(sch, inverse)
    _tile_and_unroll(sch, inverse, (0, 1), (2, 3, 4, 5))
    return [sch]


WINOGRAD_RULES = {WINOGRAD_DATA_PACK_RULE: _winograd_data_pack_rule,
                  WINOGRAD_INVERSE_RULE: _winograd_inverse_rule}
for _name, _rule in WINOGRAD_RULES.items():
    tvm_ffi.register_global_func(f"s_tir.meta_schedule.cpu.{_name}", _rule, override=True)
for _ours, _tvms in ((WINOGRAD_DATA_PACK_RULE, "conv2d_nchw_winograd_data_pack"),
                     (WINOGRAD_INVERSE_RULE, "conv2d_nchw_winograd_inverse")):
    tvm_ffi.register_global_func(f"s_tir.meta_schedule.cuda.{_ours}",
                                 tvm.get_global_func(f"s_tir.meta_schedule.cuda.{_tvms}"),
                                 override=True)


def winograd_conv(data: te.Tensor, u: te.Tensor, padding, m: int) -> te.Tensor:
    """NCHW Winograd convolution with pre-transformed weights `u` [alpha, alpha, C, O]."""
    n, c, h, w = (int(d) for d in data.shape)
    alpha, _, _, o = (int(d) for d in u.shape)
    pt, pl, pb, pr = padding
    oh, ow = h + pt + pb - 2, w + pl + pr - 2
    tiles_h, tiles_w = -(-oh // m), -(-ow // m)
    tiles = n * tiles_h * tiles_w
    a_mat, b_mat, _ = winograd_transform_matrices(m, 3, str(data.dtype))
    # pad on to whole tiles, so the last tiles read zeros, never past the buffer
    data_pad = _pad(data, (0, 0, pt, pl), (0, 0, tiles_h * m + 2 - h - pt,
                                           tiles_w * m + 2 - w - pl))
    input_tile = te.compute(
        (c, tiles, alpha, alpha),
        lambda ci, p, eps, nu: data_pad[p // (tiles_h * tiles_w), ci,
                                        p // tiles_w % tiles_h * m + eps, p % tiles_w * m + nu],
        name="input_tile", attrs={"schedule_rule": "None"})
    ra = te.reduce_axis((0, alpha), "r_a")
    rb = te.reduce_axis((0, alpha), "r_b")
    data_pack = te.compute(
        (alpha, alpha, c, tiles),
        lambda eps, nu, ci, p: te.sum(input_tile[ci, p, ra, rb] * b_mat[ra, eps]
                                      * b_mat[rb, nu], axis=[ra, rb]),
        name="data_pack", attrs={"schedule_rule": WINOGRAD_DATA_PACK_RULE})
    rc = te.reduce_axis((0, c), name="ci")
    bgemm = te.compute(
        (alpha, alpha, o, tiles),
        lambda eps, nu, co, p: te.sum(data_pack[eps, nu, rc, p] * u[eps, nu, rc, co], axis=rc),
        name="bgemm")
    ra = te.reduce_axis((0, alpha), "r_a")
    rb = te.reduce_axis((0, alpha), "r_b")
    inverse = te.compute(
        (o, tiles, m, m),
        lambda co, p, vh, vw: te.sum(bgemm[ra, rb, co, p] * a_mat[ra, vh] * a_mat[rb, vw],
                                     axis=[ra, rb]),
        name="inverse", attrs={"schedule_rule": WINOGRAD_INVERSE_RULE})
    return te.compute(
        (n, o, oh, ow),
        lambda b, co, y, x: inverse[co, b * tiles_h * tiles_w + y // m * tiles_w + x // m,
                                    y % m, x % m],
        name="conv2d_winograd")


@primitive("winograd_nhwc")
class WinogradNHWC(DirectNHWC):
    """Winograd F(m x m, 3x3) in NHWC: the network is converted to NHWC as for `direct_nhwc`
    and the 3x3 stride-1 convs run Winograd with channels innermost, so both transforms and
    the batched GEMM vectorise along channels (contiguous loads and stores; the NCHW
    transforms run scalar). Other convs fall back in NHWC: strided ones wider than 1x1 with at
    least 16 input channels (resnet18's 3x3 stride-2 convs) to `im2col_gemm_nhwc`, which
    tuned faster than direct there (README, layers 4-5); the rest to direct (the stem's 3
    channels make a slow gather)."""

    def lower(self, bb, conv):
        conv.require_layout("NHWC", "OHWI")
        try:
            m = winograd_tile(conv)
        except CannotExpress as why:
            strided_gemm = (conv.strides != (1, 1) and conv.kernel != (1, 1)
                            and conv.groups == 1 and conv.data_shape[3] >= 16)
            raise CannotExpress(str(why), (IM2COL_GEMM_NHWC,) if strided_gemm else ()) from None
        u = transform_weight(bb, partial(winograd_weight_transform, m=m, layout="OHWI"),
                             conv.weight, "winograd_weight_transform")
        return bb.call_te(winograd_nhwc_conv, conv.data, u, conv.padding, m,
                          primfunc_name_hint="conv2d_winograd_nhwc")


WINOGRAD_NHWC_DATA_PACK_RULE = "dlas_winograd_nhwc_data_pack"
WINOGRAD_NHWC_INVERSE_RULE = "dlas_winograd_nhwc_inverse"


def winograd_nhwc_conv(data: te.Tensor, u: te.Tensor, padding, m: int) -> te.Tensor:
    """NHWC Winograd convolution with pre-transformed weights `u` [alpha, alpha, C, O]: every
    stage keeps channels innermost; the stages have TOPI's NHWC layouts (data_pack [alpha,
    alpha, tiles, C], bgemm [alpha, alpha, tiles, O], inverse [m, m, tiles, O]), so TVM's
    CUDA rules for them apply as they are."""
    n, h, w, c = (int(d) for d in data.shape)
    alpha, _, _, o = (int(d) for d in u.shape)
    pt, pl, pb, pr = padding
    oh, ow = h + pt + pb - 2, w + pl + pr - 2
    tiles_h, tiles_w = -(-oh // m), -(-ow // m)
    tiles = n * tiles_h * tiles_w
    a_mat, b_mat, _ = winograd_transform_matrices(m, 3, str(data.dtype))
    data_pad = _pad(data, (0, pt, pl, 0), (0, tiles_h * m + 2 - h - pt,
                                           tiles_w * m + 2 - w - pl, 0))
    input_tile = te.compute(
        (alpha, alpha, tiles, c),
        lambda eps, nu, p, ci: data_pad[p // (tiles_h * tiles_w), p // tiles_w % tiles_h * m + eps,
                                        p % tiles_w * m + nu, ci],
        name="input_tile", attrs={"schedule_rule": "None"})
    ra = te.reduce_axis((0, alpha), "r_a")
    rb = te.reduce_axis((0, alpha), "r_b")
    data_pack = te.compute(
        (alpha, alpha, tiles, c),
        lambda eps, nu, p, ci: te.sum(input_tile[ra, rb, p, ci] * b_mat[ra, eps]
                                      * b_mat[rb, nu], axis=[ra, rb]),
        name="data_pack", attrs={"schedule_rule": WINOGRAD_NHWC_DATA_PACK_RULE})
    rc = te.reduce_axis((0, c), name="ci")
    bgemm = te.compute(
        (alpha, alpha, tiles, o),
        lambda eps, nu, p, co: te.sum(data_pack[eps, nu, p, rc] * u[eps, nu, rc, co], axis=rc),
        name="bgemm")
    ra = te.reduce_axis((0, alpha), "r_a")
    rb = te.reduce_axis((0, alpha), "r_b")
    inverse = te.compute(
        (m, m, tiles, o),
        lambda vh, vw, p, co: te.sum(bgemm[ra, rb, p, co] * a_mat[ra, vh] * a_mat[rb, vw],
                                     axis=[ra, rb]),
        name="inverse", attrs={"schedule_rule": WINOGRAD_NHWC_INVERSE_RULE})
    return te.compute(
        (n, oh, ow, o),
        lambda b, y, x, co: inverse[y % m, x % m,
                                    b * tiles_h * tiles_w + y // m * tiles_w + x // m, co],
        name="conv2d_winograd_nhwc")


def _tile_unroll_vectorize(sch, block, tiled: int, vector: int, unrolled: tuple[int, ...]):
    """Loops: the tile loop and the channel loop split by sampled factors, the outer parts
    first, then the inner tile loop, the transform's alpha/m loops unrolled, and the inner
    channel loop innermost, vectorised (one vector of channels per transform). Returns the
    inner tile loop."""
    loops = sch.get_loops(block)
    p_outer, p_inner = sch.split(loops[tiled], sch.sample_perfect_tile(
        loops[tiled], n=2, max_innermost_factor=16))
    c_outer, c_inner = sch.split(loops[vector], sch.sample_perfect_tile(
        loops[vector], n=2, max_innermost_factor=64))
    for axis in unrolled:
        sch.unroll(loops[axis])
    sch.reorder(p_outer, c_outer, p_inner, *(loops[axis] for axis in unrolled), c_inner)
    sch.vectorize(c_inner)
    return p_inner


def _winograd_nhwc_data_pack_rule(sch, data_pack):
    input_tile = _producer_inlining_constants(sch, data_pack)
    data_pad = _producer_inlining_constants(sch, input_tile)
    p_inner = _tile_unroll_vectorize(sch, data_pack, 2, 3, (0, 1, 4, 5))
    sch.compute_at(input_tile, p_inner, preserve_unit_loops=True)
    sch.vectorize(sch.get_loops(input_tile)[-1])
    sch.compute_inline(data_pad)
    return [sch]


def _winograd_nhwc_inverse_rule(sch, inverse):
    _producer_inlining_constants(sch, inverse)
    _tile_unroll_vectorize(sch, inverse, 2, 3, (0, 1, 4, 5))
    return [sch]


WINOGRAD_RULES.update({WINOGRAD_NHWC_DATA_PACK_RULE: _winograd_nhwc_data_pack_rule,
                       WINOGRAD_NHWC_INVERSE_RULE: _winograd_nhwc_inverse_rule})
for _ours, _tvms in ((WINOGRAD_NHWC_DATA_PACK_RULE, "conv2d_nhwc_winograd_data_pack"),
                     (WINOGRAD_NHWC_INVERSE_RULE, "conv2d_nhwc_winograd_inverse")):
    tvm_ffi.register_global_func(f"s_tir.meta_schedule.cpu.{_ours}", WINOGRAD_RULES[_ours],
                                 override=True)
    tvm_ffi.register_global_func(f"s_tir.meta_schedule.cuda.{_ours}",
                                 tvm.get_global_func(f"s_tir.meta_schedule.cuda.{_tvms}"),
                                 override=True)


# --- sparse weights ------------------------------------------------------------------------------

class SparseLowering(Primitive):
    """Pruned constant weights as CSR/BSR, computed by sparse.py's kernels. Goes first in a
    plan: a conv (or a linear layer: `relax.matmul` by a constant 2-D weight) whose weight is a
    float32 constant with at least `threshold` zeros is lowered to the sparse `kernel`
    ("direct" or "im2col") in NCHW; any other layer is refused with the reason, so the plan
    counts it and hands it on to the dense primitive. Keeps the totals `Plan.metrics` reports
    (layers made sparse, their bytes as sparse constants and as dense weights)."""
    ops = ("relax.nn.conv2d", "relax.matmul")
    linear_name = "sparse linear"

    def __init__(self, kernel: str = "direct", block: sparse.BlockShape = sparse.BlockShape(),
                 threshold: float = DEFAULT_THRESHOLD):
        if kernel not in sparse.KERNELS:
            raise ValueError(f"unknown sparse kernel {kernel!r}; choose from {sparse.KERNELS}")
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
            return self._counted(sparse.emit_conv(bb, conv.call, self.kernel, self.block), weight)
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
            call = sparse.emit_conv(bb, chain.conv, self.kernel, self.block, chain.bias,
                                    chain.residual, chain.relu)
        except (CannotExpress, NotImplementedError) as e:
            log.info("conv %s: epilogue not fused (%s)", conv.data_shape, e)
            return None
        return self._counted(call, weight)

    def lower_matmul(self, bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        """y = x @ W for a 2-D float32 x and a constant W [in, out] (how a torch Linear imports,
        the bias added after)."""
        x, weight = call.args
        self._check_dtypes(str(weight.ty.dtype), str(x.ty.dtype), str(call.ty.dtype))
        value = _constant_weight(weight)
        if x.ty.ndim != 2 or value.ndim != 2:
            raise CannotExpress(f"{x.ty.ndim}-D input" if x.ty.ndim != 2 else
                                f"{value.ndim}-D weight")
        self._check_sparsity(value)
        try:
            return self._counted(sparse.emit_linear(bb, x, value.T, self.block), value)
        except NotImplementedError as e:
            raise CannotExpress(str(e)) from None

    def _sparse_enough(self, conv: Conv) -> np.ndarray:
        """The conv's weight if the sparse kernels take it, else CannotExpress saying why."""
        self._check_dtypes(conv.weight_dtype, conv.dtype, conv.out_dtype)
        weight = _constant_weight(conv.weight)
        self._check_sparsity(weight)
        conv.require_nchw()
        return weight

    @staticmethod
    def _check_dtypes(weight: str, data: str, out: str) -> None:
        """The kernels are fp32; the reason names the first other dtype (e.g. "int8")."""
        other = next((d for d in (weight, data, out) if d != "float32"), None)
        if other:
            raise CannotExpress(other)

    def _check_sparsity(self, weight: np.ndarray) -> None:
        zeros = sparse.sparsity(weight)
        if zeros < self.threshold:
            raise CannotExpress(f"sparsity {zeros:.2f} < {self.threshold:g}")

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


def _constant_weight(weight: relax.Expr) -> np.ndarray:
    value = sparse.constant_array(weight)
    if value is None:
        raise CannotExpress("weight not constant")
    return value


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
        out_shape = sparse.static_shape(var)
        while uses[cur] == 1 and cur in users and isinstance(users[cur][1], relax.Call) and \
                users[cur][0] not in taken:
            user_var, user = users[cur]
            op = getattr(user.op, "name", "")
            other = ([a for a in user.args if not a.same_as(cur)] or [None])[0] \
                if op == "relax.add" else None
            bias = sparse.constant_array(other) if other is not None else None
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


def block_shape(text: str) -> sparse.BlockShape:
    """`algo.block` ("4x1": 4 rows, 1 column) as a BlockShape; BadInput listing the allowed."""
    if text not in SPARSE_BLOCKS:
        raise allowed("algo.block", text, SPARSE_BLOCKS)
    rows, cols = text.split("x")
    return sparse.BlockShape(int(rows), int(cols))


# --- one trial's dispatcher ----------------------------------------------------------------------

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


def _metric_name(name: str) -> str:
    return name.lower().replace(" ", "_")


def primitive_named(name: str) -> Primitive:
    """The registered primitive `name`, or BadInput listing the allowed names."""
    if name not in PRIMITIVES:
        raise allowed("algo.conv", name, PRIMITIVES)
    return PRIMITIVES[name]


def plan(cfg: AlgoConfig) -> Plan:
    """A fresh dispatcher for one trial (its counters start at zero). Sparse format puts a
    SparseLowering (the dense primitive's sparse kernel, `algo.block`, `algo.threshold`)
    before the dense primitive."""
    dense = primitive_named(cfg.conv)
    if cfg.format not in FORMATS:
        raise allowed("algo.format", cfg.format, FORMATS)
    if cfg.format == "dense":
        return Plan(dense)
    threshold = DEFAULT_THRESHOLD if cfg.threshold is None else cfg.threshold
    if not 0.0 <= threshold <= 1.0:
        raise BadInput(f"algo.threshold: {threshold!r} is out of range; allowed: 0.0 to 1.0")
    block = block_shape(DEFAULT_BLOCK if cfg.block is None else cfg.block)
    return Plan(SparseLowering(dense.sparse_kernel, block, threshold), dense)
