"""im2col + GEMM, in NCHW (`im2col_gemm`) and NHWC (`im2col_gemm_nhwc`).

The input patches are copied into an explicit matrix, then one matrix product with the
reshaped weights computes the conv: memory (kh*kw copies of the input) traded for a plain
GEMM, which tiles and vectorises well where few output pixels share many weights (strided
convs deep in a network). On pruned layers both run the sparse im2col kernel.
"""
from __future__ import annotations

from tvm import te, topi

from .contract import PRIMITIVES, Primitive, pad, transform_weight
from .direct import ToNHWC

__all__ = ["Im2colGemm", "Im2colGemmNHWC", "IM2COL_GEMM_NHWC"]


@PRIMITIVES.register("im2col_gemm")
class Im2colGemm(Primitive):
    """Explicit im2col: per image and group a [C/g*kh*kw, OH*OW] matrix of input patches, then
    a GEMM with the [O, C/g*kh*kw] weight matrix (each output channel reads its group's
    patches), its [O, OH*OW] result written as NCHW. Trades memory (kh*kw copies of the
    input) for a plain matrix product."""
    label = "im2col + GEMM (NCHW)"
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
            x = pad(x, (0, 0, pt, pl), (0, 0, pb, pr))
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


@PRIMITIVES.register("im2col_gemm_nhwc")
class Im2colGemmNHWC(ToNHWC):
    """im2col in NHWC: the network converted as for `direct_nhwc`, each conv gathers its input
    patches into [N, OH, OW, KH, KW, C] (a copy of contiguous channel rows), then one GEMM
    with the [KH, KW, C, O] weights reduces over (KH, KW, C) straight into NHWC, output
    channels innermost. Where few output pixels share many weights (strided convs deep in a
    network) the GEMM tiles and vectorises far better than the direct loop nest. Grouped
    convs fall back to direct NHWC."""
    label = "im2col + GEMM (NHWC)"
    sparse_kernel = "im2col"

    def lower(self, bb, conv):
        conv.require_layout("NHWC", "OHWI")
        conv.require_ungrouped()
        n, _, _, c = conv.data_shape
        o, kh, kw, _ = conv.weight_shape
        (oh, ow), (sh, sw), (dh, dw) = conv.output_size, conv.strides, conv.dilation
        pt, pl, pb, pr = conv.padding

        def im2col(x):
            x = pad(x, (0, pt, pl, 0), (0, pb, pr, 0))
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
