"""Device kind `local`: the CPU running the search.

The trial's threads are set for both TVM's pool and PyTorch's, so that TVM and the PyTorch
eager baseline (which runs here, in this process) are timed with the same number; the module
is run and timed in this process under the protocol (timing.py).
"""
from __future__ import annotations

import os

import numpy as np
import torch
import tvm

from . import timing
from .cpu import cpu_model
from .device import Device, DeviceKind, resolve
from .targets import DEVICES, HardwareConfig, TargetSpec
from .timing import Timing

__all__ = ["Local"]


@DEVICES.register("local")
class Local(DeviceKind):
    """The CPU running the search."""
    label = "the CPU running the search"
    eager = True

    def resolve(self, spec: TargetSpec, threads: int) -> Device:
        threads = min(threads, os.cpu_count() or 1)
        tvm.get_global_func("runtime.config_threadpool")(1, threads)
        torch.set_num_threads(threads)
        return Device(spec.name, spec.tvm_target(threads), threads,
                      f"{cpu_model()}, {threads} thread(s)", spec)

    def listing(self, spec: TargetSpec, registry) -> dict:
        """Ready targets show the TVM target this CPU gets (features the OS hides off)."""
        row = super().listing(spec, registry)
        if row["status"] == "ready":
            device = resolve(HardwareConfig(target=spec.name), registry)
            row.update(tvm=str(device.target),
                       label=f"{spec.label}: {cpu_model()}, {os.cpu_count()} cores")
        return row

    def measure(self, executable, example: torch.Tensor, cfg: HardwareConfig,
                device: Device) -> tuple[np.ndarray, Timing]:
        # through the module, so that patching timing.run_tvm / time_tvm reaches here
        output = timing.run_tvm(executable, example)
        return output, timing.time_tvm(executable, example, cfg, device.threads)
