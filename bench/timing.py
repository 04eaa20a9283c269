"""Fidelity of the timing protocol (layer 6): is a latency we log one a user can trust?

Two checks on one compiled module, in one process, run by hand on an idle machine:

1. repeatability: the protocol (hardware.time_tvm / time_torch) run 10 times in a row on the
   same module; the coefficient of variation (std / mean) of the 10 medians, target <= 3%;
2. agreement: TVM's timer (time_evaluator on the device) against an independent wall-clock
   loop (time.perf_counter around `vm["main"](x)`, calibrated the same way), target within 5%.

    python bench/timing.py --model resnet18 --size 32 --threads 1
    python bench/timing.py --model mobilenet_v2 --size 224 --threads 2 --pin false
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import tvm
from tvm import relax

from dlas_search import algorithms, compiler, hardware, models


def wall_clock_ms(executable, example: torch.Tensor, cfg: hardware.HardwareConfig,
                  threads: int) -> float:
    """Median per-run time of a plain Python loop around the VM call (no TVM timer)."""
    dev = tvm.cpu()
    vm = relax.VirtualMachine(executable, dev)
    x = tvm.runtime.tensor(example.numpy(), dev)
    main = vm["main"]
    with hardware.pinned(threads, cfg.pin):
        for _ in range(cfg.warmup):
            main(x)
        number = 1
        while True:
            start = time.perf_counter()
            for _ in range(number):
                main(x)
            elapsed = (time.perf_counter() - start) * 1e3
            if elapsed >= cfg.min_repeat_ms:
                break
            number *= 2
        runs = []
        for _ in range(cfg.repeat):
            start = time.perf_counter()
            for _ in range(number):
                main(x)
            runs.append((time.perf_counter() - start) * 1e3 / number)
    return statistics.median(runs)


def cv(values: list[float]) -> float:
    return statistics.pstdev(values) / statistics.mean(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--conv", default="direct")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--min-repeat-ms", type=int, default=20)
    parser.add_argument("--times", type=int, default=10, help="protocol runs in a row")
    parser.add_argument("--pin", default="true", choices=("true", "false"))
    args = parser.parse_args()
    cfg = hardware.HardwareConfig(threads=args.threads, warmup=3, repeat=args.repeat,
                                  min_repeat_ms=args.min_repeat_ms, pin=args.pin == "true")
    device = hardware.resolve(cfg)
    torch.manual_seed(0)
    model = models.create(models.ModelConfig(arch=args.model), 1000).eval()
    example = torch.randn(1, 3, args.size, args.size)
    built = compiler.compile(model, example, algorithms.plan(algorithms.AlgoConfig(
        conv=args.conv)), compiler.CompilerConfig(), device.target)
    print(f"# {device.description}; {args.model} {args.size}x{args.size} {args.conv} untuned; "
          f"repeat {cfg.repeat} x >= {cfg.min_repeat_ms} ms; pin {cfg.pin}; "
          f"{time.strftime('%Y-%m-%d %H:%M')}\n")
    tvm_runs, torch_runs, ratios = [], [], []
    for _ in range(args.times):
        tvm_ms = hardware.time_tvm(built.executable, example, cfg, device.threads).median_ms
        wall_ms = wall_clock_ms(built.executable, example, cfg, device.threads)
        torch_runs.append(hardware.time_torch(model, example, cfg, device.threads).median_ms)
        tvm_runs.append(tvm_ms)
        ratios.append(wall_ms / tvm_ms)
    print("| measurement | medians of the runs (ms) | median | CV | target |")
    print("| --- | --- | --- | --- | --- |")
    for name, runs in (("TVM, time_evaluator", tvm_runs), ("PyTorch eager", torch_runs)):
        print(f"| {name}, {args.times} runs in a row | "
              f"{', '.join(f'{v:.3f}' for v in runs)} | {statistics.median(runs):.3f} | "
              f"{100 * cv(runs):.1f}% | <= 3% |")
    print(f"| wall-clock loop / time_evaluator | {', '.join(f'{r:.3f}' for r in ratios)} | "
          f"{statistics.median(ratios):.3f} | {100 * cv(ratios):.1f}% | within 5% of 1 "
          f"(worst {100 * max(abs(r - 1) for r in ratios):.1f}%) |")


if __name__ == "__main__":
    main()
