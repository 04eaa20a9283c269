"""The sparse conv and linear kernels, in TVMScript TIR, and their Relax entry points.

TVM 0.27 ships no sparse operators, so these are our own, for the DLAS pair "sparse direct"
and "sparse im2col + GEMM" (NCHW, fp32) over the CSR/BSR weights of formats.py. Both conv
kernels compute the sparse x dense product `out[o, p] = sum_j w[o, j] * X[j, p]` over output
positions p; they differ in X:

- `direct`: X is never built. The input is copied once, zero-padded and split by stride
  phase, so that each column j = (ic, kh, kw) of the weight meets a contiguous run of that copy
  for any run of output columns, at an offset computed ahead of time (tiling._PhaseSplit).
- `im2col`: X is materialised (explicit im2col, one L2-sized panel of output rows at a time),
  then multiplied; each weight then reads aligned panel rows.

The schedule is written by hand: block rows (output channels) run in parallel; each task keeps
a register tile of `block.rows` output channels x a few vectors of output positions, walks the
block row's stored weights once per tile and issues one broadcast and one vector
multiply-add per vector of the tile (a BSR row block shares each input load across its rows).
The arrays reach the kernel as `relax.const` arguments of `R.call_tir`, not as code: data
[blocks, rows, cols], the column indices translated to input offsets [blocks, cols], indptr.
The PrimFuncs carry `tirx.is_scheduled` (MetaSchedule finds no design space in them, dlight
skips them) and `op_pattern` opaque (FuseOps leaves them unfused).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax
from tvm.script import tirx as T

from ..contract import CannotExpress, Conv, _ints
from .formats import (BlockShape, SparseMatrix, conv_weight_to_sparse, element_columns,
                      kernel_arrays, sparse_weight, to_sparse)
from .tiling import Isa, _Chunks, _phase_split, _PhaseSplit, plan_tiles, target_isa

__all__ = ["KERNELS", "Epilogue", "emit_conv", "emit_linear", "static_shape", "PANEL_BYTES"]

KERNELS = ("direct", "im2col")


def _mark_scheduled(func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc:
    """Hand-scheduled: MetaSchedule and dlight skip it; opaque: FuseOps leaves it alone.
    Private (no global symbol of its own), so a module can hold one kernel per layer: the
    build names each after its unique GlobalVar."""
    return func.with_attrs({"tirx.is_scheduled": True, "tir.is_scheduled": True,
                            "op_pattern": 8, "tirx.noalias": True}).without_attr("global_symbol")



def static_shape(expr: relax.Expr) -> tuple[int, ...]:
    shape = getattr(expr.ty, "shape", None)
    values = getattr(shape, "values", None)
    if values is None or not all(isinstance(d, tvm.tirx.IntImm) for d in values):
        raise NotImplementedError(f"sparse kernels need a static shape, got {expr.ty}")
    return _ints(values)


@dataclass(frozen=True)
class Epilogue:
    """What follows a conv in the model, applied as each output is stored: + bias[o] (always;
    zeros when the model has none), + residual[n, o, h, w] (a kernel input), then max(., 0).
    Each saves a pass over the output after the kernel."""
    residual: bool = False
    relu: bool = False


def _epilogue(value, bias, o, res, at, relu: bool):
    """The stored value of output channel `o` (TIR, built at parse time): + bias, + `res[at]`
    (`res` None: no residual input), ReLU."""
    value = value + bias[o]
    if res is not None:
        value = value + res[at]
    return T.max(value, T.float32(0)) if relu else value


@T.macro
def _accumulate(acc, buf, data, offs, indptr, brow, base, rows, cols, nv, lanes):
    """acc[rows, nv, lanes] = sum over block row `brow`'s blocks of weight x the input run at
    base + offset: one broadcast and `nv` vector multiply-adds per stored weight."""
    for r in T.unroll(rows):
        for u in T.unroll(nv):
            for v in T.vectorized(lanes):
                acc[r, u, v] = T.float32(0)
    for j in range(indptr[brow], indptr[brow + 1]):
        for c in T.unroll(cols):
            off = T.Bind(base + offs[j, c])
            for r in T.unroll(rows):
                for u in T.unroll(nv):
                    for v in T.vectorized(lanes):
                        acc[r, u, v] = acc[r, u, v] + data[j, r, c] * buf[off + u * lanes + v]


@T.macro
def _to_tile(acc, tile, rows, nv, lanes):
    """The accumulators as rows of nv * lanes floats, for stores that start mid-vector."""
    for r in T.unroll(rows):
        for u in T.unroll(nv):
            for v in T.vectorized(lanes):
                tile[r, u * lanes + v] = acc[r, u, v]


def _entry(body, x_shape: tuple, n_blocks: int, block: BlockShape, n_ptr: int,
           out_shape: tuple, residual: bool, flat: bool = False) -> tvm.tirx.PrimFunc:
    """A conv kernel's PrimFunc around `body(x, data, offs, indptr, bias, res, out)`:
    parameters x, data, offs, indptr, bias, [residual,] out (`res` None without one; with
    `flat`, the residual seen as one dimension)."""
    NB, R, C, O = n_blocks, block.rows, block.cols, out_shape[1]
    SIZE = int(np.prod(out_shape))

    # only the variant asked for is written: TVMScript parses a PrimFunc where it is defined,
    # 0.15 s a kernel (most of a sparse model's lowering: 59 convs in densenet121)
    if residual:
        @T.prim_func
        def kernel(x: T.Buffer(x_shape, "float32"), data: T.Buffer((NB, R, C), "float32"),
                   offs: T.Buffer((NB, C), "int32"), indptr: T.Buffer((n_ptr,), "int32"),
                   bias: T.Buffer((O,), "float32"), res: T.Buffer(out_shape, "float32"),
                   out: T.Buffer(out_shape, "float32")):
            if flat:
                res_flat = T.decl_buffer((SIZE,), "float32", data=res.data)
                body(x, data, offs, indptr, bias, res_flat, out)
            else:
                body(x, data, offs, indptr, bias, res, out)
    else:
        @T.prim_func
        def kernel(x: T.Buffer(x_shape, "float32"), data: T.Buffer((NB, R, C), "float32"),
                   offs: T.Buffer((NB, C), "int32"), indptr: T.Buffer((n_ptr,), "int32"),
                   bias: T.Buffer((O,), "float32"), out: T.Buffer(out_shape, "float32")):
            body(x, data, offs, indptr, bias, None, out)

    return _mark_scheduled(kernel)


def _direct_func(s: Conv, block: BlockShape, n_blocks: int, isa: Isa,
                 epi: Epilogue = Epilogue()):
    """Sparse direct conv: no im2col; each stored weight multiplies a contiguous run of the
    phase-split input at a precomputed offset. Groups of block rows run in parallel; each walks
    its nonzeros once per position tile and input-channel chunk (see _Chunks), accumulating in
    registers. Parameters: x, data, offs, indptr, bias, [residual,] out."""
    N, IC, (H, W), O = s.batch, s.in_channels, s.input_size, s.out_channels
    (KH, KW), (OH, OW) = s.kernel, s.output_size
    (SH, SW), PT, PL = s.strides, s.padding[0], s.padding[1]
    R, C, L = block.rows, block.cols, isa.lanes
    MB, NB = -(-O // R), max(n_blocks, 1)
    WQ0 = -(-(W + PL + s.padding[3]) // SW)
    t = plan_tiles(OH, OW, WQ0, R, isa)
    K_ROWS, CW, N_RT, N_CT, NV = t.k, t.cw, t.n_rt, t.n_ct, t.nv
    p = _PhaseSplit.plan(s, N_RT * K_ROWS, NV * L)
    HQ, WQ, ZOFF, XS = p.hq, p.wq, p.zoff, p.size
    TILE = R * NV * L
    ch = _Chunks.plan(s, -(-(NV * L) // WQ) + (s.dilation[0] * (KH - 1)) // SH + 1, WQ,
                      N_CT * TILE * 4, MB, n_blocks)
    NCH, G = ch.n, ch.group
    NG = -(-MB // G)

    RELU = epi.relu

    @T.macro
    def body(x, data, offs, indptr, bias, res, out):
        buf = T.alloc_buffer((N * XS,), "float32")
        partial = T.alloc_buffer((N * NG * G * N_CT * TILE,), "float32")
        _phase_split(x, buf, N, IC, H, W, SH, SW, HQ, WQ, PT, PL, XS, ZOFF, p.nph, p.npw, p.lo,
                     p.hi)
        for task in T.parallel(N * NG):
            for rt, c, m, ct in T.grid(N_RT, NCH, G, N_CT):
                if (task % NG) * G + m < MB:
                    acc = T.alloc_buffer((R, NV, L), "float32", scope="local")
                    tile = T.alloc_buffer((R, NV * L), "float32", scope="local")
                    brow = T.Bind((task % NG) * G + m)
                    at = T.Bind(((task * G + m) * N_CT + ct) * TILE)
                    c0 = T.Bind(T.min(ct * CW, OW - CW))
                    _accumulate(acc, buf, data, offs, indptr, ((task % NG) * NCH + c) * G + m,
                                (task // NG) * XS + rt * K_ROWS * WQ + c0, R, C, NV, L)
                    if c > 0:
                        for r in T.unroll(R):
                            for u in T.unroll(NV):
                                for v in T.vectorized(L):
                                    acc[r, u, v] = acc[r, u, v] + partial[
                                        at + (r * NV + u) * L + v]
                    if c < NCH - 1:
                        for r in T.unroll(R):
                            for u in T.unroll(NV):
                                for v in T.vectorized(L):
                                    partial[at + (r * NV + u) * L + v] = acc[r, u, v]
                    else:
                        _to_tile(acc, tile, R, NV, L)
                        for r in range(R):
                            if brow * R + r < O:
                                for i in range(K_ROWS):
                                    if rt * K_ROWS + i < OH:
                                        for v in T.vectorized(CW):
                                            out[task // NG, brow * R + r, rt * K_ROWS + i,
                                                c0 + v] = _epilogue(
                                                tile[r, i * WQ + v], bias, brow * R + r, res,
                                                (task // NG, brow * R + r, rt * K_ROWS + i,
                                                 c0 + v), RELU)

    def index_arrays(sm: SparseMatrix) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        order, ptr = ch.pointers(sm, KH, KW)
        return p.offsets(s, element_columns(sm)), ptr, order

    return _entry(body, (N, IC, H, W), NB, block, NG * NCH * G + 1, (N, O, OH, OW),
                  epi.residual), index_arrays


# Bytes of one im2col panel: it should stay in L2 while every block row reads it.
PANEL_BYTES = 256 * 1024


def _im2col_func(s: Conv, block: BlockShape, n_blocks: int, isa: Isa,
                 epi: Epilogue = Epilogue()):
    """Sparse im2col + GEMM. The explicit im2col matrix [KP, P] (row ic*kh*kw, column: output
    position, packed as in the output) is built one panel of `K_P` whole output rows at a time
    from the phase-split input (plain row copies), then every block row multiplies the panel
    in register tiles of NV vectors: each stored weight reads aligned panel rows, and the
    panel stays in L2 for all output channels. Tiles are stored straight into the output,
    whose packed positions they are. Parameters as _direct_func's."""
    N, IC, (H, W), O = s.batch, s.in_channels, s.input_size, s.out_channels
    (KH, KW), (OH, OW) = s.kernel, s.output_size
    (SH, SW), (DH, DW) = s.strides, s.dilation
    PT, PL = s.padding[0], s.padding[1]
    R, C, L = block.rows, block.cols, isa.lanes
    MB, NB = -(-O // R), max(n_blocks, 1)
    KK = IC * KH * KW
    KP = -(-KK // C) * C                  # panel rows, padded to whole column blocks (zeros)
    P = OH * OW
    K_P = max(1, min(OH, PANEL_BYTES // (4 * KP * OW)))       # output rows per panel
    N_PAN = -(-OH // K_P)
    K_P = -(-OH // N_PAN)                                      # balance the panels
    VP = -(-(K_P * OW) // L) * L                               # panel width, whole vectors
    TV = VP // L
    N_SUB = -(-TV // max(1, isa.acc_vectors // R))             # register tiles per panel
    NV = -(-TV // N_SUB)
    NV_LAST = TV - (N_SUB - 1) * NV
    p = _PhaseSplit.plan(s, N_PAN * K_P, OW)
    HQ, WQ, ZOFF, XS = p.hq, p.wq, p.zoff, p.size

    RELU = epi.relu

    @T.macro
    def sub_tile(acc, tile, panel, data, offs, indptr, bias, res_flat, out_flat, n, b, pan, sub,
                 nv):
        """Multiply vectors [sub * NV, sub * NV + nv) of the panel, store to the output."""
        _accumulate(acc, panel, data, offs, indptr, b, sub * NV * L, R, C, nv, L)
        _to_tile(acc, tile, R, nv, L)
        for r in range(R):
            if b * R + r < O:
                at = T.Bind((n * O + b * R + r) * P + pan * K_P * OW + sub * NV * L)
                if pan * K_P * OW + (sub * NV + nv) * L <= P:
                    for v in T.vectorized(nv * L):
                        out_flat[at + v] = _epilogue(tile[r, v], bias, b * R + r, res_flat,
                                                     at + v, RELU)
                else:
                    for v in range(T.max(0, P - pan * K_P * OW - sub * NV * L)):
                        out_flat[at + v] = _epilogue(tile[r, v], bias, b * R + r, res_flat,
                                                     at + v, RELU)

    @T.macro
    def body(x, data, offs, indptr, bias, res_flat, out):
        buf = T.alloc_buffer((N * XS,), "float32")
        panel = T.alloc_buffer((KP * VP,), "float32")
        out_flat = T.decl_buffer((N * O * P,), "float32", data=out.data)
        _phase_split(x, buf, N, IC, H, W, SH, SW, HQ, WQ, PT, PL, XS, ZOFF, p.nph, p.npw, p.lo,
                     p.hi)
        for n, pan in T.grid(N, N_PAN):
            for kk in T.parallel(KP):
                kh = T.Bind((kk // KW) % KH)
                kw = T.Bind(kk % KW)
                src = T.Bind(n * XS + pan * K_P * WQ + T.if_then_else(
                    kk < KK, p.source(s, kk // (KH * KW), kh, kw), ZOFF))
                for i in range(K_P):
                    for v in T.vectorized(OW):
                        panel[kk * VP + i * OW + v] = buf[src + i * WQ + v]
                if VP > K_P * OW:
                    for v in T.vectorized(VP - K_P * OW):
                        panel[kk * VP + K_P * OW + v] = T.float32(0)
            for b in T.parallel(MB):
                acc = T.alloc_buffer((R, NV, L), "float32", scope="local")
                tile = T.alloc_buffer((R, NV * L), "float32", scope="local")
                for sub in range(N_SUB - 1):
                    sub_tile(acc, tile, panel, data, offs, indptr, bias, res_flat, out_flat, n, b,
                             pan, sub, NV)
                sub_tile(acc, tile, panel, data, offs, indptr, bias, res_flat, out_flat, n, b,
                         pan, N_SUB - 1, NV_LAST)

    def index_arrays(sm: SparseMatrix) -> tuple[np.ndarray, np.ndarray]:
        col = element_columns(sm)      # padding columns read the zero rows KK.. of the panel
        return (np.where(col >= 0, col, KK) * VP).astype(np.int32), sm.indptr

    return _entry(body, (N, IC, H, W), NB, block, MB + 1, (N, O, OH, OW),
                  epi.residual, flat=True), index_arrays


def _linear_func(batch: int, k: int, o: int, block: BlockShape, n_blocks: int, isa: Isa):
    """y[b, o]: the batch plays the output positions (x is transposed into [KP, VP] panels)."""
    R, C, L = block.rows, block.cols, isa.lanes
    MB, NB = -(-o // R), max(n_blocks, 1)
    KP = -(-k // C) * C
    NV = min(max(1, isa.acc_vectors // R), -(-batch // L))
    VP = NV * L
    N_PC = -(-batch // VP)

    @T.prim_func
    def sparse_linear(x: T.Buffer((batch, k), "float32"),
                      data: T.Buffer((NB, R, C), "float32"),
                      offs: T.Buffer((NB, C), "int32"),
                      indptr: T.Buffer((MB + 1,), "int32"),
                      out: T.Buffer((batch, o), "float32")):
        buf = T.alloc_buffer((N_PC * KP * VP,), "float32")
        for kk in T.parallel(KP):
            for pc, v in T.grid(N_PC, VP):
                buf[(pc * KP + kk) * VP + v] = T.if_then_else(
                    kk < k and pc * VP + v < batch, x[pc * VP + v, kk], T.float32(0))
        for b in T.parallel(MB):
            for pc in range(N_PC):
                acc = T.alloc_buffer((R, NV, L), "float32", scope="local")
                tile = T.alloc_buffer((R, VP), "float32", scope="local")
                _accumulate(acc, buf, data, offs, indptr, b, pc * KP * VP, R, C, NV, L)
                _to_tile(acc, tile, R, NV, L)
                for r, v in T.grid(R, VP):
                    if b * R + r < o and pc * VP + v < batch:
                        out[pc * VP + v, b * R + r] = tile[r, v]

    def index_arrays(sm: SparseMatrix) -> tuple[np.ndarray, np.ndarray]:
        col = element_columns(sm)
        return (np.where(col >= 0, col, k) * VP).astype(np.int32), sm.indptr

    return _mark_scheduled(sparse_linear), index_arrays


# --- relax entry points ------------------------------------------------------------------------

def emit_conv(bb: relax.BlockBuilder, call: relax.Call | Conv, kernel: str,
              block: BlockShape = BlockShape(), bias: np.ndarray | None = None,
              residual: relax.Expr | None = None, relu: bool = False) -> relax.Expr:
    """Lower one NCHW fp32 `relax.nn.conv2d` (the call, or its `Conv`) with a constant weight
    to a sparse kernel: adds the PrimFunc to `bb`'s module and returns the `R.call_tir` (input
    + index arrays as constants). The kernel also adds `bias` ([out channels]) and `residual`
    (shaped as the output) and applies ReLU if asked, as it stores (see Epilogue). The vector
    width follows the current target (AVX2 when none is set)."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown sparse kernel {kernel!r}; choose from {KERNELS}")
    s = call if isinstance(call, Conv) else Conv.of(call)
    try:
        weight = sparse_weight(s)
    except CannotExpress as why:
        raise NotImplementedError(f"sparse conv needs float32, a constant weight and static "
                                  f"NCHW/OIHW shapes ({why})") from None
    (oh, ow), o = s.output_size, s.out_channels
    if min(oh, ow) < 1:
        raise ValueError(f"conv has an empty output: {oh}x{ow}")
    out_shape = (s.batch, o, oh, ow)
    bias = np.zeros(o, np.float32) if bias is None else np.asarray(bias, np.float32)
    if bias.size != o:
        raise ValueError(f"bias has {bias.size} values for {o} output channels")
    if residual is not None and (static_shape(residual) != out_shape
                                 or residual.ty.dtype != "float32"):
        raise NotImplementedError(f"residual {residual.ty} is not the output {out_shape} fp32")
    sm = conv_weight_to_sparse(weight, s.groups, block)
    build = _direct_func if kernel == "direct" else _im2col_func
    func, index_arrays = build(s, block, sm.blocks, target_isa(),
                               Epilogue(residual is not None, relu))
    gv = bb.add_func(func, f"sparse_conv2d_{kernel}")
    consts = [relax.const(a) for a in kernel_arrays(sm, *index_arrays(sm))]
    inputs = [s.data, *consts, relax.const(bias.reshape(-1))]
    if residual is not None:
        inputs.append(residual)
    return relax.call_tir(gv, inputs, relax.TensorType(out_shape, "float32"))


def emit_linear(bb: relax.BlockBuilder, x: relax.Expr, weight: np.ndarray,
                block: BlockShape = BlockShape()) -> relax.Expr:
    """y = x @ weight.T for x [batch, in] fp32 and a constant pruned weight [out, in]; returns the
    `R.call_tir` (add a bias outside)."""
    weight = np.asarray(weight, dtype=np.float32)
    if x.ty.dtype != "float32" or x.ty.ndim != 2:
        raise NotImplementedError(f"sparse linear needs a 2-D float32 input, got {x.ty}")
    batch, k = static_shape(x)
    o, k_w = weight.shape
    if k != k_w:
        raise ValueError(f"input has {k} features, weight expects {k_w}")
    sm = to_sparse(weight, block)
    func, index_arrays = _linear_func(batch, k, o, block, sm.blocks, target_isa())
    gv = bb.add_func(func, "sparse_linear")
    consts = [relax.const(a) for a in kernel_arrays(sm, *index_arrays(sm))]
    return relax.call_tir(gv, [x, *consts], relax.TensorType((batch, o), "float32"))
