"""The CPU running the search: its model name, and the LLVM target TVM compiles for it.

Kept apart from the device kinds because every kind needs it: a target without a TVM target
of its own is "like the local CPU" (targets.py), and a CUDA target's host code runs here too.
LLVM guesses the CPU's features from its model; a VM can hide some of them (AVX-512 on a
Zen 4 guest), and code using one then dies with SIGILL, so `local_target` switches off every
instruction-set feature the kernel does not report.

Importing this module also sizes TVM's thread pool (see below); it must happen before TVM
first runs anything, which the package's `__init__` ensures.
"""
from __future__ import annotations

import os
import platform

import tvm

__all__ = ["cpu_model", "local_target"]

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


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _feature_key(name: str) -> str:
    """A feature name as both spellings agree on: /proc/cpuinfo writes `amx_bf16` and
    `sse4_1`, LLVM `amx-bf16` and `sse4.1`."""
    return name.replace("_", "").replace("-", "").replace(".", "")


def _cpuinfo_flags() -> set[str] | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return {_feature_key(_CPUINFO_ALIASES.get(x, x)) for x in flags}
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
                         if f.startswith(_ISA_PREFIXES) and _feature_key(f) not in flags)
        if missing:
            spec["mattr"] = [f"-{f}" for f in missing]
    return tvm.target.Target(spec)
