"""Direct convolution, in NCHW (`direct`) and NHWC (`direct_nhwc`).

`direct` is TOPI's conv compute in whatever layout the conv has: what Relax lowers by default,
and since it expresses every conv, the fallback of every other primitive. `ToNHWC` is the
layout rewrite the NHWC primitives share (direct_nhwc, im2col_gemm_nhwc, winograd_nhwc): the
network converted to NHWC with OHWI weights before legalisation, so channels are innermost
and the loops over them vectorise.
"""
from __future__ import annotations

from tvm import relax, topi

from ..lowering import clip_as_min_max, fold_constants
from .contract import PRIMITIVES, CannotExpress, Primitive, transform_weight, tuning_budget

__all__ = ["Direct", "DIRECT", "ToNHWC", "DirectNHWC", "HWIO_MIN_TRIALS_PER_CONV", "hwio_weights"]

# The weight layout of an NHWC direct conv, as measured (resnet18 32x32, 1 thread, Zen 5,
# bench/ledger.py side by side with OHWI): HWIO puts the output channels innermost in the
# weights as in the output, so a tuned loop vectorised over them loads weights contiguously
# (mobilenet_v2's 96->576 1x1 conv at 224x224 tuned to 55 us so, 131 us with OHWI). But TVM's
# default loops, which every task MetaSchedule did not reach keeps, reduce over the innermost
# input channels, which OHWI keeps contiguous:
#   untuned:                   HWIO 2.2x slower in fp32, 8.1x in int8 (the regression of fd04f10)
#   tuned, 16 trials (1.5/conv): HWIO 1.6x slower in fp32, 4.1x in int8
#   tuned, 200 trials (18/conv): HWIO 3.4x faster in fp32, 1.55x slower in int8
# So HWIO only for fp32 builds tuned with at least this many trials per conv (the crossover
# lies between 1.5 and 18; 8 is not measured, it is between them).
HWIO_MIN_TRIALS_PER_CONV = 8


def hwio_weights(weight_dtype: str, trials_per_conv: float) -> bool:
    """Whether an NHWC direct conv reads HWIO weights (else OHWI, as ConvertLayout gives)."""
    return weight_dtype == "float32" and trials_per_conv >= HWIO_MIN_TRIALS_PER_CONV


@PRIMITIVES.register("direct")
class Direct(Primitive):
    """Direct convolution (TOPI's compute) in whatever layout the conv has: NCHW unless a
    rewrite changed it. Expresses every conv, so it is the fallback of all the others."""
    label = "direct (NCHW)"

    def lower(self, bb, conv):
        if conv.out_layout != conv.data_layout:
            raise CannotExpress(f"output layout {conv.out_layout}")
        weight, kernel_layout = conv.weight, conv.kernel_layout
        if (conv.data_layout, kernel_layout) == ("NHWC", "OHWI") and \
                hwio_weights(conv.weight_dtype, tuning_budget()):
            weight = transform_weight(bb, lambda w: topi.transpose(w, (1, 2, 3, 0)), weight,
                                      "weight_hwio")
            kernel_layout = "HWIO"
        return bb.call_te(topi.nn.conv, conv.data, weight, conv.strides, conv.padding,
                          conv.dilation, conv.groups, conv.data_layout, kernel_layout,
                          conv.out_dtype, primfunc_name_hint="conv2d")


DIRECT = PRIMITIVES["direct"]


class ToNHWC(Primitive):
    """The rewrite of the NHWC primitives: the network is converted to NHWC with OHWI weights
    (ConvertLayout's), except the convs an earlier lowering of the plan claims (the sparse
    ones, whose kernels are NCHW). ReLU6 becomes min/max first, which follow the conv's
    layout (see lowering.clip_as_min_max)."""

    def rewrite(self, mod, claimed=lambda call: False, lowered=None):
        nhwc, as_is = {"relax.nn.conv2d": ["NHWC", "OHWI"]}, {"relax.nn.conv2d": ["NCHW", "OIHW"]}

        def layouts(call):  # convs an earlier lowering claims (sparse ones) stay NCHW
            if getattr(call.op, "name", None) != "relax.nn.conv2d":
                return {}
            return as_is if claimed(call) else nhwc

        mod = relax.transform.ConvertLayout({}, layouts)(clip_as_min_max(mod))
        return fold_constants(mod)  # the weights' layout transform


@PRIMITIVES.register("direct_nhwc")
class DirectNHWC(ToNHWC, Direct):
    """Direct convolution in NHWC (channels innermost): the network is converted to NHWC with
    OHWI weights (ConvertLayout's), which `Direct` lowers as they are, or with HWIO weights
    (transposed at compile time) for fp32 builds tuned with enough trials (`hwio_weights`), so
    the tuned loop over output channels vectorises on both operands."""
    label = "direct (NHWC)"
    revision = 2  # 2: HWIO only where measured faster (revision 1: always; slowed most builds)
