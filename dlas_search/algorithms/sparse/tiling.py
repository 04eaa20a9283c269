"""How a sparse conv kernel cuts its work, decided in Python before any TIR is written.

- `Isa`: the vector width and register budget of the target (`target_isa`);
- `plan_tiles`: the register tile of output positions each stored weight updates;
- `_PhaseSplit`: the input copied once, zero-padded and split by stride phase, so that one
  tap over a run of output columns reads one contiguous run (any stride); `_phase_split` is the
  TIR that fills it;
- `_Chunks`: the input channels walked in L1-sized chunks by groups of output block rows.

Each takes the conv as the one `Conv` description of the dense primitives (NCHW here).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm.script import tirx as T

from ..contract import Conv
from .formats import SparseMatrix

__all__ = ["Isa", "target_isa", "Tiles", "plan_tiles", "L1_BYTES", "MIN_CHUNK_BLOCKS"]


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
    def plan(s: Conv, out_rows: int, overread: int) -> "_PhaseSplit":
        """For kernels reading `out_rows` output rows (tail tile included) and up to
        `overread` lanes past a row start."""
        (sh, sw), (dh, dw) = s.strides, s.dilation
        (h, w), (kh, kw) = s.input_size, s.kernel
        pt, pl, pb, pr = s.padding
        hq, wq = -(-(h + pt + pb) // sh), -(-(w + pl + pr) // sw)
        nph = 1 if all(dh * k % sh == 0 for k in range(kh)) else sh
        npw = 1 if all(dw * k % sw == 0 for k in range(kw)) else sw
        zoff = s.in_channels * nph * npw * hq * wq
        size = zoff + (out_rows + 1 + (dh * (kh - 1)) // sh) * wq + overread
        lo = min(wq, max(0, (pl + sw - 1) // sw))
        return _PhaseSplit(hq, wq, zoff, size, nph, npw, lo,
                           max(lo, min(wq, (w + pl + sw - 1) // sw)))

    def source(self, s: Conv, ic, kh, kw):
        """Offset of tap (kh, kw) of input channel `ic` in one image's copy (numpy or TIR)."""
        (sh, sw), (dh, dw) = s.strides, s.dilation
        phase = (ic * self.nph + (dh * kh) % sh) * self.npw + (dw * kw) % sw
        return (phase * self.hq + (dh * kh) // sh) * self.wq + (dw * kw) // sw

    def offsets(self, s: Conv, col: np.ndarray) -> np.ndarray:
        """Where column ic*kh*kw of the weight matrix starts in one image's copy (-1: zeros)."""
        ic, rest = np.divmod(np.maximum(col, 0), s.kernel[0] * s.kernel[1])
        kh, kw = np.divmod(rest, s.kernel[1])
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
    def plan(s: Conv, rows_read: int, wq: int, tile_bytes: int, block_rows: int,
             n_blocks: int) -> "_Chunks":
        """`rows_read` phase rows of `wq` floats per input channel and phase for one row tile;
        `tile_bytes` of partial sums per block row. Grouped convs walk only their own
        channels, so chunking would buy them nothing."""
        group = min(16, max(1, block_rows // 8))  # at least 8 groups: work for every core
        per_channel = s.strides[0] * s.strides[1] * rows_read * wq * 4
        per = max(1, (L1_BYTES - group * tile_bytes) // per_channel)
        ic = s.in_channels
        n = min(-(-ic // per), n_blocks // (block_rows * MIN_CHUNK_BLOCKS))
        if s.groups > 1 or n <= 1:
            return _Chunks(ic, 1, 1)
        per = -(-ic // n)
        return _Chunks(per, -(-ic // per), group)

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

