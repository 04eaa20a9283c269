"""Sparse convolution and linear kernels for pruned constant weights.

TVM 0.27 ships no sparse operators, so this module writes its own, in TVMScript TIR, for the
DLAS pair "sparse direct" and "sparse im2col + GEMM" (NCHW, fp32). A conv weight
[O, I/g, kh, kw] is read as a matrix [O, I*kh*kw] (groups become a block-diagonal matrix whose
zeros cost nothing in CSR) and stored as CSR or BSR. Both kernels compute the sparse x dense
product `out[o, p] = sum_j w[o, j] * X[j, p]` over output positions p; they differ in X:

- `direct`: X is never built. The input is copied once, zero-padded and split by stride
  phase, so that each column j = (ic, kh, kw) of the weight meets a contiguous run of that copy
  for any run of output columns, at an offset computed ahead of time.
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

KERNELS = ("direct", "im2col")


@dataclass(frozen=True)
class BlockShape:
    """BSR block over (output channel, flattened ic*kh*kw); (1, 1) is CSR. Row blocks share the
    loads of the input, which is why they pay off even though they store some zeros."""
    rows: int = 1
    cols: int = 1

    def __post_init__(self):
        if self.rows < 1 or self.cols < 1:
            raise ValueError(f"block shape must be positive, got {self.rows}x{self.cols}")


@dataclass(frozen=True)
class SparseMatrix:
    """CSR/BSR matrix: `data[b]` is block b ([rows, cols]), at block column `indices[b]`; block
    row r owns blocks `indptr[r]:indptr[r + 1]`. `shape` is the unpadded [M, K]."""
    data: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray
    shape: tuple[int, int]
    block: BlockShape

    @property
    def blocks(self) -> int:
        return int(self.indptr[-1])

    @property
    def nnz(self) -> int:
        """Stored values, explicit zeros inside blocks included."""
        return self.blocks * self.block.rows * self.block.cols

    @property
    def stored_bytes(self) -> int:
        return int(self.data[:self.blocks].nbytes + self.indices[:self.blocks].nbytes
                   + self.indptr.nbytes)

    def todense(self) -> np.ndarray:
        r, c = self.block.rows, self.block.cols
        rows = len(self.indptr) - 1
        cols = -(-self.shape[1] // c)
        out = np.zeros((rows, r, cols, c), dtype=self.data.dtype)
        for br in range(rows):
            for b in range(self.indptr[br], self.indptr[br + 1]):
                out[br, :, self.indices[b], :] = self.data[b]
        return out.reshape(rows * r, cols * c)[:self.shape[0], :self.shape[1]]


def sparsity(weight: np.ndarray) -> float:
    """Fraction of exact zeros (what pruning leaves)."""
    weight = np.asarray(weight)
    return float(np.count_nonzero(weight == 0)) / max(weight.size, 1)


def _from_coo(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, shape: tuple[int, int],
              block: BlockShape) -> SparseMatrix:
    """BSR from coordinates; the last row/column block is zero-padded when the block does not
    divide the shape."""
    r, c = block.rows, block.cols
    n_brows, n_bcols = -(-shape[0] // r), -(-shape[1] // c)
    key = (rows // r).astype(np.int64) * n_bcols + cols // c
    ukeys, which = np.unique(key, return_inverse=True)
    data = np.zeros((len(ukeys), r, c), dtype=np.float32)
    data[which, rows % r, cols % c] = vals
    brow = (ukeys // n_bcols).astype(np.int64)
    indptr = np.zeros(n_brows + 1, dtype=np.int32)
    np.cumsum(np.bincount(brow, minlength=n_brows), out=indptr[1:])
    indices = (ukeys % n_bcols).astype(np.int32)
    return SparseMatrix(data, indices, indptr, (int(shape[0]), int(shape[1])), block)


def to_sparse(weight_2d: np.ndarray, block: BlockShape = BlockShape()) -> SparseMatrix:
    """CSR (block (1, 1)) or BSR of a dense [M, K] matrix; blocks holding any nonzero are kept."""
    weight_2d = np.asarray(weight_2d, dtype=np.float32)
    if weight_2d.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {weight_2d.shape}")
    rows, cols = np.nonzero(weight_2d)
    return _from_coo(rows, cols, weight_2d[rows, cols], weight_2d.shape, block)


def conv_weight_to_sparse(weight: np.ndarray, groups: int, block: BlockShape) -> SparseMatrix:
    """Conv weight [O, I/g, kh, kw] as a sparse [O, I*kh*kw] matrix: group g's columns shift to
    its own input channels, so the matrix is the full block-diagonal conv weight."""
    weight = np.asarray(weight, dtype=np.float32)
    o, ig, kh, kw = weight.shape
    og = o // groups
    oc, ic, h, w = np.nonzero(weight)
    full_ic = (oc // og) * ig + ic
    cols = (full_ic * kh + h) * kw + w
    return _from_coo(oc, cols, weight[oc, ic, h, w], (o, ig * groups * kh * kw), block)


def _kernel_arrays(sm: SparseMatrix, offsets: np.ndarray, indptr: np.ndarray,
                   order: np.ndarray | None = None) -> list[np.ndarray]:
    """Constants for the kernels: data [B, rows, cols], per-element input offsets [B, cols] (the
    column indices already translated to where that column lives in the kernel's input buffer)
    and the kernel's indptr (the matrix's, or finer: see _Chunks), the blocks permuted by
    `order` if given. An empty matrix keeps one unreferenced zero block (no zero-size
    constants)."""
    data = sm.data[:sm.blocks]
    if order is not None:
        data, offsets = data[order], offsets[order]
    if sm.blocks == 0:
        data = np.zeros((1, sm.block.rows, sm.block.cols), np.float32)
        offsets = np.zeros((1, sm.block.cols), np.int32)
    return [np.ascontiguousarray(data, np.float32), np.ascontiguousarray(offsets, np.int32),
            np.ascontiguousarray(indptr, np.int32)]


def _element_columns(sm: SparseMatrix) -> np.ndarray:
    """Column (of the unpadded matrix) of each block element [B, cols]; -1 for padding."""
    cols = sm.indices[:sm.blocks, None].astype(np.int64) * sm.block.cols + np.arange(sm.block.cols)
    return np.where(cols < sm.shape[1], cols, -1)


def _mark_scheduled(func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc:
    """Hand-scheduled: MetaSchedule and dlight skip it; opaque: FuseOps leaves it alone.
    Private (no global symbol of its own), so a module can hold one kernel per layer: the
    build names each after its unique GlobalVar."""
    return func.with_attrs({"tirx.is_scheduled": True, "tir.is_scheduled": True,
                            "op_pattern": 8, "tirx.noalias": True}).without_attr("global_symbol")


# ---------------------------------------------------------------------------------------------
# target and tiling


@dataclass(frozen=True)
class Isa:
    """fp32 lanes of one vector register, and how many registers the accumulator tile may use
    (the rest hold the broadcast weight and addresses)."""
    lanes: int = 8
    acc_vectors: int = 12


def target_isa(target: tvm.target.Target | None = None) -> Isa:
    """Vector shape for `target` (default: the current one; AVX2 when there is none, which
    is safe on any x86-64 with AVX2 and still correct, only slower, elsewhere)."""
    target = target or tvm.target.Target.current(allow_none=True)
    if target is None or target.kind.name != "llvm":
        return Isa()
    try:
        from tvm.target.codegen import target_has_features
        if target_has_features("avx512f", target):
            return Isa(16, 24)
        if target_has_features("avx2", target):
            return Isa(8, 12)
    except Exception:  # noqa: BLE001 - non-x86 targets have no such features to ask about
        return Isa(4, 24)
    return Isa(4, 12)


@dataclass(frozen=True)
class Tiles:
    """Output positions handled by one accumulator tile: `k` output rows x `cw` columns starting
    at column min(ct * cw, ow - cw) (column tiles overlap instead of having a ragged tail);
    `n_rt` x `n_ct` tiles. Within the tile, row i starts at lane i * (the input's row length);
    `nv` vectors hold it."""
    k: int
    cw: int
    n_rt: int
    n_ct: int
    nv: int


_TILE_OVERHEAD = 2  # per nonzero and tile: weight broadcast, offset load, loop (in vector ops)


def plan_tiles(oh: int, ow: int, row: int, rows: int, isa: Isa) -> Tiles:
    """Cheapest tiling by vector operations per stored weight: several whole output rows per
    tile (their input runs are `row` lanes apart; the lanes in between are computed and
    dropped), or single rows cut into column segments of whole vectors."""
    budget = max(1, isa.acc_vectors // rows)
    lanes = isa.lanes
    best = None
    for k in range(1, oh + 1):
        nv = -(-((k - 1) * row + ow) // lanes)
        if nv > budget:
            break
        n_rt = -(-oh // k)
        cost = n_rt * (nv + _TILE_OVERHEAD)
        if best is None or cost <= best[0]:
            best = (cost, Tiles(k, ow, n_rt, 1, nv))
    for m in range(1, budget + 1):
        if m * lanes > ow:
            break
        n_ct = -(-ow // (m * lanes))
        cost = oh * n_ct * (m + _TILE_OVERHEAD)
        if best is None or cost < best[0]:
            best = (cost, Tiles(1, m * lanes, oh, n_ct, m))
    return best[1]


# ---------------------------------------------------------------------------------------------
# conv geometry


@dataclass(frozen=True)
class ConvShape:
    n: int
    ic: int
    h: int
    w: int
    oc: int
    kh: int
    kw: int
    stride: tuple[int, int]
    padding: tuple[int, int, int, int]  # top, left, bottom, right
    dilation: tuple[int, int]
    groups: int

    @property
    def out_hw(self) -> tuple[int, int]:
        (sh, sw), (dh, dw) = self.stride, self.dilation
        pt, pl, pb, pr = self.padding
        oh = (self.h + pt + pb - dh * (self.kh - 1) - 1) // sh + 1
        ow = (self.w + pl + pr - dw * (self.kw - 1) - 1) // sw + 1
        return oh, ow


def _ints(values) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


def constant_array(expr: relax.Expr) -> np.ndarray | None:
    """The value of a relax constant (0.27: `tvm.ir.GenericConst`), or None."""
    if isinstance(expr, tvm.ir.GenericConst) and hasattr(expr.value, "numpy"):
        return expr.value.numpy()
    return None


def static_shape(expr: relax.Expr) -> tuple[int, ...]:
    shape = getattr(expr.ty, "shape", None)
    values = getattr(shape, "values", None)
    if values is None or not all(isinstance(d, tvm.tirx.IntImm) for d in values):
        raise NotImplementedError(f"sparse kernels need a static shape, got {expr.ty}")
    return _ints(values)


def conv_shape(call: relax.Call) -> ConvShape:
    """Static geometry of a `relax.nn.conv2d` call; raises NotImplementedError for what the
    sparse kernels do not cover (layouts other than NCHW/OIHW, dtypes other than fp32)."""
    attrs = call.attrs
    if attrs.data_layout != "NCHW" or attrs.kernel_layout != "OIHW" or (
            attrs.out_layout not in (None, "", "NCHW")):
        raise NotImplementedError(f"sparse conv needs NCHW/OIHW, got {attrs.data_layout}/"
                                  f"{attrs.kernel_layout}/{attrs.out_layout}")
    x, weight = call.args
    weight = constant_array(weight)
    if weight is None:
        raise NotImplementedError("sparse conv needs a constant weight")
    if x.ty.dtype != "float32" or weight.dtype != np.float32 or str(
            attrs.out_dtype) not in ("", "None", "void", "float32"):
        raise NotImplementedError("sparse conv supports float32 only")
    n, ic, h, w = static_shape(x)
    oc, _, kh, kw = weight.shape
    padding = _ints(attrs.padding)
    if len(padding) == 2:
        padding = padding * 2
    shape = ConvShape(n, ic, h, w, int(oc), int(kh), int(kw), _ints(attrs.strides), padding,
                      _ints(attrs.dilation), int(attrs.groups))
    if min(shape.out_hw) < 1:
        raise ValueError(f"conv has an empty output: {shape}")
    return shape


# ---------------------------------------------------------------------------------------------
# kernels


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


@dataclass(frozen=True)
class _PhaseSplit:
    """The input, zero-padded and split by stride phase: buf[n, ic, ph, pw, hq, wq]. Output
    (oh, ow) of tap (kh, kw) reads row oh + DH*kh//SH, column ow + DW*kw//SW of phase
    (DH*kh%SH, DW*kw%SW), so for any stride one tap over a run of output columns is one
    contiguous run of the copy. Only phase (0, 0) is kept (`nph` = `npw` = 1) when no tap
    reads another (1x1 convs of any stride): a quarter of the copying at stride 2. Each
    image's copy is followed by zeros: slack for the tail tile's over-read and the run that BSR
    padding columns point to (at `zoff`). `lo`, `hi`: the columns of phase column 0 that lie
    inside the image."""
    hq: int
    wq: int
    zoff: int
    size: int
    nph: int
    npw: int
    lo: int
    hi: int

    @staticmethod
    def plan(s: ConvShape, out_rows: int, overread: int) -> "_PhaseSplit":
        """For kernels reading `out_rows` output rows (tail tile included) and up to
        `overread` lanes past a row start."""
        (sh, sw), (dh, dw) = s.stride, s.dilation
        pt, pl, pb, pr = s.padding
        hq, wq = -(-(s.h + pt + pb) // sh), -(-(s.w + pl + pr) // sw)
        nph = 1 if all(dh * k % sh == 0 for k in range(s.kh)) else sh
        npw = 1 if all(dw * k % sw == 0 for k in range(s.kw)) else sw
        zoff = s.ic * nph * npw * hq * wq
        size = zoff + (out_rows + 1 + (dh * (s.kh - 1)) // sh) * wq + overread
        lo = min(wq, max(0, (pl + sw - 1) // sw))
        return _PhaseSplit(hq, wq, zoff, size, nph, npw, lo,
                           max(lo, min(wq, (s.w + pl + sw - 1) // sw)))

    def source(self, s: ConvShape, ic, kh, kw):
        """Offset of tap (kh, kw) of input channel `ic` in one image's copy (numpy or TIR)."""
        (sh, sw), (dh, dw) = s.stride, s.dilation
        phase = (ic * self.nph + (dh * kh) % sh) * self.npw + (dw * kw) % sw
        return (phase * self.hq + (dh * kh) // sh) * self.wq + (dw * kw) // sw

    def offsets(self, s: ConvShape, col: np.ndarray) -> np.ndarray:
        """Where column ic*kh*kw of the weight matrix starts in one image's copy (-1: zeros)."""
        ic, rest = np.divmod(np.maximum(col, 0), s.kh * s.kw)
        kh, kw = np.divmod(rest, s.kw)
        return np.where(col >= 0, self.source(s, ic, kh, kw), self.zoff).astype(np.int32)


@T.macro
def _phase_split(x, buf, n_img, ic, h, w, sh, sw, hq, wq, pt, pl, size, zoff, nph, npw, lo0,
                 hi0):
    """Fill buf (see _PhaseSplit), one (image, channel, phase) plane per parallel task. With
    one column phase the row's inside columns are known here (`lo0`, `hi0`) and copied as
    vectors; otherwise element by element."""
    for task in T.parallel(n_img * ic * nph * npw):
        ph = T.Bind((task // npw) % nph)
        pw = T.Bind(task % npw)
        nc = T.Bind(task // (nph * npw))
        for qh in range(hq):
            hh = T.Bind(qh * sh + ph - pt)
            dst = T.Bind((nc // ic) * size + task % (ic * nph * npw) * (hq * wq) + qh * wq)
            if 0 <= hh and hh < h:
                if npw == 1:
                    if lo0 > 0:
                        for q in T.vectorized(lo0):
                            buf[dst + q] = T.float32(0)
                    for q in T.vectorized(hi0 - lo0):
                        buf[dst + lo0 + q] = x[nc // ic, nc % ic, hh, (lo0 + q) * sw - pl]
                    if wq > hi0:
                        for q in T.vectorized(wq - hi0):
                            buf[dst + hi0 + q] = T.float32(0)
                else:
                    lo = T.Bind(T.min(wq, T.max(0, (pl - pw + sw - 1) // sw)))
                    hi = T.Bind(T.max(lo, T.min(wq, (w + pl - pw + sw - 1) // sw)))
                    for q in range(lo):
                        buf[dst + q] = T.float32(0)
                    for q in range(hi - lo):
                        buf[dst + lo + q] = x[nc // ic, nc % ic, hh, (lo + q) * sw + pw - pl]
                    for q in range(wq - hi):
                        buf[dst + hi + q] = T.float32(0)
            else:
                for q in T.vectorized(wq):
                    buf[dst + q] = T.float32(0)
    for n, q in T.grid(n_img, size - zoff):
        buf[n * size + zoff + q] = T.float32(0)


def _entry(body, x_shape: tuple, n_blocks: int, block: BlockShape, n_ptr: int,
           out_shape: tuple, residual: bool, flat: bool = False) -> tvm.tirx.PrimFunc:
    """A conv kernel's PrimFunc around `body(x, data, offs, indptr, bias, res, out)`:
    parameters x, data, offs, indptr, bias, [residual,] out (`res` None without one; with
    `flat`, the residual seen as one dimension)."""
    NB, R, C, O = n_blocks, block.rows, block.cols, out_shape[1]
    SIZE = int(np.prod(out_shape))

    @T.prim_func
    def with_residual(x: T.Buffer(x_shape, "float32"), data: T.Buffer((NB, R, C), "float32"),
                      offs: T.Buffer((NB, C), "int32"), indptr: T.Buffer((n_ptr,), "int32"),
                      bias: T.Buffer((O,), "float32"), res: T.Buffer(out_shape, "float32"),
                      out: T.Buffer(out_shape, "float32")):
        if flat:
            res_flat = T.decl_buffer((SIZE,), "float32", data=res.data)
            body(x, data, offs, indptr, bias, res_flat, out)
        else:
            body(x, data, offs, indptr, bias, res, out)

    @T.prim_func
    def without(x: T.Buffer(x_shape, "float32"), data: T.Buffer((NB, R, C), "float32"),
                offs: T.Buffer((NB, C), "int32"), indptr: T.Buffer((n_ptr,), "int32"),
                bias: T.Buffer((O,), "float32"), out: T.Buffer(out_shape, "float32")):
        body(x, data, offs, indptr, bias, None, out)

    return _mark_scheduled(with_residual if residual else without)


# Bytes of L1 the direct kernel's working set should fit in: one chunk of input channels (the
# rows one output row tile reads) plus its group's partial sums. Reads from L2 instead of L1
# made the 3x3 convs of a 90%-pruned resnet18 1.3-1.5x slower.
L1_BYTES = 40 * 1024
# Fewest stored blocks per block row and chunk worth a chunk: each chunk costs a load and a
# store of the partial sums per tile. Measured on resnet18's convs (90% and 70% pruned): chunks
# of 5-14 blocks made them 5-50% slower, of 16 or more 7-20% faster.
MIN_CHUNK_BLOCKS = 16


@dataclass(frozen=True)
class _Chunks:
    """Input channels split into `n` chunks of `per` channels; the output block rows run in
    groups of `group`, each group walking one chunk's nonzeros (which all read the same few KB
    of input, kept in L1) for all its rows before the next chunk, keeping partial sums in
    memory between chunks."""
    per: int
    n: int
    group: int

    @staticmethod
    def plan(s: ConvShape, rows_read: int, wq: int, tile_bytes: int, block_rows: int,
             n_blocks: int) -> "_Chunks":
        """`rows_read` phase rows of `wq` floats per input channel and phase for one row tile;
        `tile_bytes` of partial sums per block row. Grouped convs walk only their own
        channels, so chunking would buy them nothing."""
        group = min(16, max(1, block_rows // 8))  # at least 8 groups: work for every core
        per_channel = s.stride[0] * s.stride[1] * rows_read * wq * 4
        per = max(1, (L1_BYTES - group * tile_bytes) // per_channel)
        n = min(-(-s.ic // per), n_blocks // (block_rows * MIN_CHUNK_BLOCKS))
        if s.groups > 1 or n <= 1:
            return _Chunks(s.ic, 1, 1)
        per = -(-s.ic // n)
        return _Chunks(per, -(-s.ic // per), group)

    def pointers(self, sm: SparseMatrix, kh: int, kw: int) -> tuple[np.ndarray | None, np.ndarray]:
        """The blocks in the order the kernel walks them, as a permutation of the matrix's
        (None: unchanged), and indptr over slots (row group, chunk, row in group): slot
        (g * n + c) * group + m owns blocks ptr[slot]:ptr[slot + 1]. Each thread then reads its
        weights as one sequential stream (short jumping runs left the 5.7 MB of a 70%-pruned
        stage-4 conv of resnet18 waiting on memory). A block belongs to its first column's
        chunk; within a slot the blocks keep their column order."""
        rows = len(sm.indptr) - 1
        if self.n == 1:
            return None, sm.indptr
        brow = np.repeat(np.arange(rows), np.diff(sm.indptr))
        chunk = (sm.indices[:sm.blocks].astype(np.int64) * sm.block.cols) // (kh * kw) // self.per
        slot = ((brow // self.group) * self.n + np.minimum(chunk, self.n - 1)) * self.group \
            + brow % self.group
        slots = -(-rows // self.group) * self.n * self.group
        ptr = np.zeros(slots + 1, np.int32)
        np.cumsum(np.bincount(slot, minlength=slots), out=ptr[1:])
        return np.argsort(slot, kind="stable"), ptr


def _direct_func(s: ConvShape, block: BlockShape, n_blocks: int, isa: Isa,
                 epi: Epilogue = Epilogue()):
    """Sparse direct conv: no im2col; each stored weight multiplies a contiguous run of the
    phase-split input at a precomputed offset. Groups of block rows run in parallel; each walks
    its nonzeros once per position tile and input-channel chunk (see _Chunks), accumulating in
    registers. Parameters: x, data, offs, indptr, bias, [residual,] out."""
    N, IC, H, W, O = s.n, s.ic, s.h, s.w, s.oc
    OH, OW = s.out_hw
    (SH, SW), PT, PL = s.stride, s.padding[0], s.padding[1]
    R, C, L = block.rows, block.cols, isa.lanes
    MB, NB = -(-O // R), max(n_blocks, 1)
    WQ0 = -(-(W + PL + s.padding[3]) // SW)
    t = plan_tiles(OH, OW, WQ0, R, isa)
    K_ROWS, CW, N_RT, N_CT, NV = t.k, t.cw, t.n_rt, t.n_ct, t.nv
    p = _PhaseSplit.plan(s, N_RT * K_ROWS, NV * L)
    HQ, WQ, ZOFF, XS = p.hq, p.wq, p.zoff, p.size
    TILE = R * NV * L
    ch = _Chunks.plan(s, -(-(NV * L) // WQ) + (s.dilation[0] * (s.kh - 1)) // SH + 1, WQ,
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
        order, ptr = ch.pointers(sm, s.kh, s.kw)
        return p.offsets(s, _element_columns(sm)), ptr, order

    return _entry(body, (N, IC, H, W), NB, block, NG * NCH * G + 1, (N, O, OH, OW),
                  epi.residual), index_arrays


# Bytes of one im2col panel: it should stay in L2 while every block row reads it.
PANEL_BYTES = 256 * 1024


def _im2col_func(s: ConvShape, block: BlockShape, n_blocks: int, isa: Isa,
                 epi: Epilogue = Epilogue()):
    """Sparse im2col + GEMM. The explicit im2col matrix [KP, P] (row ic*kh*kw, column: output
    position, packed as in the output) is built one panel of `K_P` whole output rows at a time
    from the phase-split input (plain row copies), then every block row multiplies the panel
    in register tiles of NV vectors: each stored weight reads aligned panel rows, and the
    panel stays in L2 for all output channels. Tiles are stored straight into the output,
    whose packed positions they are. Parameters as _direct_func's."""
    N, IC, H, W, O, KH, KW = s.n, s.ic, s.h, s.w, s.oc, s.kh, s.kw
    OH, OW = s.out_hw
    (SH, SW), (DH, DW) = s.stride, s.dilation
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
        col = _element_columns(sm)      # padding columns read the zero rows KK.. of the panel
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
        col = _element_columns(sm)
        return (np.where(col >= 0, col, k) * VP).astype(np.int32), sm.indptr

    return _mark_scheduled(sparse_linear), index_arrays


# ---------------------------------------------------------------------------------------------
# relax entry points


def emit_conv(bb: relax.BlockBuilder, call: relax.Call, kernel: str,
              block: BlockShape = BlockShape(), bias: np.ndarray | None = None,
              residual: relax.Expr | None = None, relu: bool = False) -> relax.Expr:
    """Lower one NCHW fp32 `relax.nn.conv2d` with a constant weight to a sparse kernel: adds the
    PrimFunc to `bb`'s module and returns the `R.call_tir` (input + index arrays as constants).
    The kernel also adds `bias` ([out channels]) and `residual` (shaped as the output) and
    applies ReLU if asked, as it stores (see Epilogue). The vector width follows the current
    target (AVX2 when none is set)."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown sparse kernel {kernel!r}; choose from {KERNELS}")
    s = conv_shape(call)
    oh, ow = s.out_hw
    out_shape = (s.n, s.oc, oh, ow)
    bias = np.zeros(s.oc, np.float32) if bias is None else np.asarray(bias, np.float32)
    if bias.size != s.oc:
        raise ValueError(f"bias has {bias.size} values for {s.oc} output channels")
    if residual is not None and (static_shape(residual) != out_shape
                                 or residual.ty.dtype != "float32"):
        raise NotImplementedError(f"residual {residual.ty} is not the output {out_shape} fp32")
    sm = conv_weight_to_sparse(constant_array(call.args[1]), s.groups, block)
    build = _direct_func if kernel == "direct" else _im2col_func
    func, index_arrays = build(s, block, sm.blocks, target_isa(),
                               Epilogue(residual is not None, relu))
    gv = bb.add_func(func, f"sparse_conv2d_{kernel}")
    consts = [relax.const(a) for a in _kernel_arrays(sm, *index_arrays(sm))]
    inputs = [call.args[0], *consts, relax.const(bias.reshape(-1))]
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
    consts = [relax.const(a) for a in _kernel_arrays(sm, *index_arrays(sm))]
    return relax.call_tir(gv, [x, *consts], relax.TensorType((batch, o), "float32"))
