"""The sparse data format: which weights it takes and how it stores them.

A pruned weight [O, I/g, kh, kw] is read as a matrix [O, I*kh*kw] (groups become a
block-diagonal matrix whose zeros cost nothing) and stored as CSR (`algo.block: 1x1`) or BSR
(`4x1`, ...: row blocks share each input load across output channels, which is why they pay
off even though they store some zeros). `sparse_weight` is the one check of what the sparse
kernels take (float32, a constant weight, static NCHW/OIHW shapes; for a plan, enough zeros),
asked by the sparse lowering before it claims a conv and by the kernels' entry point.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import relax

from ..contract import BLOCKS, CannotExpress, Conv, constant_array

__all__ = ["BlockShape", "SparseMatrix", "sparsity", "to_sparse", "conv_weight_to_sparse",
           "kernel_arrays", "element_columns", "block_shape", "sparse_weight", "check_dtypes",
           "constant_weight", "check_sparsity"]


@dataclass(frozen=True)
class BlockShape:
    """BSR block over (output channel, flattened ic*kh*kw); (1, 1) is CSR. Row blocks share the
    loads of the input, which is why they pay off even though they store some zeros."""
    rows: int = 1
    cols: int = 1

    def __post_init__(self):
        if self.rows < 1 or self.cols < 1:
            raise ValueError(f"block shape must be positive, got {self.rows}x{self.cols}")


# `algo.block`: rows x columns of the [out, in*kh*kw] weight matrix
for _name in ("1x1", "2x1", "4x1", "8x1", "16x1", "1x4", "2x2", "4x4"):
    _rows, _cols = _name.split("x")
    BLOCKS.register(_name, BlockShape(int(_rows), int(_cols)),
                    label="CSR" if _name == "1x1" else f"BSR {_name}")


def block_shape(text: str) -> BlockShape:
    """`algo.block` ("4x1": 4 rows, 1 column) as a BlockShape; BadInput listing the allowed."""
    return BLOCKS.lookup(text)


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


def kernel_arrays(sm: SparseMatrix, offsets: np.ndarray, indptr: np.ndarray,
                  order: np.ndarray | None = None) -> list[np.ndarray]:
    """Constants for the kernels: data [B, rows, cols], per-element input offsets [B, cols] (the
    column indices already translated to where that column lives in the kernel's input buffer)
    and the kernel's indptr (the matrix's, or finer: see tiling._Chunks), the blocks permuted by
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


def element_columns(sm: SparseMatrix) -> np.ndarray:
    """Column (of the unpadded matrix) of each block element [B, cols]; -1 for padding."""
    cols = sm.indices[:sm.blocks, None].astype(np.int64) * sm.block.cols + np.arange(sm.block.cols)
    return np.where(cols < sm.shape[1], cols, -1)


# --- what the sparse kernels take: the one check ------------------------------------------------

def check_dtypes(weight: str, data: str, out: str) -> None:
    """The kernels are fp32; the reason names the first other dtype (e.g. "int8")."""
    other = next((d for d in (weight, data, out) if d != "float32"), None)
    if other:
        raise CannotExpress(other)


def constant_weight(weight: relax.Expr) -> np.ndarray:
    value = constant_array(weight)
    if value is None:
        raise CannotExpress("weight not constant")
    return value


def check_sparsity(weight: np.ndarray, threshold: float) -> None:
    zeros = sparsity(weight)
    if zeros < threshold:
        raise CannotExpress(f"sparsity {zeros:.2f} < {threshold:g}")


def sparse_weight(conv: Conv, threshold: float | None = None) -> np.ndarray:
    """The conv's weight if the sparse kernels take the conv, else CannotExpress with the
    reason a plan counts, the first of: a dtype other than float32 ("int8"), "weight not
    constant", fewer zeros than `threshold` ("sparsity 0.31 < 0.5"; not checked without one),
    "dynamic shape", a layout other than NCHW/OIHW ("layout NHWC/OHWI")."""
    check_dtypes(conv.weight_dtype, conv.dtype, conv.out_dtype)
    weight = constant_weight(conv.weight)
    if threshold is not None:
        check_sparsity(weight, threshold)
    conv.require_nchw()
    return weight
