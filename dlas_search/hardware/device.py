"""The contract of a device kind, and the device a trial runs on.

A device kind (`device:` of a target entry: local, rpc, cuda) is one class in its own module,
registered in DEVICES (targets.py) by that name. It knows everything particular to its kind:
the entry keys only it accepts (`own_keys`, checked by `entry`), whether it can run now
(`availability`), how to set itself up for a trial (`resolve`, giving a `Device`), and how a
compiled module is run and timed on it (`measure`, under the protocol of timing.py) and
exported for it (`export`). Adding a kind is one module registering a subclass (the package
imports every module of its own) and targets naming it in spaces/targets.yaml.

`Device` is what the layers above get: the TVM target to compile for, the thread count, a
description for people and the MLflow tags, and its kind to measure with. The functions at the
bottom are the layer's entry points; they only find the kind and ask it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import tvm

from .targets import BUILTIN_TARGETS, DEVICES, HardwareConfig, TargetSpec, lookup
from .timing import Timing

__all__ = ["DeviceKind", "Device", "resolve", "availability", "measure", "export_library"]


class DeviceKind:
    """What a kind of device does; subclasses register with `@DEVICES.register("name")`
    (the registry sets `name`)."""
    name: str = ""
    label: str = ""
    # on another machine: measured there, and MetaSchedule measures candidates there too
    remote: bool = False
    # PyTorch eager runs on it (this process's CPU): the baseline timed beside TVM, and
    # `compiler.backend: torch`
    eager: bool = False
    # keys of a target entry that only this kind accepts (another kind's entry is refused)
    own_keys: tuple[str, ...] = ()

    def entry(self, entry: Mapping, label: str) -> dict:
        """The TargetSpec fields this kind reads from a registry entry, validated (BadInput
        naming `label` and the key); the common keys are checked by targets.target_spec."""
        return {}

    def availability(self, spec: TargetSpec) -> str | None:
        """Why the target cannot run now, or None (no waiting: for listings and the
        pre-flight check)."""
        return None

    def resolve(self, spec: TargetSpec, threads: int) -> "Device":
        """The device for a trial, set up to run with `threads`; TargetUnavailable when it
        cannot run now."""
        raise NotImplementedError

    def measure(self, executable, example: torch.Tensor, cfg: HardwareConfig,
                device: "Device") -> tuple[np.ndarray, Timing]:
        """Run the compiled module once on the device (the output, for the correctness
        check) and time it there under the protocol."""
        raise NotImplementedError

    def export(self, executable, device: "Device", folder: Path) -> Path:
        """The compiled module as a shared library for the device (cross-linked when the
        device's architecture is not this machine's)."""
        path = Path(folder) / "model.so"
        path.parent.mkdir(parents=True, exist_ok=True)
        command = device.spec.compiler_command()
        if command:
            from tvm.support import cc
            executable.export_library(str(path), fcompile=cc.cross_compiler(command))
        else:
            executable.export_library(str(path))
        return path

    def info(self, device: "Device") -> dict[str, str]:
        """MLflow tags (`dlas.*`) particular to this kind."""
        return {}

    def listing(self, spec: TargetSpec, registry: Mapping[str, TargetSpec]) -> dict:
        """What `dlas targets` shows of a target of this kind besides its name, kind, label and
        threads: `status` (ready, or why not), `tvm` (its TVM target), and whatever else only
        this kind knows (an RPC tracker's counts)."""
        return {"tvm": spec.tvm or "like the local CPU",
                "status": self.availability(spec) or "ready"}

    def where(self, spec: TargetSpec) -> str:
        """A few words after the kind in `dlas targets`' text listing (an RPC key@tracker)."""
        return ""


@dataclass
class Device:
    name: str
    target: tvm.target.Target
    threads: int
    description: str
    spec: TargetSpec = BUILTIN_TARGETS["local"]

    @property
    def kind(self) -> DeviceKind:
        return DEVICES[self.spec.device]

    @property
    def remote(self) -> bool:
        return self.kind.remote

    @property
    def rpc(self) -> tuple[str, int, str] | None:
        """(tracker host, tracker port, key) of a remote device, for MetaSchedule's runner."""
        return (*self.spec.address, self.spec.key) if self.remote else None

    def info(self) -> dict[str, str]:
        """What the run records about where it ran (MLflow tags `dlas.*`)."""
        out = {"device": self.description, "target": str(self.target),
               "threads": str(self.threads), "device_kind": self.spec.device}
        out.update(self.kind.info(self))
        return out

    def measure(self, executable, example: torch.Tensor,
                cfg: HardwareConfig) -> tuple[np.ndarray, Timing]:
        return self.kind.measure(executable, example, cfg, self)


def resolve(cfg: HardwareConfig, registry: Mapping[str, TargetSpec] | None = None) -> Device:
    """The device a trial runs on, with its TVM target and thread count set; raises
    TargetUnavailable when it cannot run now."""
    spec = lookup(cfg.target, registry)
    return DEVICES[spec.device].resolve(spec, cfg.threads or spec.threads or 1)


def availability(spec: TargetSpec) -> str | None:
    """Why the target cannot run now, or None when it can (no waiting: for listings and the
    pre-flight check)."""
    return DEVICES[spec.device].availability(spec)


def measure(executable, example: torch.Tensor, cfg: HardwareConfig,
            device: Device) -> tuple[np.ndarray, Timing]:
    """The compiled module's output (for the correctness check) and its timing, on the
    trial's device, wherever it is."""
    return device.kind.measure(executable, example, cfg, device)


def export_library(executable, device: Device, folder: Path) -> Path:
    """The compiled module as a shared library for the device (cross-linked when the
    device's architecture is not this machine's)."""
    return device.kind.export(executable, device, folder)
