"""How reduced-precision models reach TVM with their arithmetic intact (used by the compiler).

TVM 0.27's PyTorch importer does not know the quantise/dequantise ops that PT2E quantisation
leaves in the graph, and mapping them to `relax.quantize`/`dequantize` alone gives fake-quant:
every conv would still compute in fp32 (measured on TVM 0.27). So the importer is given converters
that recognise the quantised pattern

    conv2d(dequantize(x_u8, sx, zx), dequantize(w_i8, sw[o], 0), bias)

and emit real integer arithmetic: the uint8 activations padded with their zero point, an
int8 x uint8 conv (or matmul) accumulating in int32, the zero-point correction
`zx * sum(w_i8[o])` (a constant after folding), then one fp32 multiply by `sx * sw[o]` and the
bias. Everything else (adds, pools, activations) runs on dequantised fp32, as in PyTorch's
reference; `quantize` stays a real rounding to uint8.

fp16 imports in fp32 (the importer hard-codes fp32 in conv/BatchNorm) and is then rewritten by
`ToMixedPrecision`: fp16 weights and activations into every conv and matmul, fp32 accumulation.
"""
from __future__ import annotations

import importlib
import re

import numpy as np
import torch
import tvm
from tvm import relax

__all__ = ["PRECISIONS", "INT8_CONVERTERS", "register_quantized_ops", "clip_as_min_max",
           "to_fp16", "arithmetic_dtypes", "fold_constants"]


PRECISIONS = ("fp32", "fp16", "int8")


def _is(node, op: str) -> bool:
    return (isinstance(node, torch.fx.Node) and node.op == "call_function"
            and str(node.target) == f"quantized_decomposed.{op}.default")


def _param(importer, value, dtype: str) -> relax.Expr:
    """A quantisation parameter: a Python number (per tensor) or a graph tensor (per channel)."""
    if isinstance(value, torch.fx.Node):
        return importer.block_builder.emit(relax.op.astype(importer.env[value], dtype))
    return relax.const(value, dtype)


def _round_half_even(bb, v):
    """torch.round: halves go to the even neighbour (relax's round takes them away from 0).
    It matters: requantised averages (pooling) land on exact halves often."""
    rounded = bb.emit(relax.op.round(v))
    half = bb.emit(relax.op.equal(relax.op.subtract(v, relax.op.floor(v)),
                                  relax.const(0.5, "float32")))
    even = bb.emit(relax.op.multiply(relax.op.round(relax.op.multiply(
        v, relax.const(0.5, "float32"))), relax.const(2.0, "float32")))
    return bb.emit(relax.op.where(half, even, rounded))


def _quantize(node, importer):
    """PyTorch's formula to the bit: clamp(round(x * (1 / scale)) + zero, qmin, qmax) with
    halves to even. (`relax.quantize` divides and rounds halves away from zero, which puts
    one value in several thousand off by one.)"""
    x, scale, zero, qmin, qmax, dtype = node.args[:6]
    dtype = str(dtype).removeprefix("torch.")
    bb = importer.block_builder
    if isinstance(scale, torch.fx.Node) or isinstance(zero, torch.fx.Node):
        return bb.emit(relax.op.quantize(importer.env[x], _param(importer, scale, "float32"),
                                         _param(importer, zero, "int32"), -1, dtype))
    scaled = bb.emit(relax.op.multiply(importer.env[x], relax.const(1.0 / scale, "float32")))
    shifted = bb.emit(relax.op.add(_round_half_even(bb, scaled),
                                   relax.const(float(zero), "float32")))
    return bb.emit(relax.op.astype(relax.op.clip(shifted, qmin, qmax), dtype))


def _dequantize(node, importer):
    per_channel = _is(node, "dequantize_per_channel")
    x, scale, zero = node.args[:3]
    return importer.block_builder.emit(relax.op.dequantize(
        importer.env[x], _param(importer, scale, "float32"), _param(importer, zero, "int32"),
        axis=node.args[3] if per_channel else -1, out_dtype="float32"))


def _integer_operands(importer, x, w):
    """(x_u8, x scale, x zero point, w_i8, w scales) when `x` and `w` are dequantised integer
    tensors with a per-tensor activation scale (PT2E's static scheme); otherwise None."""
    if not (_is(x, "dequantize_per_tensor")
            and (_is(w, "dequantize_per_channel") or _is(w, "dequantize_per_tensor"))):
        return None
    if isinstance(x.args[1], torch.fx.Node) or isinstance(x.args[2], torch.fx.Node):
        return None
    return (importer.env[x.args[0]], float(x.args[1]), int(x.args[2]),
            importer.env[w.args[0]], _param(importer, w.args[1], "float32"))


def _rescale(importer, acc, w_q, sx: float, zx: int, sw, axes: list[int], shape):
    """int32 accumulator -> fp32: subtract the zero-point correction, multiply by sx * sw."""
    bb = importer.block_builder
    correction = bb.emit(relax.op.multiply(
        relax.op.sum(relax.op.astype(w_q, "int32"), axis=axes), relax.const(zx, "int32")))
    acc = bb.emit(relax.op.subtract(acc, relax.op.reshape(correction, shape)))
    scale = bb.emit(relax.op.multiply(sw, relax.const(sx, "float32")))
    scale = bb.emit(relax.op.reshape(scale, shape))
    return bb.emit(relax.op.multiply(relax.op.astype(acc, "float32"), scale))


def _convolution(node, importer):
    args = list(node.args) + [None] * (9 - len(node.args))
    x, w, bias, stride, padding, dilation, transposed, _, groups = args
    operands = None if transposed else _integer_operands(importer, x, w)
    if operands is None or len(importer.shape_of(importer.env[x])) != 4:
        return importer._convolution(node)
    x_q, sx, zx, w_q, sw = operands
    bb = importer.block_builder
    ph, pw = (list(padding) * 2)[:2] if padding else (0, 0)
    if ph or pw:  # pad with the zero point: the integer that stands for a real 0
        x_q = bb.emit(relax.op.nn.pad(x_q, [0, 0, 0, 0, ph, ph, pw, pw], pad_value=float(zx)))
    acc = bb.emit(relax.op.nn.conv2d(x_q, w_q, strides=stride or 1, padding=0,
                                     dilation=dilation or 1, groups=groups or 1,
                                     out_dtype="int32"))
    y = _rescale(importer, acc, w_q, sx, zx, sw, [1, 2, 3], (1, -1, 1, 1))
    if bias is not None:
        y = bb.emit(relax.op.add(y, relax.op.reshape(importer.env[bias], (1, -1, 1, 1))))
    return y


def _addmm(node, importer):
    """linear as torch.export decomposes it: addmm(bias, x, permute(w))."""
    bias, x, wt = node.args[:3]
    plain = node.kwargs.get("alpha", 1) == 1 and node.kwargs.get("beta", 1) == 1
    transposed = isinstance(wt, torch.fx.Node) and str(wt.target) in (
        "aten.permute.default", "aten.t.default")
    operands = _integer_operands(importer, x, wt.args[0]) if plain and transposed else None
    if operands is None:
        return importer._addmm(node)
    x_q, sx, zx, w_q, sw = operands
    bb = importer.block_builder
    acc = bb.emit(relax.op.matmul(x_q, relax.op.permute_dims(w_q, [1, 0]), out_dtype="int32"))
    y = _rescale(importer, acc, w_q, sx, zx, sw, [1], (1, -1))
    return bb.emit(relax.op.add(y, importer.env[bias]))


INT8_CONVERTERS = {
    "quantize_per_tensor.default": _quantize,
    "dequantize_per_tensor.default": _dequantize,
    "dequantize_per_channel.default": _dequantize,
    "convolution.default": _convolution,
    "addmm.default": _addmm,
}


def register_quantized_ops() -> None:
    """The `quantized_decomposed` ops are registered by torchao; loading or exporting a
    quantised model needs them."""
    importlib.import_module("torchao.quantization.pt2e.quantize_pt2e")


@relax.expr_functor.mutator
class _ClipAsMinMax(relax.PyExprMutator):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.clip"):
            return call
        x, low, high = call.args
        dtype = str(x.ty.dtype)
        lowered = relax.op.maximum(x, relax.const(float(low.value), dtype))
        return relax.op.minimum(lowered, relax.const(float(high.value), dtype))


def clip_as_min_max(mod: tvm.IRModule) -> tvm.IRModule:
    """R.clip (ReLU6 in MobileNet/MNASNet) as minimum(maximum(x, low), high) with tensor
    bounds, in a copy of `mod`. ToMixedPrecision fails on clip's scalar (float64) bounds; and
    ConvertLayout has no layout rule for clip, so under NHWC every ReLU6 would run in NCHW
    between two transposes (70 transposes in mobilenet_v2, the tasks that dominated its tuned
    time), where min/max follow the conv's layout."""
    mod = mod.clone()
    for var, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            mod[var] = _ClipAsMinMax().visit_expr(func)
    return mod


def to_fp16(mod: tvm.IRModule) -> tvm.IRModule:
    """fp16 weights and activations into every conv and matmul, accumulation in fp32."""
    return relax.transform.ToMixedPrecision(out_dtype="float32")(clip_as_min_max(mod))


_BUFFER = re.compile(r'T\.Buffer\(\(.*?\), "(\w+)"\)')
# kernel name prefix -> kind (the sparse kernels of algorithms.sparse.SparseLowering included)
_KERNEL_KINDS = {"conv2d": "conv2d", "matmul": "matmul", "sparse_conv2d": "conv2d",
                 "sparse_linear": "matmul"}


def arithmetic_dtypes(mod: tvm.IRModule) -> dict[str, set[str]]:
    """What the compiled conv and matmul kernels compute in, read from the legalised TIR
    functions' signatures: `inputs x weights -> accumulator`, e.g. `uint8xint8->int32`. What a
    reviewer checks to see that int8 (or fp16) really computes in int8 (or fp16)."""
    found: dict[str, set[str]] = {"conv2d": set(), "matmul": set()}
    for var, func in mod.functions.items():
        kind = next((kind for prefix, kind in _KERNEL_KINDS.items()
                     if var.name_hint.startswith(prefix)), None)
        if kind is None or isinstance(func, relax.Function):
            continue
        signature = func.script().split("):\n", 1)[0]
        dtypes = _BUFFER.findall(signature)
        found[kind].add(f"{dtypes[0]}x{dtypes[1]}->{dtypes[-1]}")
    return found


def fold_constants(mod: tvm.IRModule) -> tvm.IRModule:
    """Evaluate the arithmetic on constant weights (BatchNorm folding's scale and shift, fp16
    casts, transposed linear weights, int8 weights' zero-point sums, a decomposed BatchNorm's
    broadcast scale) with numpy, then TVM's FoldConstant for anything left. FoldConstant
    alone compiles every such op with LLVM: 7 s for resnet18, 18 s for mobilenet_v2, 14 s for
    densenet121's int8 sums, most of an untuned compile; numpy gives the same bits in 0.1 s."""
    return relax.transform.FoldConstant()(_NumpyFolder(mod).run())


_ELEMENTWISE = {"relax.add": np.add, "relax.subtract": np.subtract,
                "relax.multiply": np.multiply, "relax.divide": np.divide,
                "relax.sqrt": np.sqrt, "relax.rsqrt": lambda a: 1 / np.sqrt(a),
                "relax.negative": np.negative}
# integers wrap the same in numpy and TVM for these; division (floor or truncate) may not
_INTEGER_SAFE = {"relax.add", "relax.subtract", "relax.multiply", "relax.negative"}


def _array(constant) -> np.ndarray | float:
    value = constant.value
    return value.numpy() if hasattr(value, "numpy") else value


@relax.expr_functor.mutator
class _NumpyFolder(relax.PyExprMutator):
    """Replaces a call whose arguments are all constant tensors by its value, for the
    elementwise ops, reshape, permute_dims and astype; leaves every other call alone."""

    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.mod_ = mod

    def run(self) -> tvm.IRModule:
        for gv, func in self.mod_.functions_items():
            if isinstance(func, relax.Function):
                self.builder_.update_func(gv, self.visit_expr(func))
        return relax.transform.DeadCodeElimination()(self.builder_.get())

    def _constant(self, arg):
        """The constant a variable is bound to (or the argument itself)."""
        if isinstance(arg, relax.Var):
            bound = self.lookup_binding(arg)
            if isinstance(bound, tvm.ir.expr.Constant):
                return bound
        return arg

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if not isinstance(call.op, tvm.ir.Op):
            return call
        args = [self._constant(a) for a in call.args]
        value = self._evaluate(call, args)
        if value is not None:
            return relax.const(np.ascontiguousarray(value), str(value.dtype))
        if any(a is not b for a, b in zip(args, call.args)):  # weights inline, as FoldConstant
            return relax.Call(call.op, args, call.attrs, call.ty_args, call.span)
        return call

    @staticmethod
    def _evaluate(call, args) -> np.ndarray | None:
        name = call.op.name
        if not args or not isinstance(args[0], tvm.ir.expr.Constant):
            return None
        first = _array(args[0])
        if name == "relax.reshape" and isinstance(first, np.ndarray) and \
                isinstance(call.args[1], relax.ShapeExpr):
            return first.reshape([int(s) for s in call.args[1].values])
        if not all(isinstance(a, tvm.ir.expr.Constant) for a in args):
            return None
        values = [_array(a) for a in args]
        arrays = [v for v in values if isinstance(v, np.ndarray)]
        if not arrays:
            return None
        values = [np.asarray(v, arrays[0].dtype) for v in values]
        if name in _ELEMENTWISE and len({v.dtype for v in values}) == 1 and \
                (values[0].dtype.kind == "f" or name in _INTEGER_SAFE):
            return _ELEMENTWISE[name](*values).astype(values[0].dtype)
        if name == "relax.sum" and len(values) == 1 and values[0].dtype.kind in "iu":  # exact
            axis = call.attrs.axis
            return np.sum(values[0], axis=None if axis is None else tuple(int(a) for a in axis),
                          keepdims=bool(call.attrs.keepdims), dtype=values[0].dtype)
        if name == "relax.expand_dims" and len(values) == 1:
            return np.expand_dims(values[0], tuple(int(a) for a in call.attrs.axis))
        if name == "relax.permute_dims":
            axes = call.attrs.axes
            return np.transpose(values[0], None if axes is None else [int(a) for a in axes])
        if name == "relax.astype" and len(values) == 1:
            return values[0].astype(str(call.attrs.dtype))
        return None
