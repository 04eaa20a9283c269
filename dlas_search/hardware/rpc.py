"""Device kind `rpc`: a device behind a TVM RPC tracker (a board, a phone, another machine).

A remote trial cross-compiles for the device, uploads the library through the tracker and
times it there under the protocol (timing.time_vm, TVM's timer on the device); the output
and the numbers come back. A registry entry names the tracker (`host:port`) and the key its
servers registered with; inline, `rpc://HOST:PORT/KEY` (targets.parse_rpc_url).

Everything that can go wrong at a distance becomes TargetUnavailable with the reason in
words: the tracker does not answer, no device has the key, none is free within `wait_s`, the
server went away mid-measurement, the session outlived `timeout_s`. The trial fails alone.
"""
from __future__ import annotations

import contextlib
import gc
import socket
import tempfile
import time
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import tvm
from tvm import relax

from ..errors import BadInput
from .device import Device, DeviceKind
from .targets import (DEVICES, HardwareConfig, TargetSpec, TargetUnavailable, device_key,
                      tracker_address)
from .timing import Timing, time_vm

__all__ = ["Rpc", "tracker_status", "rpc_session", "remote_failure", "measure_remote"]


@DEVICES.register("rpc")
class Rpc(DeviceKind):
    """A device behind a TVM RPC tracker."""
    label = "a device behind a TVM RPC tracker"
    remote = True
    own_keys = ("tracker", "key", "cross_compiler")

    def entry(self, entry: Mapping, label: str) -> dict:
        if "key" not in entry or "tracker" not in entry:
            raise BadInput(f"{label}: an rpc target needs tracker (host:port) and key")
        return {"tracker": tracker_address(str(entry["tracker"]), f"{label}.tracker"),
                "key": device_key(entry["key"], f"{label}.key")}

    def availability(self, spec: TargetSpec) -> str | None:
        try:
            status = tracker_status(spec)
        except TargetUnavailable as e:
            return str(e)
        if not status["registered"]:
            return (f"no device with key {spec.key!r} is registered at tracker {spec.tracker} "
                    f"(keys there: {', '.join(status['keys']) or 'none'})")
        return None

    def resolve(self, spec: TargetSpec, threads: int) -> Device:
        try:  # a tracker that is down fails the trial now; a device may still come (wait_s)
            tracker_status(spec)
        except TargetUnavailable as e:
            raise TargetUnavailable(f"hw.target {spec.name}: {e}") from None
        return Device(spec.name, spec.tvm_target(threads), threads,
                      f"{spec.label or spec.key} (rpc key {spec.key} at {spec.tracker}), "
                      f"{threads} thread(s)", spec)

    def measure(self, executable, example: torch.Tensor, cfg: HardwareConfig,
                device: Device) -> tuple[np.ndarray, Timing]:
        return measure_remote(executable, example, cfg, device)

    def info(self, device: Device) -> dict[str, str]:
        return {"device_key": device.spec.key, "tracker": device.spec.tracker}

    def listing(self, spec: TargetSpec, registry) -> dict:
        row = {"tvm": spec.tvm or "like the local CPU", "tracker": spec.tracker, "key": spec.key}
        try:
            status = tracker_status(spec)
        except TargetUnavailable as e:
            return {**row, "status": str(e)}
        state = "ready" if status["free"] else "busy" if status["registered"] else "no device"
        return {**row, "registered": status["registered"], "free": status["free"],
                "status": f"{state}: {status['registered']} registered, {status['free']} free"}

    def where(self, spec: TargetSpec) -> str:
        return f" {spec.key}@{spec.tracker}"


def tracker_status(spec: TargetSpec) -> dict:
    """{registered, free, keys} of the spec's key at its tracker; TargetUnavailable when the
    tracker does not answer (probed with a short time-out: TVM's own client retries 60 s)."""
    host, port = spec.address
    try:
        socket.create_connection((host, port), timeout=3).close()
        summary = tvm.rpc.connect_tracker(host, port).summary()
    except (OSError, RuntimeError) as e:
        raise TargetUnavailable(f"tracker {spec.tracker} unreachable "
                                f"({type(e).__name__}: {e})") from None
    servers = [s.get("key", "") for s in summary.get("server_info", [])]
    keys = sorted({k.split(":", 1)[-1] for k in servers})
    return {"registered": sum(k == f"server:{spec.key}" for k in servers),
            "free": int(summary.get("queue_info", {}).get(spec.key, {}).get("free", 0)),
            "keys": keys}


@contextlib.contextmanager
def rpc_session(spec: TargetSpec):
    """A session on a free device with the spec's key: waits up to `wait_s` for one (a busy or
    rebooting board), then fails clearly instead of queueing forever at the tracker."""
    deadline = time.monotonic() + spec.wait_s
    while True:
        status = tracker_status(spec)
        if status["free"] >= 1:
            break
        if time.monotonic() >= deadline:
            what = (f"{status['registered']} registered, none free" if status["registered"]
                    else f"none registered (keys there: {', '.join(status['keys']) or 'none'})")
            raise TargetUnavailable(f"hw.target {spec.name}: no free device with key "
                                    f"{spec.key!r} at tracker {spec.tracker} after "
                                    f"{spec.wait_s:g} s: {what}")
        time.sleep(0.5)
    tracker = tvm.rpc.connect_tracker(*spec.address)
    tracker._sock.settimeout(max(spec.wait_s, 5))  # a request for a taken device must not hang
    try:
        session = tracker.request(spec.key, priority=1, session_timeout=spec.timeout_s,
                                  max_retry=1)
    except RuntimeError as e:
        raise TargetUnavailable(f"hw.target {spec.name}: the tracker gave no device with key "
                                f"{spec.key!r}: {e}") from None
    try:
        yield session
    finally:
        del session
        gc.collect()  # the device is free again only when every remote object is gone


def remote_failure(spec: TargetSpec, error: Exception) -> TargetUnavailable:
    """A remote error in words: the server went away, or the session ran out of time."""
    text = f"{type(error).__name__}: {error}"
    gone = ("kShutdown", "Connection reset", "Broken pipe", "SockChannel")
    if any(word in text for word in gone) or isinstance(error, (ConnectionError, EOFError)):
        why = "the RPC server went away during the measurement (connection shut down)"
    elif "RPCSessionTimeoutError" in text or "session has expired" in text:
        why = f"the measurement took longer than the session limit of {spec.timeout_s:g} s"
    else:
        why = text.strip().splitlines()[-1][:500]
    return TargetUnavailable(f"hw.target {spec.name} (key {spec.key!r} at {spec.tracker}): "
                             f"{why}")


def measure_remote(executable, example: torch.Tensor, cfg: HardwareConfig,
                   device: Device) -> tuple[np.ndarray, Timing]:
    """Upload the module to a device behind the tracker, run it once (the output comes back
    for the correctness check) and time it there under the protocol."""
    spec = device.spec
    with tempfile.TemporaryDirectory(prefix="dlas-rpc-") as folder:
        library = device.kind.export(executable, device, Path(folder))
        with rpc_session(spec) as session:
            try:
                return _remote_run(session, library, example, cfg, device.threads)
            except TargetUnavailable:
                raise
            except Exception as e:
                raise remote_failure(spec, e) from None


def _remote_run(session, library: Path, example: torch.Tensor, cfg: HardwareConfig,
                threads: int) -> tuple[np.ndarray, Timing]:
    """Every remote object lives in this frame only, so the session ends with it."""
    session.upload(str(library))
    module = session.load_module(library.name)
    session.get_function("runtime.config_threadpool")(1, threads)
    dev = session.cpu()
    vm = relax.VirtualMachine(module, dev)
    x = tvm.runtime.tensor(example.numpy(), dev)
    return time_vm(vm, dev, x, cfg, 64 << 20)
