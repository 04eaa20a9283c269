"""Layers 4-5 against PyTorch eager: untuned and MetaSchedule-tuned TVM, dense and sparse.

Two tables, each measured side by side in one process on the local CPU, batch 1, in
interleaved rounds (every round times every variant once), so machine noise hits all alike.
Latencies are medians over rounds of the protocol's per-round median (hardware.time_tvm /
time_torch); the spread is the min-max over rounds.

    # tuned vs untuned vs PyTorch (tuning records kept in --database and reused)
    python bench/compiler.py tuned --models resnet18,mobilenet_v2 --sizes 224,32 --trials 1000
    # each model under its own primitive
    python bench/compiler.py tuned --conv resnet18=winograd_nhwc,mobilenet_v2=direct_nhwc
    # resnet18 pruned: sparse vs dense per primitive under one tuning setting
    python bench/compiler.py sparse --size 224 --sparsities 0.5,0.7,0.9,0.95

Tuning wall time and trial counts are those of the runs that tuned (kept beside the database in
bench-tuning.json, summed over runs), so a re-run that reuses the records still reports what
tuning cost; `--extend` spends --trials more on tasks the database has already.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import tvm

from dlas_search import algorithms, compiler, hardware, models, tuning


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def interleaved(rounds: int, timers: dict[str, callable]) -> dict[str, list[float]]:
    """Each timer once per round, in turn; returns ms per name over rounds."""
    out = {name: [] for name in timers}
    for _ in range(rounds):
        for name, timer in timers.items():
            out[name].append(timer())
    return out


def build(model, example, conv: str, tuner: str, args, target, fmt: str = "dense",
          **algo) -> compiler.Compiled:
    cfg = compiler.CompilerConfig(tuner=tuner, trials=args.trials if tuner != "none" else None,
                                  database=args.database if tuner != "none" else None,
                                  cold_weights=args.cold_weights if tuner != "none" else None)
    plan = algorithms.plan(algorithms.AlgoConfig(conv=conv, format=fmt, **algo))
    built = compiler.compile(model, example, plan, cfg, target,
                             extend_tuning=tuner != "none" and args.extend)
    built.plan = plan
    return built


def tuning_log(args) -> tuple[Path, dict]:
    path = Path(args.database) / "bench-tuning.json"
    return path, (json.loads(path.read_text()) if path.exists() else {})


def record_tuning(args, key: str, report: tuning.TuningReport) -> dict:
    """What tuning cost, kept across runs: a run that only reuses records adds nothing."""
    path, book = tuning_log(args)
    entry = book.get(key, {"trials": 0, "tune_s": 0.0})
    if report.new_trials:
        entry = {"trials": entry["trials"] + report.new_trials,
                 "tune_s": round(entry["tune_s"] + report.tune_s, 1)}
        book[key] = entry
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(book, indent=1, sort_keys=True))
    return entry


def fma_loop(threads: int, lanes: int, chains: int = 12, depth: int = 8):
    """A kernel that only multiplies and adds: per thread `chains` independent vectors of
    `lanes` floats, each taken through `depth` dependent FMAs per iteration (chains enough to
    cover the FMA latency on both units; one store per `depth` FMAs, since TVM keeps the
    accumulators in memory), so its rate is the fp32 peak the cores reach under load."""
    from tvm.script import tirx as T

    def horner(x, a, b):
        for _ in range(depth):
            x = x * a + b
        return x

    @T.prim_func
    def fma(acc: T.Buffer((threads, chains, lanes), "float32"), a: T.float32, b: T.float32,
            iters: T.int32):
        for t in T.parallel(threads):
            for _ in range(iters):
                for j in T.unroll(chains):
                    for v in T.vectorized(lanes):
                        acc[t, j, v] = horner(acc[t, j, v], a, b)
    return fma, depth


# CPUs whose FMA units are narrower than their widest vectors: Zen 4 runs a 512-bit FMA on
# both of its 256-bit FMA pipes, so it issues one 512-bit (16-lane) FMA per cycle, not two.
HALF_WIDTH_FMA = {"znver4"}


def peak_gflops(device, rounds: int = 7) -> tuple[float, str]:
    """fp32 roofline: cores x SIMD lanes x FMA units x 2 flops x clock, with the clock the one
    the cores run at under an FMA loop on all of them (measured: the nominal clock that
    /proc/cpuinfo shows on a VM is not the one the cores boost to). Median of `rounds`."""
    import numpy as np
    features = tvm.target.codegen.llvm_get_cpu_features(device.target)
    lanes = 16 if "avx512f" in features else 8 if "avx2" in features else 4
    mcpu = str(device.target.attrs.get("mcpu", ""))
    fma_units = 1 if lanes == 16 and mcpu in HALF_WIDTH_FMA else 2
    threads, chains, iters = device.threads, 12, 1_000_000
    func, depth = fma_loop(threads, lanes, chains)
    kernel = tvm.compile(func, device.target)
    acc = tvm.runtime.tensor(np.random.default_rng(0).random((threads, chains, lanes),
                                                             dtype="float32"))
    kernel(acc, 0.9999, 0.0001, 1000)
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        kernel(acc, 0.9999, 0.0001, iters)
        flops = threads * chains * lanes * depth * 2 * iters
        rates.append(flops / (time.perf_counter() - start) / 1e9)
    peak = statistics.median(rates)
    ghz = peak / (threads * lanes * fma_units * 2)
    nominal = 0.0
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("cpu MHz"):
                nominal = float(line.split(":")[1]) / 1000
                break
    units = (f"{fma_units} FMA" if fma_units == 2 else
             f"{fma_units} FMA ({mcpu}: a {lanes * 32}-bit FMA takes both of its FMA pipes)")
    return peak, (f"{threads} cores x {lanes} fp32 lanes x {units} x 2 x {ghz:.2f} GHz "
                  f"= {peak:.0f} GFLOP/s (measured: an FMA loop on every core ran at "
                  f"{min(rates):.0f}-{max(rates):.0f} GFLOP/s, the clock is what that "
                  f"implies; /proc/cpuinfo gives {nominal:.2f} GHz)")


def breakdown(name: str, report: tuning.TuningReport, peak: float, top: int = 8) -> list[str]:
    """The tasks that dominate the tuned model (by count x best measured time) and their
    distance from the fp32 roofline."""
    rows = [r for r in report.task_table if r["best_us"]]
    total = sum(r["count"] * r["best_us"] for r in rows)
    flops = sum(r["count"] * r["flops"] for r in report.task_table)
    lines = [f"\n{name}: {flops / 1e9:.2f} GFLOP per image; sum of best task times "
             f"{total / 1e3:.2f} ms = {flops / max(total, 1e-9) / 1e3:.1f} GFLOP/s "
             f"({100 * flops / max(total, 1e-9) / 1e3 / peak:.0f}% of peak)",
             "| task | count | MFLOP | best us | GFLOP/s | % of peak | share of time |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(rows, key=lambda r: -r["count"] * r["best_us"])[:top]:
        rate = r["flops"] / r["best_us"] / 1e3
        lines.append(f"| {r['task']} | {r['count']} | {r['flops'] / 1e6:.1f} | "
                     f"{r['best_us']:.0f} | {rate:.1f} | {100 * rate / peak:.0f}% | "
                     f"{100 * r['count'] * r['best_us'] / total:.0f}% |")
    return lines


def conv_of(spec: str, arch: str) -> str:
    """`--conv`: one primitive for every model, or one per model (`resnet18=winograd_nhwc,
    mobilenet_v2=direct_nhwc`), so one run can time each model under its own best primitive."""
    if "=" not in spec:
        return spec
    choice = dict(item.split("=", 1) for item in spec.split(","))
    if arch not in choice:
        raise SystemExit(f"--conv names no primitive for {arch} (it names {', '.join(choice)})")
    return choice[arch]


def tuned_table(args, hw, device) -> None:
    peak, peak_text = peak_gflops(device)
    notes = [f"\nfp32 roofline of this machine: {peak_text}"]
    print("| model | input | conv | PyTorch eager ms | TVM untuned ms | untuned / PyTorch | "
          "TVM tuned ms | tuned / PyTorch | trials (tuning wall time) | tasks tuned |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
    for size in args.sizes:
        for arch in args.models:
            torch.manual_seed(0)
            model = models.create(models.ModelConfig(arch=arch), 1000).eval()
            example = torch.randn(1, 3, size, size)
            conv = conv_of(args.conv, arch)
            untuned = build(model, example, conv, "none", args, device.target)
            tuned = build(model, example, conv, "metaschedule", args, device.target)
            report = tuned.tuning
            mode = "-cold" if args.cold_weights else ""
            cost = record_tuning(args, f"{arch}-{size}-{conv}-{device.threads}t{mode}", report)
            ref = model(example).detach().numpy()
            error = compiler.max_relative_error(hardware.run_tvm(tuned.executable, example), ref)
            assert error < 1e-3, f"tuned {arch} differs from PyTorch: {error:.2e}"
            times = interleaved(args.rounds, {
                "eager": lambda: hardware.time_torch(model, example, hw).median_ms,
                "untuned": lambda: hardware.time_tvm(untuned.executable, example, hw).median_ms,
                "tuned": lambda: hardware.time_tvm(tuned.executable, example, hw).median_ms})
            ratio = {k: [t / e for t, e in zip(times[k], times["eager"])]
                     for k in ("untuned", "tuned")}
            shown = f"{conv}, cold weights" if args.cold_weights else conv
            print(f"| {arch} | {size}x{size} | {shown} | {spread(times['eager'])} | "
                  f"{spread(times['untuned'])} | {spread(ratio['untuned'])} | "
                  f"{spread(times['tuned'])} | {spread(ratio['tuned'])} | "
                  f"{cost['trials']} ({cost['tune_s'] / 60:.0f} min) | "
                  f"{report.scheduled}/{report.scheduled + len(report.untuned)} |", flush=True)
            notes += breakdown(f"{arch} {size}x{size} {conv}", report, peak)
    print("\n".join(notes))


def prune(model: torch.nn.Module, amount: float) -> torch.nn.Module:
    """Magnitude pruning of every conv and linear weight, layer by layer (unstructured)."""
    import copy
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for module in pruned.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                w = module.weight
                k = int(amount * w.numel())
                if k:
                    cut = w.abs().flatten().kthvalue(k).values
                    w[w.abs() <= cut] = 0.0
    return pruned.eval()


def sparse_table(args, hw, device) -> None:
    settings = [(conv, "none") for conv in args.primitives] + \
        [(conv, "metaschedule") for conv in args.tuned_primitives]
    print(f"resnet18 {args.size}x{args.size}, magnitude-pruned per layer, block {args.block}, "
          f"threshold {args.threshold}; metaschedule: up to {args.trials} trials per build, "
          f"records reused from {args.database}")
    print("| sparsity | conv | tuner | dense ms | sparse ms | sparse / dense | "
          "sparse / best dense | layers sparse | PyTorch eager ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
    torch.manual_seed(0)
    base = models.create(models.ModelConfig(arch="resnet18"), 1000).eval()
    example = torch.randn(1, 3, args.size, args.size)
    for amount in args.sparsities:
        model = prune(base, amount)
        ref = model(example).detach().numpy()
        builds = {}
        for conv, tuner in settings:
            builds[(conv, tuner, "dense")] = build(model, example, conv, tuner, args,
                                                   device.target)
            builds[(conv, tuner, "sparse")] = build(model, example, conv, tuner, args,
                                                    device.target, "sparse", block=args.block,
                                                    threshold=args.threshold)
        for key, built in builds.items():
            error = compiler.max_relative_error(hardware.run_tvm(built.executable, example), ref)
            assert error < 1e-3, f"{key} differs from PyTorch: {error:.2e}"
        timers = {key: (lambda b=b: hardware.time_tvm(b.executable, example, hw).median_ms)
                  for key, b in builds.items()}
        timers["eager"] = lambda: hardware.time_torch(model, example, hw).median_ms
        times = interleaved(args.rounds, timers)
        best = min((k for k in builds if k[2] == "dense"),
                   key=lambda k: statistics.median(times[k]))
        for conv, tuner in settings:
            dense, sparse = times[(conv, tuner, "dense")], times[(conv, tuner, "sparse")]
            vs_best = [s / d for s, d in zip(sparse, times[best])]
            layers = builds[(conv, tuner, "sparse")].metrics.get("sparse_layers", float("nan"))
            print(f"| {amount:.0%} | {conv} | {tuner} | {spread(dense)} | {spread(sparse)} | "
                  f"{spread([s / d for s, d in zip(sparse, dense)])} | "
                  f"{spread(vs_best)} ({best[0]} {best[1]}) | {layers:.0f} | "
                  f"{spread(times['eager'])} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", choices=("tuned", "sparse"))
    parser.add_argument("--models", type=lambda s: s.split(","),
                        default=["resnet18", "mobilenet_v2"])
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")],
                        default=[224, 32])
    parser.add_argument("--size", type=int, default=224, help="input size of the sparse table")
    parser.add_argument("--conv", default="direct_nhwc",
                        help="conv primitive of the tuned table, or one per model: "
                             "resnet18=winograd_nhwc,mobilenet_v2=direct_nhwc")
    parser.add_argument("--primitives", type=lambda s: s.split(","),
                        default=["direct", "im2col_gemm"])
    parser.add_argument("--sparsities", type=lambda s: [float(x) for x in s.split(",")],
                        default=[0.5, 0.7, 0.9, 0.95])
    parser.add_argument("--tuned-primitives", type=lambda s: s.split(",") if s else [],
                        default=["direct_nhwc"], help="sparse table: also these, tuned")
    parser.add_argument("--block", default="1x1")
    parser.add_argument("--threshold", type=float, default=0.3)
    parser.add_argument("--tuner", default="none", choices=compiler.TUNERS)
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--extend", action="store_true",
                        help="spend --trials on tasks already in the database too")
    parser.add_argument("--database", default="tracking/tuning")
    parser.add_argument("--cold-weights", action="store_true",
                        help="tune with each candidate's weights evicted from the caches")
    parser.add_argument("--threads", type=int, default=0, help="0: all cores")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=10, help="timed repeats per measurement")
    args = parser.parse_args()
    if args.table == "tuned":
        for arch in args.models:
            if conv_of(args.conv, arch) not in algorithms.PRIMITIVES:
                parser.error(f"unknown conv primitive {conv_of(args.conv, arch)!r} for {arch}; "
                             f"choose from {', '.join(algorithms.PRIMITIVES)}")
    import os
    threads = args.threads or os.cpu_count()
    hw = hardware.HardwareConfig(threads=threads, repeat=args.repeat, min_repeat_ms=100)
    device = hardware.resolve(hw)
    print(f"# {device.description}; target {device.target}; batch 1; {args.rounds} "
          f"interleaved rounds; torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M')}\n")
    (tuned_table if args.table == "tuned" else sparse_table)(args, hw, device)


if __name__ == "__main__":
    main()
