"""Layer 6, hardware: where the compiled module runs, and how it is timed.

`hw.target` names a target: `local` (the CPU running the search), `cuda` (the first GPU, when
there is one), a name from the space's target registry (`targets:`, see spaces/targets.yaml),
or a device behind a TVM RPC tracker written inline as `rpc://HOST:PORT/KEY` (optionally
`?target=<TVM target JSON>`; by default the device is assumed to be like the local CPU).
A remote trial cross-compiles for the device, uploads the library through the tracker and
times it there; the numbers come back.

One timing protocol for every target and for the PyTorch eager baseline: `warmup` untimed
runs, then `repeat` timed repeats of `number` runs each, `number` grown until a repeat lasts
`min_repeat_ms` (TVM's own timer, also on the device); median, standard deviation and p90 of
the per-run times. `cache_flush` evicts the CPU caches before every repeat (one run each, a
cold-cache latency); `pin` keeps the process's threads on the first `threads` CPUs meanwhile.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import shutil
import socket
import statistics
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import tvm
from tvm import relax

from .errors import BadInput, allowed

DEVICES = ("local", "rpc", "cuda")
RPC_FORM = "rpc://HOST:PORT/KEY[?target=<TVM target JSON>]"
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




class TargetUnavailable(RuntimeError):
    """The target is well formed but cannot run now (no GPU, tracker down, no device with the
    key, the server went away): the trial fails alone; a space none of whose targets can run
    is refused before the study starts (search.preflight)."""


@dataclass(frozen=True)
class TargetSpec:
    """One entry of the target registry (or an inline `rpc://` target)."""
    name: str
    device: str = "local"                 # local | rpc | cuda
    tvm: str | None = None                # TVM target, JSON text; None: the local CPU's
    tracker: str | None = None            # rpc: "host:port" of the TVM RPC tracker
    key: str | None = None                # rpc: the device key its servers registered with
    threads: int | None = None            # threads to run with, unless hw.threads says
    label: str = ""                       # for people: "Raspberry Pi 4 (4x Cortex-A72)"
    cross_compiler: str | None = None     # rpc: e.g. aarch64-linux-gnu-gcc (None: inferred)
    wait_s: float = 60.0                  # rpc: how long a trial waits for a free device
    timeout_s: float = 600.0              # rpc: the session's limit (one trial's measurement)

    @property
    def address(self) -> tuple[str, int]:
        host, _, port = (self.tracker or "").rpartition(":")
        return host, int(port)

    def tvm_target(self, threads: int) -> tvm.target.Target:
        """The TVM target to compile for: the given JSON, else the local CPU's; LLVM CPU
        targets get `num-cores` (the threads MetaSchedule tunes for) unless they say."""
        if self.tvm is None:
            return local_target(threads)
        spec = json.loads(self.tvm)
        if spec.get("kind") == "llvm":
            spec.setdefault("num-cores", threads)
        return tvm.target.Target(spec)

    def compiler_command(self) -> str | None:
        """The C compiler that links the library for the device: the given one, else
        `<mtriple>-gcc` when the target's architecture is not this machine's."""
        if self.cross_compiler or self.tvm is None:
            return self.cross_compiler
        triple = json.loads(self.tvm).get("mtriple")
        if not triple:
            return None
        arch, here = triple.split("-")[0], platform.machine().lower()
        same = arch == here or {arch, here} <= {"x86_64", "amd64"} or \
            {arch, here} <= {"aarch64", "arm64"}
        return None if same else f"{triple}-gcc"


BUILTIN_TARGETS = {
    "local": TargetSpec("local", "local", label="the CPU running the search"),
    "cuda": TargetSpec("cuda", "cuda", label="the first CUDA GPU of this machine"),
}
_ENTRY_KEYS = ("device", "tvm", "tracker", "key", "threads", "label", "cross_compiler",
               "wait_s", "timeout_s")


def target_spec(name: str, entry: object, where: str = "") -> TargetSpec:
    """A registry entry, validated: any problem is a BadInput naming the entry and key."""
    label = f"{where}targets.{name}"
    if not isinstance(entry, dict):
        raise BadInput(f"{label}: a mapping with keys {', '.join(_ENTRY_KEYS)}")
    for key in entry:
        if key not in _ENTRY_KEYS:
            raise allowed(label, key, _ENTRY_KEYS)
    if name in BUILTIN_TARGETS or name.startswith("rpc:"):
        raise BadInput(f"{label}: {name!r} is built in; give the entry another name")
    device = entry.get("device", "local")
    if device not in DEVICES:
        raise allowed(f"{label}.device", device, DEVICES)
    values: dict = {"name": name, "device": device, "label": str(entry.get("label", ""))}
    if "tvm" in entry:
        values["tvm"] = _target_json(entry["tvm"], f"{label}.tvm")
    if device == "rpc":
        if "key" not in entry or "tracker" not in entry:
            raise BadInput(f"{label}: an rpc target needs tracker (host:port) and key")
        values["tracker"] = _tracker(str(entry["tracker"]), f"{label}.tracker")
        values["key"] = _key(entry["key"], f"{label}.key")
    elif {"tracker", "key", "cross_compiler"} & set(entry):
        raise BadInput(f"{label}: tracker, key and cross_compiler are for device: rpc only")
    for key, kind, low in (("threads", int, 1), ("wait_s", (int, float), 0),
                           ("timeout_s", (int, float), 1)):
        if key in entry:
            value = entry[key]
            if not isinstance(value, kind) or isinstance(value, bool) or value < low:
                raise BadInput(f"{label}.{key}: {value!r} must be a number >= {low}")
            values[key] = value
    if "cross_compiler" in entry:
        values["cross_compiler"] = str(entry["cross_compiler"])
    return TargetSpec(**values)


def _target_json(value: object, label: str) -> str:
    """A TVM target as JSON text, checked by constructing it."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise BadInput(f"{label}: not JSON ({e.msg}); give a TVM target dict, e.g. "
                           '{"kind": "llvm", "mtriple": "aarch64-linux-gnu"}') from None
    if not isinstance(value, dict) or "kind" not in value:
        raise BadInput(f"{label}: a TVM target dict with a kind, e.g. "
                       '{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}')
    try:
        tvm.target.Target(value)
    except Exception as e:  # TVM says what is wrong with the dict
        raise BadInput(f"{label}: TVM rejects the target {value}: "
                       f"{str(e).strip().splitlines()[-1]}") from None
    return json.dumps(value, sort_keys=True)


def _tracker(text: str, label: str) -> str:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadInput(f"{label}: {text!r} is not host:port, e.g. 127.0.0.1:9190")
    return f"{host}:{int(port)}"


def _key(value: object, label: str) -> str:
    if not isinstance(value, str) or not value or any(c in value for c in " /?#:"):
        raise BadInput(f"{label}: {value!r} is not a device key (a name such as pi4)")
    return value


def parse_rpc_url(text: str) -> TargetSpec:
    """`rpc://HOST:PORT/KEY[?target=<TVM target JSON>]` as a target."""
    label = f"hw.target {text!r}"
    parts = urllib.parse.urlsplit(text)
    key = urllib.parse.unquote(parts.path.lstrip("/"))
    if parts.scheme != "rpc" or not parts.netloc or not key:
        raise BadInput(f"{label}: an inline remote target is {RPC_FORM}")
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    unknown = set(query) - {"target"}
    if unknown:
        raise allowed(f"{label}: query", sorted(unknown)[0], ["target"])
    values = {"name": text, "device": "rpc", "tracker": _tracker(parts.netloc, label),
              "key": _key(key, label), "label": f"device {key!r} at tracker {parts.netloc}"}
    if "target" in query:
        values["tvm"] = _target_json(query["target"][-1], f"{label}: target")
    return TargetSpec(**values)


def lookup(name: str, registry: Mapping[str, TargetSpec] | None = None) -> TargetSpec:
    """The target `hw.target` names, or a BadInput listing what is allowed."""
    registry = registry or {}
    if name.startswith("rpc:"):
        return parse_rpc_url(name)
    found = registry.get(name) or BUILTIN_TARGETS.get(name)
    if found is None:
        raise allowed("hw.target", name, [*BUILTIN_TARGETS, *registry, RPC_FORM])
    return found


def check(cfg: HardwareConfig, registry: Mapping[str, TargetSpec] | None = None) -> TargetSpec:
    """Checks that need no device: the target is known and well formed, and its cross
    compiler is installed."""
    spec = lookup(cfg.target, registry)
    command = spec.compiler_command()
    if command and shutil.which(command) is None:
        raise BadInput(f"hw.target {spec.name}: cross compiler {command!r} not found; install "
                       "it (Debian: apt-get install gcc-aarch64-linux-gnu for aarch64) or name "
                       "one with cross_compiler: in the target's entry")
    return spec


def availability(spec: TargetSpec) -> str | None:
    """Why the target cannot run now, or None when it can (no waiting: for listings and the
    pre-flight check)."""
    if spec.device == "cuda":
        return None if tvm.cuda().exist else "unavailable: no CUDA device on this machine"
    if spec.device == "rpc":
        try:
            status = tracker_status(spec)
        except TargetUnavailable as e:
            return str(e)
        if not status["registered"]:
            return (f"no device with key {spec.key!r} is registered at tracker {spec.tracker} "
                    f"(keys there: {', '.join(status['keys']) or 'none'})")
    return None


@dataclass(frozen=True)
class HardwareConfig:
    # local, cuda, a registry name, or rpc://HOST:PORT/KEY (see RPC_FORM)
    target: str = "local"
    # unset: the registry entry's threads, else 1
    threads: int | None = field(default=None, metadata={"min": 1, "max": 1024, "unset": 1})
    warmup: int = field(default=3, metadata={"min": 0, "max": 1000})
    repeat: int = field(default=20, metadata={"min": 3, "max": 10000})
    min_repeat_ms: int = field(default=20, metadata={"min": 0, "max": 60000})
    # evict the CPU caches before every repeat (each repeat is then one cold-cache run)
    cache_flush: bool = False
    # keep the process's threads on the first `threads` CPUs while timing (local)
    pin: bool = True


@dataclass
class Device:
    name: str
    target: tvm.target.Target
    threads: int
    description: str
    spec: TargetSpec = BUILTIN_TARGETS["local"]

    @property
    def remote(self) -> bool:
        return self.spec.device == "rpc"

    @property
    def rpc(self) -> tuple[str, int, str] | None:
        """(tracker host, tracker port, key) of a remote device, for MetaSchedule's runner."""
        return (*self.spec.address, self.spec.key) if self.remote else None

    def info(self) -> dict[str, str]:
        """What the run records about where it ran (MLflow tags `dlas.*`)."""
        out = {"device": self.description, "target": str(self.target),
               "threads": str(self.threads), "device_kind": self.spec.device}
        if self.remote:
            out.update(device_key=self.spec.key, tracker=self.spec.tracker)
        return out


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


def resolve(cfg: HardwareConfig, registry: Mapping[str, TargetSpec] | None = None) -> Device:
    """The device a trial runs on, with its TVM target and thread count set; raises
    TargetUnavailable when it cannot run now."""
    spec = lookup(cfg.target, registry)
    threads = cfg.threads or spec.threads or 1
    if spec.device == "cuda":
        if not tvm.cuda().exist:
            raise TargetUnavailable(f"hw.target {spec.name}: unavailable: no CUDA device on "
                                    "this machine")
        gpu = tvm.cuda()
        arch = "sm_" + gpu.compute_version.replace(".", "")
        target = tvm.target.Target({"kind": "cuda", "arch": arch}, host=local_target(threads))
        return Device(spec.name, target, threads, f"{gpu.device_name} ({arch})", spec)
    if spec.device == "rpc":
        try:  # a tracker that is down fails the trial now; a device may still come (wait_s)
            tracker_status(spec)
        except TargetUnavailable as e:
            raise TargetUnavailable(f"hw.target {spec.name}: {e}") from None
        return Device(spec.name, spec.tvm_target(threads), threads,
                      f"{spec.label or spec.key} (rpc key {spec.key} at {spec.tracker}), "
                      f"{threads} thread(s)", spec)
    threads = min(threads, os.cpu_count() or 1)
    tvm.get_global_func("runtime.config_threadpool")(1, threads)
    torch.set_num_threads(threads)
    return Device(spec.name, spec.tvm_target(threads), threads,
                  f"{cpu_model()}, {threads} thread(s)", spec)


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


def _first_output(out) -> np.ndarray:
    while not hasattr(out, "numpy"):  # the importer returns a tuple of outputs
        out = out[0]
    return out.numpy()


def run_tvm(executable, example: torch.Tensor) -> np.ndarray:
    """Run the compiled module once on the local CPU (for the correctness check)."""
    vm = relax.VirtualMachine(executable, tvm.cpu())
    return _first_output(vm["main"](tvm.runtime.tensor(example.numpy(), tvm.cpu())))


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


def _time_vm(vm: relax.VirtualMachine, dev, x, cfg: HardwareConfig,
             flush_bytes: int) -> tuple[np.ndarray, Timing]:
    """The protocol on a VM wherever it lives (local or behind RPC): warm-up, then TVM's timer
    on the device; returns the output (for the correctness check) and the timing."""
    vm.set_input("main", x)  # invoke_stateful: tuple outputs come back over RPC too
    vm.invoke_stateful("main")
    output = _first_output(vm.get_outputs("main"))
    for _ in range(cfg.warmup):
        vm.invoke_stateful("main")
    timer = vm.module.time_evaluator(
        "invoke_stateful", dev, number=1, repeat=cfg.repeat,
        min_repeat_ms=0 if cfg.cache_flush else cfg.min_repeat_ms,
        cache_flush_bytes=flush_bytes if cfg.cache_flush else 0)
    return output, Timing.of([r * 1e3 for r in timer("main").results])


@contextlib.contextmanager
def pinned(threads: int, enabled: bool = True):
    """Keep every thread of this process (TVM's pool, PyTorch's) on the first `threads` CPUs
    this process may use, then give the old masks back; threads started meanwhile get the
    process's old mask too. Yields the CPUs (None when not pinned)."""
    if not enabled or not hasattr(os, "sched_setaffinity"):
        yield None
        return
    before = os.sched_getaffinity(0)
    cpus = set(sorted(before)[:threads])
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
        return _time_vm(vm, dev, tvm.runtime.tensor(example.numpy(), dev), cfg,
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


# --- remote devices ------------------------------------------------------------------------

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


def export_library(executable, device: Device, folder: Path) -> Path:
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
        library = export_library(executable, device, Path(folder))
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
    return _time_vm(vm, dev, x, cfg, 64 << 20)
