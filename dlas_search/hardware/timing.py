"""The timing protocol: one for every target and for the PyTorch eager baseline.

`warmup` untimed runs, then `repeat` timed repeats of `number` runs each, `number` grown until
a repeat lasts `min_repeat_ms` (TVM's own timer, also on a remote device); median, standard
deviation, p90 and the 95% interval of the median (stats.py) of the per-run times.
`cache_flush` evicts the CPU caches before every repeat (one run each, a cold-cache latency);
`pin` keeps the process's threads on the first `threads` CPUs of the machine meanwhile.

Kept in one module, apart from the device kinds, so that TVM on any device and PyTorch eager
are timed the same way: a device kind only says where the VM lives (`time_vm`), never how.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tvm
from tvm import relax

from .stats import median_ci
from .targets import HardwareConfig

__all__ = ["MACHINE_CPUS", "Timing", "run_tvm", "time_tvm", "time_torch", "time_vm", "pinned",
           "last_level_cache_bytes", "first_output"]


@dataclass
class Timing:
    median_ms: float
    std_ms: float
    p90_ms: float
    repeats: list[float]  # ms per run, one value per timed repeat
    ci_ms: tuple[float, float] = (0.0, 0.0)  # 95% interval of the median (stats.median_ci)

    @classmethod
    def of(cls, per_run_ms: list[float]) -> "Timing":
        return cls(statistics.median(per_run_ms), statistics.pstdev(per_run_ms),
                   float(np.percentile(per_run_ms, 90)), list(per_run_ms),
                   median_ci(per_run_ms))


def first_output(out) -> np.ndarray:
    """The first output of a VM call as numpy."""
    while not hasattr(out, "numpy"):  # the importer returns a tuple of outputs
        out = out[0]
    return out.numpy()


def run_tvm(executable, example: torch.Tensor) -> np.ndarray:
    """Run the compiled module once on the local CPU (for the correctness check)."""
    vm = relax.VirtualMachine(executable, tvm.cpu())
    return first_output(vm["main"](tvm.runtime.tensor(example.numpy(), tvm.cpu())))


def last_level_cache_bytes() -> int:
    """This CPU's largest cache (what a flush must exceed), 32 MiB if unknown."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=32 << 20)


def time_vm(vm: relax.VirtualMachine, dev, x, cfg: HardwareConfig,
            flush_bytes: int) -> tuple[np.ndarray, Timing]:
    """The protocol on a VM wherever it lives (local or behind RPC): warm-up, then TVM's timer
    on the device; returns the output (for the correctness check) and the timing."""
    vm.set_input("main", x)  # invoke_stateful: tuple outputs come back over RPC too
    vm.invoke_stateful("main")
    output = first_output(vm.get_outputs("main"))
    for _ in range(cfg.warmup):
        vm.invoke_stateful("main")
    timer = vm.module.time_evaluator(
        "invoke_stateful", dev, number=1, repeat=cfg.repeat,
        min_repeat_ms=0 if cfg.cache_flush else cfg.min_repeat_ms,
        cache_flush_bytes=flush_bytes if cfg.cache_flush else 0)
    return output, Timing.of([r * 1e3 for r in timer("main").results])


# the CPUs this process could use when it started: a worker that moved its training off the
# timing CPUs (search.py) still times on the machine's first ones
MACHINE_CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


@contextlib.contextmanager
def pinned(threads: int, enabled: bool = True):
    """Keep every thread of this process (TVM's pool, PyTorch's) on the first `threads` CPUs
    this process could use when it started (MACHINE_CPUS), then give the old masks back;
    threads started meanwhile get the process's old mask too. Yields the CPUs (None when not
    pinned)."""
    if not enabled or not hasattr(os, "sched_setaffinity"):
        yield None
        return
    before = os.sched_getaffinity(0)
    cpus = set((MACHINE_CPUS or sorted(before))[:threads])
    saved = {}
    for tid in map(int, os.listdir("/proc/self/task")):
        with contextlib.suppress(OSError):
            saved[tid] = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, cpus)
    try:
        yield sorted(cpus)
    finally:
        for tid in map(int, os.listdir("/proc/self/task")):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, saved.get(tid, before))


def time_tvm(executable, example: torch.Tensor, cfg: HardwareConfig,
             threads: int | None = None) -> Timing:
    """The protocol on the local CPU (TVM's timer raises `number` until a repeat lasts
    `min_repeat_ms`)."""
    dev = tvm.cpu()
    vm = relax.VirtualMachine(executable, dev)
    with pinned(threads or cfg.threads or 1, cfg.pin):
        return time_vm(vm, dev, tvm.runtime.tensor(example.numpy(), dev), cfg,
                       2 * last_level_cache_bytes())[1]


def _flush_cache(buffer: np.ndarray) -> None:
    buffer += 1  # read and write every line of a buffer twice the last-level cache


@torch.no_grad()
def time_torch(module: torch.nn.Module, example: torch.Tensor, cfg: HardwareConfig,
               threads: int | None = None) -> Timing:
    """PyTorch eager under the same protocol as `time_tvm`."""
    module.eval()
    flush = np.zeros(2 * last_level_cache_bytes() // 4, dtype=np.float32) \
        if cfg.cache_flush else None
    with pinned(threads or cfg.threads or 1, cfg.pin):
        for _ in range(max(cfg.warmup, 1)):
            module(example)
        number = 1
        while flush is None:  # like TVM's timer: runs per repeat to last min_repeat_ms
            start = time.perf_counter()
            for _ in range(number):
                module(example)
            elapsed_ms = (time.perf_counter() - start) * 1e3
            if elapsed_ms >= cfg.min_repeat_ms or number >= 1 << 20:
                break
            number = max(number * 2,
                         int(number * cfg.min_repeat_ms / max(elapsed_ms, 1e-3)) + 1)
        per_run = []
        for _ in range(cfg.repeat):
            if flush is not None:
                _flush_cache(flush)
            start = time.perf_counter()
            for _ in range(number):
                module(example)
            per_run.append((time.perf_counter() - start) * 1e3 / number)
    return Timing.of(per_run)
