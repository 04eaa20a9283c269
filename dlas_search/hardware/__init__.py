"""Layer 6, hardware: where the compiled module runs, and how it is timed.

`hw.target` names a target: `local` (the CPU running the search), `cuda` (the first GPU, when
there is one), a name from the space's target registry (`targets:`, see spaces/targets.yaml),
or a device behind a TVM RPC tracker written inline as `rpc://HOST:PORT/KEY` (optionally
`?target=<TVM target JSON>`; by default the device is assumed to be like the local CPU).
A remote trial cross-compiles for the device, uploads the library through the tracker and
times it there; the numbers come back.

One timing protocol for every target and for the PyTorch eager baseline: `warmup` untimed
runs, then `repeat` timed repeats of `number` runs each, `number` grown until a repeat lasts
`min_repeat_ms` (TVM's own timer, also on the device); median, standard deviation, p90 and
the median's 95% interval of the per-run times. `cache_flush` evicts the CPU caches before
every repeat (one run each, a cold-cache latency); `pin` keeps the process's threads on the
first `threads` CPUs meanwhile. A timing phase runs alone on its device (a lock per device of
this machine), watches what else used the CPU, and times again when it was disturbed.

The package, module by module:

    targets.py  what hw.target names: TargetSpec, the registry entries, rpc:// URLs, DEVICES
    cpu.py      this CPU: its model and the LLVM target for it (features the OS hides off)
    timing.py   the timing protocol (TVM anywhere, PyTorch eager here)
    stats.py    95% intervals of a median and of a speedup
    exclusive.py  one timing phase at a time per device; what else ran; timing again
    device.py   the contract of a device kind, the resolved Device, the layer's entry points
    local.py, rpc.py, cuda.py   the device kinds, each registered in DEVICES

This module is the public face: the rest of the code uses `hardware.<name>` from `__all__`.
"""
from __future__ import annotations

from .cpu import _cpuinfo_flags, _feature_key, cpu_model, local_target  # cpu first: TVM's pool
from .targets import (BUILTIN_TARGETS, DEVICES, RPC_FORM, HardwareConfig, TargetSpec,
                      TargetUnavailable, check, lookup, parse_rpc_url, target_spec)
from .timing import (MACHINE_CPUS, Timing, last_level_cache_bytes, pinned, run_tvm, time_torch,
                     time_tvm)
from .stats import median_ci, ratio_ci
from .exclusive import Watch, away_from_timing, disturbed, exclusively, timing_lock
from .device import Device, DeviceKind, availability, export_library, measure, resolve
# the device kinds, registered in DEVICES in this order (the order `allowed:` lists them)
from . import local, rpc, cuda  # noqa: F401  (registration)
from .rpc import measure_remote, remote_failure, rpc_session, tracker_status
from ..registry import discover

discover(__name__, __path__)  # a new device kind is one module here: it registers on import

__all__ = [
    # targets
    "DEVICES", "RPC_FORM", "BUILTIN_TARGETS", "TargetSpec", "HardwareConfig",
    "TargetUnavailable", "target_spec", "parse_rpc_url", "lookup", "check",
    # this CPU
    "cpu_model", "local_target",
    # devices
    "DeviceKind", "Device", "resolve", "availability", "measure", "export_library",
    "tracker_status", "rpc_session", "remote_failure", "measure_remote",
    # the timing protocol
    "Timing", "run_tvm", "time_tvm", "time_torch", "pinned", "last_level_cache_bytes",
    # how sure a timing is, and timing alone
    "median_ci", "ratio_ci", "timing_lock", "Watch", "disturbed", "exclusively",
    "away_from_timing", "MACHINE_CPUS",
]
# not in __all__, kept importable for the tests of local_target: _cpuinfo_flags, _feature_key
