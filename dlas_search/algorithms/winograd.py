"""Winograd F(m x m, 3x3) convolution, in NCHW (`winograd`) and NHWC (`winograd_nhwc`).

Input tiles are transformed by Bᵀ·d·B, multiplied over channels with the transformed weights
U = G·g·Gᵀ (computed at compile time) in a batched GEMM, and transformed back by Aᵀ·M·A: with
m = 4, 36 multiplies per 16 outputs instead of 144 (m = 2 on outputs smaller than 8 pixels a
side, where a 4x4 tile would mostly compute padding). Only 3x3, stride 1, dilation 1,
ungrouped float32 convs; the others fall back.

Both layouts are one implementation: a `WinogradLayout` says where each stage keeps its axes
(NCHW: TOPI's NCHW stages, channels outside the tiles; NHWC: TOPI's NHWC stages, channels
innermost so the transforms and the GEMM vectorise along them), and the MetaSchedule rules of
the two transforms, tiling and unrolling the same loops, read their loop order from it.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import tvm
import tvm_ffi
from tvm import te
from tvm.topi.nn.winograd_util import winograd_transform_matrices

from .contract import PRIMITIVES, CannotExpress, Conv, Primitive, pad, transform_weight
from .direct import ToNHWC
from .im2col import IM2COL_GEMM_NHWC

__all__ = ["Winograd", "WinogradNHWC", "WinogradLayout", "NCHW", "NHWC", "winograd_tile",
           "winograd_weight_transform", "winograd_conv", "WINOGRAD_RULES",
           "WINOGRAD_DATA_PACK_RULE", "WINOGRAD_INVERSE_RULE", "WINOGRAD_NHWC_DATA_PACK_RULE",
           "WINOGRAD_NHWC_INVERSE_RULE"]


@dataclass(frozen=True)
class WinogradLayout:
    """Where the stages of one layout keep their axes (TOPI's names: ci/co channels, p tiles,
    eps/nu the alpha x alpha transform, vh/vw the m x m output tile). `vectorize`: the rules
    vectorise the innermost channel loop (channels innermost); otherwise they tile the tile
    loop as finely as the channel one."""
    suffix: str                  # of the primitive, its kernels and rules: "" or "_nhwc"
    data: str                    # the data layout, "NCHW" or "NHWC"
    kernel: str                  # the weight layout, "OIHW" or "OHWI"
    input_tile: tuple[str, ...]
    data_pack: tuple[str, ...]
    bgemm: tuple[str, ...]
    inverse: tuple[str, ...]
    vectorize: bool
    max_tile_factor: int         # largest inner factor of the tile loop the rules sample
    tvm: str                     # TVM's name for the layout's CUDA rules

    @property
    def output(self) -> tuple[str, ...]:
        return tuple({"N": "b", "C": "co", "H": "y", "W": "x"}[axis] for axis in self.data)

    @property
    def data_pack_rule(self) -> str:
        return f"dlas_winograd{self.suffix}_data_pack"

    @property
    def inverse_rule(self) -> str:
        return f"dlas_winograd{self.suffix}_inverse"


NCHW = WinogradLayout("", "NCHW", "OIHW", ("ci", "p", "eps", "nu"), ("eps", "nu", "ci", "p"),
                      ("eps", "nu", "co", "p"), ("co", "p", "vh", "vw"), vectorize=False,
                      max_tile_factor=64, tvm="nchw")
# TOPI's NHWC stages (data_pack [alpha, alpha, tiles, C], bgemm [alpha, alpha, tiles, O],
# inverse [m, m, tiles, O]), so TVM's CUDA rules for them apply as they are
NHWC = WinogradLayout("_nhwc", "NHWC", "OHWI", ("eps", "nu", "p", "ci"),
                      ("eps", "nu", "p", "ci"), ("eps", "nu", "p", "co"),
                      ("vh", "vw", "p", "co"), vectorize=True, max_tile_factor=16, tvm="nhwc")


def _at(axes: tuple[str, ...], **index):
    """`index` (by axis name) in the order of `axes`."""
    return tuple(index[axis] for axis in axes)


def _stage(axes: tuple[str, ...], extents: dict, body, **kwargs) -> te.Tensor:
    """te.compute over `axes` (its loop variables named after them), `body(**index)`."""
    return te.compute(_at(axes, **extents), lambda *index: body(**dict(zip(axes, index))),
                      varargs_names=list(axes), **kwargs)


def winograd_tile(conv: Conv) -> int:
    """The output tile m of a conv Winograd can express (else CannotExpress): 4, or 2 when
    the output is smaller than 8 pixels on a side (a 4x4 tile would mostly compute padding)."""
    if conv.kernel != (3, 3):
        raise CannotExpress(f"kernel {conv.kernel[0]}x{conv.kernel[1]}")
    if conv.strides != (1, 1):
        raise CannotExpress(f"stride {conv.strides[0]}x{conv.strides[1]}")
    if conv.dilation != (1, 1):
        raise CannotExpress(f"dilation {conv.dilation[0]}x{conv.dilation[1]}")
    conv.require_ungrouped()
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


def winograd_conv(data: te.Tensor, u: te.Tensor, padding, m: int,
                  layout: WinogradLayout = NCHW) -> te.Tensor:
    """Winograd convolution of `data` in `layout` with pre-transformed weights `u` [alpha,
    alpha, C, O]; each stage keeps its axes in the layout's order."""
    n, c, h, w = (int(data.shape[layout.data.index(axis)]) for axis in "NCHW")
    alpha, _, _, o = (int(d) for d in u.shape)
    pt, pl, pb, pr = padding
    oh, ow = h + pt + pb - 2, w + pl + pr - 2
    tiles_h, tiles_w = -(-oh // m), -(-ow // m)
    tiles = n * tiles_h * tiles_w
    a_mat, b_mat, _ = winograd_transform_matrices(m, 3, str(data.dtype))
    extents = {"ci": c, "co": o, "p": tiles, "eps": alpha, "nu": alpha, "vh": m, "vw": m,
               "b": n, "y": oh, "x": ow}
    # pad on to whole tiles, so the last tiles read zeros, never past the buffer
    data_pad = pad(data, _at(layout.data, N=0, C=0, H=pt, W=pl),
                   _at(layout.data, N=0, C=0, H=tiles_h * m + 2 - h - pt,
                       W=tiles_w * m + 2 - w - pl))
    input_tile = _stage(
        layout.input_tile, extents,
        lambda ci, p, eps, nu: data_pad[_at(
            layout.data, N=p // (tiles_h * tiles_w), C=ci, H=p // tiles_w % tiles_h * m + eps,
            W=p % tiles_w * m + nu)],
        name="input_tile", attrs={"schedule_rule": "None"})
    ra = te.reduce_axis((0, alpha), "r_a")
    rb = te.reduce_axis((0, alpha), "r_b")
    data_pack = _stage(
        layout.data_pack, extents,
        lambda eps, nu, ci, p: te.sum(
            input_tile[_at(layout.input_tile, ci=ci, p=p, eps=ra, nu=rb)] * b_mat[ra, eps]
            * b_mat[rb, nu], axis=[ra, rb]),
        name="data_pack", attrs={"schedule_rule": layout.data_pack_rule})
    rc = te.reduce_axis((0, c), name="ci")
    bgemm = _stage(
        layout.bgemm, extents,
        lambda eps, nu, co, p: te.sum(
            data_pack[_at(layout.data_pack, eps=eps, nu=nu, ci=rc, p=p)]
            * u[eps, nu, rc, co], axis=rc),
        name="bgemm")
    ra = te.reduce_axis((0, alpha), "r_a")
    rb = te.reduce_axis((0, alpha), "r_b")
    inverse = _stage(
        layout.inverse, extents,
        lambda co, p, vh, vw: te.sum(
            bgemm[_at(layout.bgemm, eps=ra, nu=rb, co=co, p=p)] * a_mat[ra, vh]
            * a_mat[rb, vw], axis=[ra, rb]),
        name="inverse", attrs={"schedule_rule": layout.inverse_rule})
    return _stage(
        layout.output, extents,
        lambda b, co, y, x: inverse[_at(
            layout.inverse, co=co, p=b * tiles_h * tiles_w + y // m * tiles_w + x // m,
            vh=y % m, vw=x % m)],
        name=f"conv2d_winograd{layout.suffix}")


@PRIMITIVES.register("winograd")
class Winograd(Primitive):
    """Winograd F(m x m, 3x3) in NCHW: input tiles transformed by Bᵀ·d·B, a batched GEMM over
    channels with the transformed weights U = G·g·Gᵀ (computed at compile time), and the
    inverse transform Aᵀ·M·A. m = 4 (36 multiplies per 16 outputs instead of 144), or 2 when
    the output is smaller than 8 pixels on a side (a 4x4 tile would mostly compute padding).
    Only 3x3, stride 1, dilation 1, groups 1, float32 convs; the stage structure follows
    TOPI's, and the transforms carry the MetaSchedule rules below."""
    label = "Winograd F(4x4, 3x3) (NCHW)"
    layout = NCHW

    def tile(self, conv: Conv) -> int:
        """The output tile for `conv`, or CannotExpress."""
        conv.require_nchw()
        return winograd_tile(conv)

    def lower(self, bb, conv):
        m = self.tile(conv)
        u = transform_weight(bb, partial(winograd_weight_transform, m=m,
                                         layout=self.layout.kernel),
                             conv.weight, "winograd_weight_transform")
        return bb.call_te(partial(winograd_conv, layout=self.layout), conv.data, u,
                          conv.padding, m,
                          primfunc_name_hint=f"conv2d_winograd{self.layout.suffix}")


@PRIMITIVES.register("winograd_nhwc")
class WinogradNHWC(ToNHWC, Winograd):
    """Winograd F(m x m, 3x3) in NHWC: the network is converted to NHWC as for `direct_nhwc`
    and the 3x3 stride-1 convs run Winograd with channels innermost, so both transforms and
    the batched GEMM vectorise along channels (contiguous loads and stores; the NCHW
    transforms run scalar). Other convs fall back in NHWC: strided ones wider than 1x1 with at
    least 16 input channels (resnet18's 3x3 stride-2 convs) to `im2col_gemm_nhwc`, which
    tuned faster than direct there (README, layers 4-5); the rest to direct (the stem's 3
    channels make a slow gather)."""
    label = "Winograd F(4x4, 3x3) (NHWC)"
    layout = NHWC

    def tile(self, conv):
        conv.require_layout("NHWC", "OHWI")
        try:
            return winograd_tile(conv)
        except CannotExpress as why:
            strided_gemm = (conv.strides != (1, 1) and conv.kernel != (1, 1)
                            and conv.groups == 1 and conv.data_shape[3] >= 16)
            raise CannotExpress(str(why), (IM2COL_GEMM_NHWC,) if strided_gemm else ()) from None


# --- MetaSchedule rules for the two transforms ---------------------------------------------------
# The `schedule_rule` of their blocks, looked up as s_tir.meta_schedule.<cpu|cuda>.<name>. TVM's
# own CPU rules sample where the input tile is computed, and when the search mutates that
# decision to "inline", the replayed trace refers to the inlined block: MetaSchedule stops with
# "The block no longer exists in the IRModule" (resnet18 224, seeds 0 and 1 alike). Ours fix
# those locations; the tiling stays searched. On CUDA, TVM's rules for the layout apply.
WINOGRAD_DATA_PACK_RULE = NCHW.data_pack_rule
WINOGRAD_INVERSE_RULE = NCHW.inverse_rule
WINOGRAD_NHWC_DATA_PACK_RULE = NHWC.data_pack_rule
WINOGRAD_NHWC_INVERSE_RULE = NHWC.inverse_rule


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


def _tile_and_unroll(sch, block, axes: tuple[str, ...], channel: str, layout: WinogradLayout):
    """The block's loops (`axes`, then the two reduction loops): the tile loop and the channel
    loop split by sampled factors (in loop order), the transform's four alpha/m loops unrolled.
    Without `layout.vectorize` (TVM's ScheduleDataPack): outer parts, inner parts, unrolled
    loops. With it: the inner channel loop goes innermost, after the unrolled loops, and is
    vectorised (one vector of channels per transform). Returns the inner tile loop."""
    loops = sch.get_loops(block)
    tile, chan = axes.index("p"), axes.index(channel)
    unrolled = [i for i in range(len(axes) + 2) if i not in (tile, chan)]
    outer, inner = {}, {}
    for axis in sorted((tile, chan)):
        most = layout.max_tile_factor if axis == tile else 64
        factors = sch.sample_perfect_tile(loops[axis], n=2, max_innermost_factor=most)
        outer[axis], inner[axis] = sch.split(loops[axis], factors)
    for axis in unrolled:
        sch.unroll(loops[axis])
    first, second = sorted((tile, chan))
    if layout.vectorize:
        sch.reorder(outer[first], outer[second], inner[tile], *(loops[a] for a in unrolled),
                    inner[chan])
        sch.vectorize(inner[chan])
    else:
        sch.reorder(outer[first], outer[second], inner[first], inner[second],
                    *(loops[a] for a in unrolled))
    return inner[tile]


def _data_pack_rule(layout: WinogradLayout, sch, data_pack):
    input_tile = _producer_inlining_constants(sch, data_pack)
    data_pad = _producer_inlining_constants(sch, input_tile)
    inner_tile = _tile_and_unroll(sch, data_pack, layout.data_pack, "ci", layout)
    sch.compute_at(input_tile, inner_tile, preserve_unit_loops=True)
    if layout.vectorize:
        sch.vectorize(sch.get_loops(input_tile)[-1])
    sch.compute_inline(data_pad)
    return [sch]


def _inverse_rule(layout: WinogradLayout, sch, inverse):
    _producer_inlining_constants(sch, inverse)
    _tile_and_unroll(sch, inverse, layout.inverse, "co", layout)
    return [sch]


def _winograd_data_pack_rule(sch, data_pack):
    return _data_pack_rule(NCHW, sch, data_pack)


def _winograd_inverse_rule(sch, inverse):
    return _inverse_rule(NCHW, sch, inverse)


def _winograd_nhwc_data_pack_rule(sch, data_pack):
    return _data_pack_rule(NHWC, sch, data_pack)


def _winograd_nhwc_inverse_rule(sch, inverse):
    return _inverse_rule(NHWC, sch, inverse)


# rule name -> our CPU rule
WINOGRAD_RULES = {WINOGRAD_DATA_PACK_RULE: _winograd_data_pack_rule,
                  WINOGRAD_INVERSE_RULE: _winograd_inverse_rule,
                  WINOGRAD_NHWC_DATA_PACK_RULE: _winograd_nhwc_data_pack_rule,
                  WINOGRAD_NHWC_INVERSE_RULE: _winograd_nhwc_inverse_rule}
for _layout in (NCHW, NHWC):
    for _ours, _stage_name in ((_layout.data_pack_rule, "data_pack"),
                               (_layout.inverse_rule, "inverse")):
        tvm_ffi.register_global_func(f"s_tir.meta_schedule.cpu.{_ours}", WINOGRAD_RULES[_ours],
                                     override=True)
        tvm_ffi.register_global_func(
            f"s_tir.meta_schedule.cuda.{_ours}",
            tvm.get_global_func(f"s_tir.meta_schedule.cuda.conv2d_{_layout.tvm}_winograd_"
                                f"{_stage_name}"), override=True)
