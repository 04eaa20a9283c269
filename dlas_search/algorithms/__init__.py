"""Layer 4, algorithms and data formats: how each convolution is computed.

A primitive is a small class registered by the name the YAML uses (`algo.conv`):

- `direct`       direct convolution in NCHW (TOPI's compute, what Relax lowers by default);
- `direct_nhwc`  the same in NHWC (a layout rewrite before legalisation); HWIO weights for
                 well-tuned fp32 builds, OHWI otherwise;
- `im2col_gemm`  explicit im2col matrix [C/g*kh*kw, OH*OW] per image and group, then a GEMM;
- `spatial_pack` input packed to NCHW[c], weights to OIHW[i][o], a blocked conv, then unpacked;
- `winograd`     Winograd F(4x4,3x3) (F(2x2,3x3) on small outputs) for 3x3 stride-1 convs;
- `im2col_gemm_nhwc` im2col in NHWC: patches [N, OH, OW, KH, KW, C] (channels contiguous),
                 then a GEMM with HWIO weights whose result is already NHWC;
- `winograd_nhwc` Winograd in NHWC, its transforms vectorised along channels; strided convs
                 wider than 1x1 with 16 or more input channels run `im2col_gemm_nhwc`, the
                 others direct in NHWC.

A trial lowers its convs through one `Plan` (`plan(cfg)`): its `legalize_map()` hands every
`relax.nn.conv2d` to a dispatcher that tries the plan's lowerings in order and falls back to
`direct` for a conv none of them can express, counting the reason (`Plan.fallbacks`) and what
lowered each conv (`Plan.lowered`). Weight transforms (packing, G·g·Gᵀ, reshapes) are computed
at compile time when the weight is a constant (it is after import), so the kernels receive them
as constants.

`algo.format` (`dense`, `sparse`) chooses the data format: `sparse` puts a SparseLowering
first, which stores pruned weights as CSR/BSR (`algo.block`) and computes them with our own
kernels (sparse/). The space allows `sparse` only for unstructured-pruned fp32 models (the
format's `infeasible`).

One file per choice: contract.py (the registries, AlgoConfig, Conv, Primitive), plan.py,
direct.py, im2col.py, spatial_pack.py, winograd.py, sparse/. This module is their public face;
it imports every module of the package, so a new primitive is one file registering itself.
"""
# in registration order, which is the order of the names in listings and error messages:
# primitives direct .. winograd_nhwc, then the formats dense, sparse
from .contract import (BLOCKS, DEFAULT_BLOCK, DEFAULT_THRESHOLD, FORMATS, PRIMITIVES, AlgoConfig,
                       CannotExpress, Conv, Format, Primitive, schedules, transform_weight,
                       tuning_budget)
from .direct import DIRECT, Direct, DirectNHWC, ToNHWC
from .im2col import IM2COL_GEMM_NHWC, Im2colGemm, Im2colGemmNHWC
from .spatial_pack import SpatialPack
from .winograd import (WINOGRAD_RULES, Winograd, WinogradNHWC, winograd_conv, winograd_tile,
                       winograd_weight_transform)
from .plan import Dense, Plan, plan, primitive_named
from . import sparse
from .sparse import Sparse, SparseLowering, block_shape
from ..registry import discover

discover(__name__, __path__)  # a new primitive is one module here: it registers on import

__all__ = ["sparse", "BLOCKS", "DEFAULT_BLOCK", "DEFAULT_THRESHOLD", "FORMATS", "PRIMITIVES",
           "AlgoConfig", "CannotExpress", "Conv", "Format", "Primitive", "transform_weight",
           "schedules", "tuning_budget",
           "DIRECT", "Direct", "DirectNHWC", "ToNHWC", "IM2COL_GEMM_NHWC", "Im2colGemm",
           "Im2colGemmNHWC", "Dense", "Plan", "plan", "primitive_named", "Sparse",
           "SparseLowering", "block_shape", "SpatialPack", "WINOGRAD_RULES", "Winograd",
           "WinogradNHWC", "winograd_conv", "winograd_tile", "winograd_weight_transform"]
