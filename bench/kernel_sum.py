"""Whole tuned model vs the sum of its kernels, each timed alone, in interleaved rounds.

The tuned table's per-task breakdown sums MetaSchedule's best measurements, each kernel run
alone and repeated (its weights and inputs warm in the caches); this checks whether the whole
model, run by the Relax VM, costs more than that sum, and whether caches explain it: each call
is also timed once right after the caches were evicted (a buffer twice the last-level cache
written), the other bound, where every weight comes from memory. Builds from an existing tuning
database (no new trials):

    python bench/compiler.py tuned --models mobilenet_v2 --sizes 224 --database DB
    python bench/kernel_sum.py --model mobilenet_v2 --size 224 --database DB
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict

import numpy as np
import torch
import tvm
from tvm import relax

from dlas_search import algorithms, compiler, hardware, models


def kernel_calls(executable, example: torch.Tensor) -> tuple[list, relax.VirtualMachine]:
    """Every call the VM makes in one run of main, as (symbol, function, arguments), and the
    VM, which keeps the arguments' storage alive."""
    dev = tvm.cpu()
    vm = relax.VirtualMachine(executable, dev)
    vm.set_input("main", tvm.runtime.tensor(example.numpy(), dev))
    calls = []

    def instrument(func, symbol, before, ret, *args):
        if before:
            calls.append((symbol, func, args))
        return 0

    vm.set_instrument(instrument)
    vm.invoke_stateful("main")
    return calls, vm


def time_alone(func, args, min_s: float = 0.01, repeat: int = 5) -> float:
    """Median seconds per call of one kernel run back to back on its own arguments."""
    func(*args)
    start = time.perf_counter()
    func(*args)
    number = max(1, int(min_s / max(time.perf_counter() - start, 1e-7)))
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            func(*args)
        runs.append((time.perf_counter() - start) / number)
    return statistics.median(runs)


def time_cold(func, args, flush: np.ndarray, repeat: int = 5) -> float:
    """Median seconds of one call run right after the caches were evicted."""
    runs = []
    for _ in range(repeat):
        flush += 1
        start = time.perf_counter()
        func(*args)
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--conv", default="direct_nhwc")
    parser.add_argument("--database", required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--cold-weights", action="store_true",
                        help="use the records tuned with compiler.cold_weights")
    args = parser.parse_args()
    threads = os.cpu_count()
    hw = hardware.HardwareConfig(threads=threads, repeat=10, min_repeat_ms=100)
    device = hardware.resolve(hw)
    torch.manual_seed(0)
    model = models.create(models.ModelConfig(arch=args.model), 1000).eval()
    example = torch.randn(1, 3, args.size, args.size)
    plan = algorithms.plan(algorithms.AlgoConfig(conv=args.conv))
    cfg = compiler.CompilerConfig(tuner="metaschedule", trials=1, database=args.database,
                                  cold_weights=args.cold_weights)
    built = compiler.compile(model, example, plan, cfg, device.target)
    if built.tuning.new_trials or built.tuning.untuned:
        print(f"warning: the database lacked tasks ({built.tuning.new_trials} new trials, "
              f"untuned: {built.tuning.untuned})")
    calls, _vm = kernel_calls(built.executable, example)
    print(f"# {device.description}; {args.model} {args.size}x{args.size} {args.conv}"
          f"{' tuned with cold weights' if args.cold_weights else ''}; "
          f"{len(calls)} VM calls per run; {args.rounds} interleaved rounds; "
          f"{time.strftime('%Y-%m-%d %H:%M')}\n")
    print("| round | whole model ms | sum of calls alone, warm ms | whole / warm sum | "
          "sum of calls alone, caches evicted ms |")
    print("| --- | --- | --- | --- | --- |", flush=True)
    per_symbol = defaultdict(lambda: ([], []))
    ratios = []
    flush = np.zeros(2 * hardware.last_level_cache_bytes() // 4, dtype=np.float32)
    for r in range(args.rounds):
        whole = hardware.time_tvm(built.executable, example, hw, threads=threads).median_ms
        with hardware.pinned(threads):
            warm = [time_alone(func, call_args) for _, func, call_args in calls]
            cold = [time_cold(func, call_args, flush) for _, func, call_args in calls]
        total, total_cold = 1e3 * sum(warm), 1e3 * sum(cold)
        ratios.append(whole / total)
        by_symbol = defaultdict(lambda: [0.0, 0.0])
        for (symbol, _, _), t, c in zip(calls, warm, cold):
            by_symbol[symbol][0] += 1e3 * t
            by_symbol[symbol][1] += 1e3 * c
        for symbol, (t, c) in by_symbol.items():
            per_symbol[symbol][0].append(t)
            per_symbol[symbol][1].append(c)
        print(f"| {r + 1} | {whole:.2f} | {total:.2f} | {whole / total:.2f} | "
              f"{total_cold:.2f} |", flush=True)
    print(f"\nwhole / warm sum: median {statistics.median(ratios):.2f} "
          f"({min(ratios):.2f}-{max(ratios):.2f})\n")
    print("| call | warm ms per run | caches evicted ms per run |\n| --- | --- | --- |")
    for symbol, (warm_t, cold_t) in sorted(per_symbol.items(),
                                           key=lambda kv: -statistics.median(kv[1][0])
                                           )[:args.top]:
        print(f"| {symbol} | {statistics.median(warm_t):.3f} | "
              f"{statistics.median(cold_t):.3f} |")


if __name__ == "__main__":
    main()
