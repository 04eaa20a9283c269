"""What `hw.target` names, checked before any device is touched.

A target is `local` (the CPU running the search), `cuda` (the first GPU, when there is one),
a name from the space's target registry (`targets:`, see spaces/targets.yaml), or a device
behind a TVM RPC tracker written inline as `rpc://HOST:PORT/KEY` (optionally
`?target=<TVM target JSON>`; by default the device is assumed to be like the local CPU).

Everything here is pure parsing and validation (a BadInput naming the entry and the key), so
a space is refused before the study starts. Which device kinds exist (`device:` of an entry)
is the DEVICES registry; a kind validates the entry keys only it accepts (`entry`), the rest
(the TVM target, threads, waits) is common and checked here. `HardwareConfig` is the layer's
section of a space (`hw.*`): the target and the timing protocol's settings (timing.py).
"""
from __future__ import annotations

import json
import platform
import shutil
import urllib.parse
from dataclasses import dataclass, field
from typing import Mapping

import tvm

from ..errors import BadInput, allowed
from ..registry import Registry
from .cpu import local_target

__all__ = ["DEVICES", "RPC_FORM", "BUILTIN_TARGETS", "TargetSpec", "HardwareConfig",
           "TargetUnavailable", "target_spec", "parse_rpc_url", "lookup", "check",
           "tracker_address", "device_key"]

# The device kinds (`device:` of a registry entry): each registers here from its own module
# (local.py, rpc.py, cuda.py), an instance of device.DeviceKind.
DEVICES = Registry("device", "device kind", instantiate=True)
RPC_FORM = "rpc://HOST:PORT/KEY[?target=<TVM target JSON>]"


class TargetUnavailable(RuntimeError):
    """The target is well formed but cannot run now (no GPU, tracker down, no device with the
    key, the server went away): the trial fails alone; a space none of whose targets can run
    is refused before the study starts (search.preflight)."""


@dataclass(frozen=True)
class TargetSpec:
    """One entry of the target registry (or an inline `rpc://` target)."""
    name: str
    device: str = "local"                 # a DEVICES name: local | rpc | cuda
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


BUILTIN_TARGETS = {
    "local": TargetSpec("local", "local", label="the CPU running the search"),
    "cuda": TargetSpec("cuda", "cuda", label="the first CUDA GPU of this machine"),
}
_ENTRY_KEYS = ("device", "tvm", "tracker", "key", "threads", "label", "cross_compiler",
               "wait_s", "timeout_s")


def _words(names) -> str:
    """`a`, `a and b`, `a, b and c`."""
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


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
    if not isinstance(device, str) or device not in DEVICES:
        raise allowed(f"{label}.device", device, DEVICES.names())
    kind = DEVICES[device]
    values: dict = {"name": name, "device": device, "label": str(entry.get("label", ""))}
    if "tvm" in entry:
        values["tvm"] = _target_json(entry["tvm"], f"{label}.tvm")
    for other in DEVICES.names():  # keys another kind owns (tracker, key: rpc's)
        owned = DEVICES[other].own_keys
        if other != device and set(owned) & set(entry) - set(kind.own_keys):
            raise BadInput(f"{label}: {_words(owned)} are for device: {other} only")
    values.update(kind.entry(entry, label))
    for key, kind_of, low in (("threads", int, 1), ("wait_s", (int, float), 0),
                              ("timeout_s", (int, float), 1)):
        if key in entry:
            value = entry[key]
            if not isinstance(value, kind_of) or isinstance(value, bool) or value < low:
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


def tracker_address(text: str, label: str) -> str:
    """`host:port` of a TVM RPC tracker, checked."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadInput(f"{label}: {text!r} is not host:port, e.g. 127.0.0.1:9190")
    return f"{host}:{int(port)}"


def device_key(value: object, label: str) -> str:
    """The key RPC servers register with, checked (a name: no spaces, slashes or colons)."""
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
    values = {"name": text, "device": "rpc", "tracker": tracker_address(parts.netloc, label),
              "key": device_key(key, label), "label": f"device {key!r} at tracker {parts.netloc}"}
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
