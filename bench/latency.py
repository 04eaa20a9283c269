"""TVM (untuned, each conv primitive) vs PyTorch eager on the same model, side by side.

Both are timed in one process with the project's own protocol (hardware.time_tvm /
time_torch), in interleaved rounds, so machine noise hits both alike. Prints one Markdown
table: medians over rounds of each side's median latency, their spread, and the ratio.

    python bench/latency.py [--rounds 5] [--threads 1] [--size 32]
"""
from __future__ import annotations

import argparse
import statistics

import torch

from dlas_search import algorithms, compiler, hardware, models

CASES = [("resnet18", "standard"), ("mobilenet_v2", "cifar"), ("mobilenet_v2", "standard")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    hw = hardware.HardwareConfig(threads=args.threads, repeat=20, min_repeat_ms=50)
    device = hardware.resolve(hw)
    print(f"# {device.description}; batch 1, {args.size}x{args.size}, {args.rounds} rounds; "
          f"torch {torch.__version__}\n")
    print("| model | stem | conv | PyTorch eager ms (spread) | TVM untuned ms (spread) | "
          "TVM / PyTorch latency |")
    print("| --- | --- | --- | --- | --- | --- |")
    example = torch.randn(1, 3, args.size, args.size)
    for arch, stem in CASES:
        torch.manual_seed(0)
        model = models.create(models.ModelConfig(arch=arch, stem=stem), 10).eval()
        for conv in algorithms.PRIMITIVES:
            built = compiler.compile(model, example, algorithms.PRIMITIVES[conv],
                                     compiler.CompilerConfig(), device.target)
            eager, tvm_ms = [], []
            for _ in range(args.rounds):
                eager.append(hardware.time_torch(model, example, hw).median_ms)
                tvm_ms.append(hardware.time_tvm(built.executable, example, hw).median_ms)
            ratios = [t / e for t, e in zip(tvm_ms, eager)]
            print(f"| {arch} | {stem} | {conv} | {statistics.median(eager):.2f} "
                  f"({min(eager):.2f}-{max(eager):.2f}) | {statistics.median(tvm_ms):.2f} "
                  f"({min(tvm_ms):.2f}-{max(tvm_ms):.2f}) | {statistics.median(ratios):.2f}x "
                  f"({min(ratios):.2f}-{max(ratios):.2f}) |", flush=True)


if __name__ == "__main__":
    main()
