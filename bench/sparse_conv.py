"""Sparse conv kernels (dlas_search.algorithms.sparse) vs dense TVM (untuned) and PyTorch, one
conv at a time.

For resnet18-like 3x3 convs, weights pruned at random (unstructured, or whole BSR-shaped
blocks with --pattern), each of sparse direct / sparse im2col in CSR and in the best of a few
BSR shapes is compiled as its own Relax module and timed with the project's protocol
(`vm.time_evaluator` median; PyTorch `F.conv2d` through the same calibrated loop), single
thread. Dense TVM is `relax.nn.conv2d` legalised to TOPI's conv2d_nchw by the default
pipeline, untuned. Prints one Markdown table; ratios are sparse / dense, lower is better.

    python bench/sparse_conv.py [--rounds 3] [--sparsity 0.5 0.7 0.9 0.95] [--pattern csr]
"""
from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch
import tvm
from tvm import relax

from dlas_search import hardware
from dlas_search.algorithms import sparse

# (name, in channels, out channels, input size, kernel, stride, padding)
CASES = [
    ("layer1 224px: 64->64 3x3 @56", 64, 64, 56, 3, 1, 1),
    ("layer2 224px: 128->128 3x3 @28", 128, 128, 28, 3, 1, 1),
    ("32px: 256->256 3x3 @4", 256, 256, 4, 3, 1, 1),
]
BSR_SHAPES = [(4, 1), (8, 1), (2, 2)]


def prune(weight: np.ndarray, amount: float, block: tuple[int, int] | None,
          rng: np.random.Generator) -> np.ndarray:
    """Zero the `amount` smallest entries (or whole row x col blocks of the [O, I*kh*kw]
    matrix, by L2 norm) of a random weight."""
    w2 = weight.reshape(weight.shape[0], -1).copy()
    if block is None:
        w2[np.abs(w2) < np.quantile(np.abs(w2), amount)] = 0
        return w2.reshape(weight.shape)
    r, c = block
    o, k = w2.shape
    norms = np.sqrt((w2.reshape(o // r, r, k // c, c) ** 2).sum(axis=(1, 3)))
    keep = norms >= np.quantile(norms, amount)
    return (w2 * np.repeat(np.repeat(keep, r, 0), c, 1)).reshape(weight.shape)


def conv_module(weight: np.ndarray, x_shape, stride: int, pad: int, lower) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(x_shape, "float32"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            call = bb.normalize(relax.op.nn.conv2d(xv, relax.const(weight), strides=stride,
                                                   padding=pad))
            out = bb.emit_output(lower(bb, call))
        bb.emit_func_output(out)
    return bb.get()


def build(mod, x: np.ndarray, target, reference: np.ndarray):
    """Compile and check against PyTorch before timing anything."""
    ex = tvm.compile(mod, target)
    out = hardware.run_tvm(ex, torch.from_numpy(x))
    err = np.abs(out - reference).max() / max(np.abs(reference).max(), 1e-6)
    if err > 1e-4:
        raise AssertionError(f"wrong result: relative error {err:.2e}")
    return ex


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.7, 0.9, 0.95])
    parser.add_argument("--pattern", default="csr", choices=["csr", "4x1", "8x1"],
                        help="prune single weights (csr) or whole blocks of that shape")
    parser.add_argument("--dense-repeat", type=int, default=3)
    args = parser.parse_args()
    hw = hardware.HardwareConfig(threads=1, warmup=2, repeat=15, min_repeat_ms=30)
    dense_hw = hardware.HardwareConfig(threads=1, warmup=1, repeat=args.dense_repeat,
                                       min_repeat_ms=0)
    device = hardware.resolve(hw)
    target = device.target
    pattern = None if args.pattern == "csr" else tuple(int(v) for v in args.pattern.split("x"))
    print(f"# {device.description}; batch 1, fp32, {args.rounds} rounds, pruning "
          f"{args.pattern}; vector {sparse.target_isa(target)}\n")
    print("| conv | sparsity | TVM dense untuned ms | PyTorch ms | direct CSR ms | "
          "direct BSR ms | im2col CSR ms | im2col BSR ms | best sparse / PyTorch | "
          "best sparse / TVM dense |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    rng = np.random.default_rng(0)
    for name, cin, cout, size, k, stride, pad in CASES:
        x = rng.standard_normal((1, cin, size, size)).astype("float32")
        dense_w = rng.standard_normal((cout, cin, k, k)).astype("float32")
        ref = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(dense_w),
                                         stride=stride, padding=pad).numpy()
        dense = build(conv_module(dense_w, x.shape, stride, pad, lambda bb, c: c), x, target, ref)
        dense_ms = hardware.time_tvm(dense, torch.from_numpy(x), dense_hw).median_ms
        for amount in args.sparsity:
            w = prune(dense_w, amount, pattern, rng)
            torch_conv = torch.nn.Conv2d(cin, cout, k, stride, pad, bias=False)
            torch_conv.weight.data = torch.from_numpy(w)
            with torch.no_grad():
                ref = torch_conv(torch.from_numpy(x)).numpy()
            variants = {(kernel, block): build(conv_module(
                w, x.shape, stride, pad,
                lambda bb, c, kernel=kernel, block=block: sparse.emit_conv(
                    bb, c, kernel, sparse.BlockShape(*block))), x, target, ref)
                for kernel in sparse.KERNELS for block in [(1, 1), *BSR_SHAPES]}
            times: dict = {key: [] for key in variants}
            torch_ms = []
            for _ in range(args.rounds):  # interleaved, so machine noise hits all alike
                torch_ms.append(hardware.time_torch(torch_conv, torch.from_numpy(x),
                                                    hw).median_ms)
                for key, ex in variants.items():
                    times[key].append(hardware.time_tvm(ex, torch.from_numpy(x), hw).median_ms)
            med = {key: statistics.median(v) for key, v in times.items()}
            pt = statistics.median(torch_ms)
            cells = []
            for kernel in sparse.KERNELS:
                bsr = min(BSR_SHAPES, key=lambda b: med[(kernel, b)])
                cells += [f"{med[(kernel, (1, 1))]:.3f}",
                          f"{med[(kernel, bsr)]:.3f} ({bsr[0]}x{bsr[1]})"]
            best = min(med.values())
            print(f"| {name} | {amount:.0%} | {dense_ms:.1f} | {pt:.3f} | {' | '.join(cells)} | "
                  f"{best / pt:.2f} | {best / dense_ms:.3f} |", flush=True)


if __name__ == "__main__":
    main()
