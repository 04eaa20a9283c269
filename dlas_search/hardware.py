"""Layer 6, hardware: where the compiled module runs, and how it is timed.

`hw.target` names a target; this release has `local`, the CPU running the search. The same
timing protocol (warm-up, then `repeat` timed repeats each lasting at least `min_repeat_ms`)
times the TVM module and the PyTorch eager baseline, so their ratio is fair.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import tvm
from tvm import relax

TARGETS = ("local",)

# TVM sizes its thread pool once, at first use, from TVM_NUM_THREADS (else half the hardware
# threads on x86: 1 on a 2-core machine, whatever `hw.threads` asks) and pins the calling thread
# to CPU 0, a mask every later thread and child process (PyTorch's workers, MetaSchedule's
# builders and runners) inherits. A pool as large as the machine, unpinned, and
# `runtime.config_threadpool` choosing how many of it run keeps `hw.threads` true for both.
os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))
os.environ.setdefault("TVM_BIND_THREADS", "0")

# LLVM feature names that /proc/cpuinfo reports under another spelling.
_CPUINFO_ALIASES = {"sha_ni": "sha", "pclmulqdq": "pclmul", "pni": "sse3", "sse4_1": "sse4.1",
                    "sse4_2": "sse4.2", "bmi1": "bmi", "abm": "lzcnt"}
# Instruction-set features we trust /proc/cpuinfo about; any of them LLVM assumes for the host
# CPU model but the kernel does not report is switched off (a VM can hide AVX-512: code that
# uses it then dies with SIGILL).
_ISA_PREFIXES = ("avx", "amx", "gfni", "vaes", "vpclmulqdq", "sha", "fma", "f16c", "bmi",
                 "sse4", "ssse3", "xop", "fma4")


@dataclass(frozen=True)
class HardwareConfig:
    target: str = field(default="local", metadata={"choices": TARGETS})
    threads: int = field(default=1, metadata={"min": 1, "max": 1024})
    warmup: int = field(default=3, metadata={"min": 0, "max": 1000})
    repeat: int = field(default=20, metadata={"min": 3, "max": 10000})
    min_repeat_ms: int = field(default=20, metadata={"min": 0, "max": 60000})


@dataclass
class Device:
    name: str
    target: tvm.target.Target
    threads: int
    description: str


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpuinfo_flags() -> set[str] | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return {_CPUINFO_ALIASES.get(x, x).replace("_", "") for x in flags}
    except OSError:
        return None
    return None


def local_target(threads: int) -> tvm.target.Target:
    """An LLVM target for this CPU: LLVM's CPU model, minus the ISA features the OS lacks."""
    mcpu = tvm.get_global_func("target.llvm_get_system_cpu")()
    spec = {"kind": "llvm", "mcpu": mcpu, "num-cores": threads}
    flags = _cpuinfo_flags()
    if flags is not None and platform.machine() in ("x86_64", "AMD64"):
        assumed = tvm.target.codegen.llvm_get_cpu_features(tvm.target.Target(spec))
        missing = sorted(f for f in assumed
                         if f.startswith(_ISA_PREFIXES) and f.replace(".", "") not in
                         {x.replace(".", "") for x in flags})
        if missing:
            spec["mattr"] = [f"-{f}" for f in missing]
    return tvm.target.Target(spec)


def resolve(cfg: HardwareConfig) -> Device:
    """The device a trial runs on, with its TVM target and thread count set."""
    threads = min(cfg.threads, os.cpu_count() or 1)
    tvm.get_global_func("runtime.config_threadpool")(1, threads)
    torch.set_num_threads(threads)
    return Device("local", local_target(threads), threads, f"{cpu_model()}, {threads} thread(s)")


@dataclass
class Timing:
    median_ms: float
    std_ms: float
    p90_ms: float
    repeats: list[float]  # ms per run, one value per timed repeat

    @classmethod
    def of(cls, per_run_ms: list[float]) -> "Timing":
        return cls(statistics.median(per_run_ms), statistics.pstdev(per_run_ms),
                   float(np.percentile(per_run_ms, 90)), per_run_ms)


def run_tvm(executable, example: torch.Tensor) -> np.ndarray:
    """Run the compiled module once on the local CPU (for the correctness check)."""
    vm = relax.VirtualMachine(executable, tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(example.numpy(), tvm.cpu()))
    while not hasattr(out, "numpy"):  # the importer returns a tuple of outputs
        out = out[0]
    return out.numpy()


def time_tvm(executable, example: torch.Tensor, cfg: HardwareConfig) -> Timing:
    """TVM's own timer: it raises `number` until a repeat lasts `min_repeat_ms`."""
    dev = tvm.cpu()
    vm = relax.VirtualMachine(executable, dev)
    x = tvm.runtime.tensor(example.numpy(), dev)
    for _ in range(cfg.warmup):
        vm["main"](x)
    timer = vm.time_evaluator("main", dev, number=1, repeat=cfg.repeat,
                              min_repeat_ms=cfg.min_repeat_ms)
    return Timing.of([r * 1e3 for r in timer(x).results])


@torch.no_grad()
def time_torch(module: torch.nn.Module, example: torch.Tensor, cfg: HardwareConfig) -> Timing:
    """PyTorch eager under the same protocol as `time_tvm`."""
    module.eval()
    for _ in range(max(cfg.warmup, 1)):
        module(example)
    number = 1
    while True:  # calibrate like TVM's timer: runs per repeat so a repeat lasts min_repeat_ms
        start = time.perf_counter()
        for _ in range(number):
            module(example)
        elapsed_ms = (time.perf_counter() - start) * 1e3
        if elapsed_ms >= cfg.min_repeat_ms or number >= 1 << 20:
            break
        number = max(number * 2, int(number * cfg.min_repeat_ms / max(elapsed_ms, 1e-3)) + 1)
    per_run = []
    for _ in range(cfg.repeat):
        start = time.perf_counter()
        for _ in range(number):
            module(example)
        per_run.append((time.perf_counter() - start) * 1e3 / number)
    return Timing.of(per_run)
