"""Device kind `cuda`: the first CUDA GPU of this machine.

The TVM target is CUDA for the GPU's compute capability, with this CPU as the host (the
host code runs here). A machine without a GPU reports the target unavailable, so a space
naming it beside `local` still runs its local trials.
"""
from __future__ import annotations

import numpy as np
import torch
import tvm
from tvm import relax

from .cpu import local_target
from .device import Device, DeviceKind
from .targets import DEVICES, HardwareConfig, TargetSpec, TargetUnavailable
from .timing import Timing, time_vm

__all__ = ["Cuda"]


@DEVICES.register("cuda")
class Cuda(DeviceKind):
    """The first CUDA GPU of this machine."""
    label = "the first CUDA GPU of this machine"

    def availability(self, spec: TargetSpec) -> str | None:
        return None if tvm.cuda().exist else "unavailable: no CUDA device on this machine"

    def listing(self, spec: TargetSpec, registry) -> dict:
        return {"tvm": spec.tvm or "cuda, arch detected",
                "status": self.availability(spec) or "ready"}

    def resolve(self, spec: TargetSpec, threads: int) -> Device:
        why = self.availability(spec)
        if why:
            raise TargetUnavailable(f"hw.target {spec.name}: {why}")
        gpu = tvm.cuda()
        arch = "sm_" + gpu.compute_version.replace(".", "")
        target = tvm.target.Target({"kind": "cuda", "arch": arch}, host=local_target(threads))
        return Device(spec.name, target, threads, f"{gpu.device_name} ({arch})", spec)

    def measure(self, executable, example: torch.Tensor, cfg: HardwareConfig,
                device: Device) -> tuple[np.ndarray, Timing]:
        """The protocol on the GPU (TVM's timer synchronises the device); `cache_flush`
        evicts nothing there (it flushes CPU caches)."""
        dev = tvm.cuda()
        vm = relax.VirtualMachine(executable, dev)
        return time_vm(vm, dev, tvm.runtime.tensor(example.numpy(), dev), cfg, 0)
