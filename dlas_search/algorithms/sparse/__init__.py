"""The sparse data format (`algo.format: sparse`): pruned weights as CSR/BSR, our own kernels.

- formats.py: the block shapes (`algo.block`), CSR/BSR storage, and the one check of which
  convs the sparse kernels take;
- tiling.py: how a kernel cuts its work (vector ISA, register tiles, phase split, chunks);
- kernels.py: the TIR kernels (sparse direct, sparse im2col, sparse linear) and their Relax
  entry points `emit_conv` / `emit_linear`;
- lowering.py: the SparseLowering a plan puts first, its epilogue fusion, and the `sparse`
  format entry with its constraint.
"""
from .formats import (BlockShape, SparseMatrix, block_shape, conv_weight_to_sparse,
                      sparse_weight, sparsity, to_sparse)
from .kernels import KERNELS, Epilogue, emit_conv, emit_linear
from .lowering import Sparse, SparseLowering
from .tiling import Isa, target_isa

__all__ = ["BlockShape", "SparseMatrix", "block_shape", "conv_weight_to_sparse", "sparse_weight",
           "sparsity", "to_sparse", "KERNELS", "Epilogue", "emit_conv", "emit_linear", "Sparse",
           "SparseLowering", "Isa", "target_isa"]
