"""What the stage cache saves: a trial that differs from an earlier one only in layers 4-6
costs what fraction of a full (cold-cache) trial?

On the quickstart space's settings (digits 32x32, 3 training epochs, 1 fine-tune epoch,
untuned, 1 thread, repeat 20), for resnet18 and mobilenet_v2 (CIFAR stem), unpruned. Each
repetition starts from an empty cache and runs, in one process (as a study's worker does):

    cold      algo.conv direct, hw.threads 1      (trains, fine-tunes, compiles, times)
    conv      algo.conv direct_nhwc               (L4 change: cached model, new compile)
    threads   algo.conv direct, hw.threads 2      (L6 change: cached model, new compile)
    timing    algo.conv direct, hw.repeat 10      (timing-only change: compile cache hit)

The architectures are interleaved within each repetition so machine noise hits both alike.
Cost = wall time of pipeline.run (what a trial does before MLflow logging, model artifacts
included). Prints a Markdown table: median ratio to the cold trial, its spread (min-max),
and where the time of the median repetition went.

    python bench/stage_cache.py [--reps 3] [--archs resnet18,mobilenet_v2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from dlas_search import compiler, hardware, pipeline
from dlas_search.cache import StageCache
from dlas_search.space import load_space

QUICKSTART = Path(__file__).resolve().parents[1] / "spaces" / "quickstart.yaml"
VARIANTS = {"cold": {"algo.conv": "direct"},
            "conv": {"algo.conv": "direct_nhwc"},
            "threads": {"algo.conv": "direct", "hw.threads": 2},
            "timing": {"algo.conv": "direct", "hw.repeat": 10}}
STAGES = ("train_s", "finetune_s", "convert_s", "compile_s", "measure_s")


def trial(space, arch: str, pins: dict, cache: StageCache) -> tuple[float, dict, dict]:
    config = space.pin({"model.arch": arch, "compress.method": "none", **pins}).defaults()
    start = time.perf_counter()
    result = pipeline.run(config, cache)
    elapsed = time.perf_counter() - start
    result.discard_artifacts()
    return elapsed, result.metrics, result.cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--archs", default="resnet18,mobilenet_v2")
    args = parser.parse_args()
    space = load_space(QUICKSTART)
    archs = args.archs.split(",")
    costs = defaultdict(list)      # (arch, variant) -> seconds per repetition
    parts = defaultdict(list)      # (arch, variant) -> {stage: seconds} per repetition
    for rep in range(args.reps):
        with tempfile.TemporaryDirectory(prefix="dlas-bench-cache-") as folder:
            cache = StageCache(folder)
            compiler._IMPORTS.clear()  # a cold trial: nothing in memory from the last rep
            for variant, pins in VARIANTS.items():
                for arch in archs:
                    seconds, metrics, tags = trial(space, arch, pins, cache)
                    costs[arch, variant].append(seconds)
                    parts[arch, variant].append(
                        {**{s: metrics.get(s, 0.0) for s in STAGES},
                         "other_s": seconds - sum(metrics.get(s, 0.0) for s in STAGES)})
                    print(f"# rep {rep} {arch} {variant}: {seconds:.1f} s, cache {tags}, "
                          + ", ".join(f"{k} {v:.1f}" for k, v in parts[arch, variant][-1].items()),
                          flush=True)
        table(archs, costs, parts, rep + 1)  # after every repetition: partial results stay


def table(archs, costs, parts, reps: int) -> None:
    print(f"\n# {hardware.cpu_model()}, {os.cpu_count()} cores (shared); torch "
          f"{torch.__version__}; {reps} repetition(s)\n")
    print("| model | trial | cost s, median (min-max) | / cold trial, median (min-max) | "
          "where the time went (median rep, s) |")
    print("| --- | --- | --- | --- | --- |")
    for arch in archs:
        cold = costs[arch, "cold"]
        for variant in VARIANTS:
            cost = costs[arch, variant]
            ratios = [c / k for c, k in zip(cost, cold)]
            median_rep = sorted(range(len(cost)), key=cost.__getitem__)[len(cost) // 2]
            where = ", ".join(f"{k[:-2]} {v:.1f}" for k, v in parts[arch, variant][median_rep]
                              .items() if v >= 0.05)
            print(f"| {arch} | {variant} | {statistics.median(cost):.1f} ({min(cost):.1f}-"
                  f"{max(cost):.1f}) | {statistics.median(ratios):.3f} ({min(ratios):.3f}-"
                  f"{max(ratios):.3f}) | {where} |", flush=True)


if __name__ == "__main__":
    main()
