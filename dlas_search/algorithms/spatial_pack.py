"""Spatial pack (`spatial_pack`): a blocked NCHW[c] convolution.

Input and weights are repacked so that the innermost loops run over contiguous blocks of
channels (vector lanes), TVM's classic x86 conv layout; the output is unpacked back to NCHW,
so the primitive drops into an NCHW network without a layout rewrite.
"""
from __future__ import annotations

from tvm import te

from .contract import PRIMITIVES, Primitive, pad, transform_weight

__all__ = ["SpatialPack", "BLOCK_SIZES"]

BLOCK_SIZES = (16, 8, 4, 2, 1)  # channel blocks, the largest that divides first


def _block(channels: int) -> int:
    return next(b for b in BLOCK_SIZES if channels % b == 0)


@PRIMITIVES.register("spatial_pack")
class SpatialPack(Primitive):
    """Blocked (NCHWc) convolution: the input is packed to NCHW[ic_bn]c and the weights to
    OIHW[ic_bn]i[oc_bn]o so the innermost loops run over contiguous channel blocks (vector
    lanes); the output is unpacked to NCHW. Blocks are the largest of 16/8/4/2/1 dividing the
    channels per group; depthwise convs block the channels themselves."""
    label = "spatial pack (NCHWc)"

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
            x = pad(x, (0, 0, pt, pl, 0), (0, 0, pb, pr, 0))
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
