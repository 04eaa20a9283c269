"""Timing alone: one timing phase at a time per device, and a record of what else ran.

Two workers of a study on one machine would otherwise time while the other trains or times,
and both numbers would be wrong. Three things keep a measurement honest:

- `timing_lock(name)`: a file lock per device on this machine (filelock; the OS releases it
  when its holder dies, so a killed worker never blocks the others). Workers keep training
  and compiling in parallel; only the timing phase is exclusive. Remote devices need none:
  their RPC tracker hands a board to one session at a time.
- `Watch`: while a phase runs, how much CPU the *other* processes of the machine used (in
  cores: the machine's busy time minus this process's own, by psutil) and the load average
  at its end.
- `disturbed`: whether a timing should be repeated, because others used the CPU (more than
  `OTHER_CPU_LIMIT` cores) or the interval of the median is wide (more than `SPREAD_LIMIT` of
  the median). `exclusively` times again up to `MAX_RETIMES` times, keeps the quietest
  attempt and records how many it took; it never times again silently.

`away_from_timing` moves a worker's own work (training, compiling) off the CPUs that timing
pins to, where the machine has a core for every worker besides them.

What the lock cannot remove is shared hardware: a neighbour training on another core still
uses the memory bus and the last-level cache (docs/benchmarks.md measures it).
"""
from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable, TypeVar

import psutil
from filelock import FileLock

__all__ = ["LOCK_DIR_ENV", "MAX_RETIMES", "OTHER_CPU_LIMIT", "SPREAD_LIMIT", "lock_path",
           "timing_lock", "Watch", "disturbed", "exclusively", "away_from_timing"]

T = TypeVar("T")

LOCK_DIR_ENV = "DLAS_TIMING_LOCK_DIR"
MAX_RETIMES = 2
OTHER_CPU_LIMIT = 0.25   # cores used by other processes while timing
SPREAD_LIMIT = 0.10      # width of the median's 95% interval, as a fraction of the median


def lock_path(device: str) -> Path:
    """The lock file of `device` on this machine: in $DLAS_TIMING_LOCK_DIR, else in the
    system's temporary folder, so that every study on the machine (whatever its storage or
    stage cache) shares it."""
    folder = Path(os.environ.get(LOCK_DIR_ENV) or Path(tempfile.gettempdir()) / "dlas-search")
    folder.mkdir(parents=True, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in device)
    return folder / f"timing-{socket.gethostname()}-{safe}.lock"


@contextlib.contextmanager
def timing_lock(device: str, enabled: bool = True):
    """Hold the device's timing lock for the block; yields the seconds spent waiting for it."""
    if not enabled:
        yield 0.0
        return
    lock = FileLock(str(lock_path(device)))
    start = time.perf_counter()
    with lock:
        yield time.perf_counter() - start


def _cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process) so far."""
    machine = psutil.cpu_times()
    busy = sum(getattr(machine, name, 0.0) for name in
               ("user", "nice", "system", "irq", "softirq"))  # not idle, iowait or steal
    own = psutil.Process().cpu_times()
    return busy, own.user + own.system


class Watch:
    """`with Watch() as w: ...` then `w.other_cpu` (cores the machine's other processes used,
    on average, during the block), `w.load` (1-minute load average at its end) and
    `w.start`/`w.end` (wall-clock seconds since the epoch)."""
    other_cpu: float = 0.0
    load: float = 0.0
    start: float = 0.0
    end: float = 0.0

    def __enter__(self) -> "Watch":
        self.start = time.time()
        self._wall = time.perf_counter()
        self._busy, self._own = _readable(_cpu_seconds)
        return self

    def __exit__(self, *exc) -> None:
        wall = max(time.perf_counter() - self._wall, 1e-6)
        busy, own = _readable(_cpu_seconds)
        self.other_cpu = max(0.0, (busy - self._busy) - (own - self._own)) / wall
        self.load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        self.end = time.time()


def _readable(read) -> tuple[float, float]:
    try:
        return read()
    except (OSError, psutil.Error):  # CPU times unreadable here: nothing known of the others
        return 0.0, 0.0


def disturbed(timings: dict[str, tuple[float, tuple[float, float]]],
              other_cpu: float) -> str | None:
    """Why a timing phase looks disturbed (to be repeated), or None when it looks clean:
    `timings` names each timing of the phase with its median and 95% interval."""
    reasons = []
    if other_cpu > OTHER_CPU_LIMIT:
        reasons.append(f"other processes used {other_cpu:.2f} cores (limit {OTHER_CPU_LIMIT})")
    wide = [f"{name} {(high - low) / median:.0%}" for name, (median, (low, high))
            in timings.items() if median > 0 and (high - low) / median > SPREAD_LIMIT]
    if wide:
        reasons.append(f"the median's 95% interval is wide ({', '.join(wide)} of the median; "
                       f"limit {SPREAD_LIMIT:.0%})")
    return "; ".join(reasons) or None


def exclusively(device: str, attempt: Callable[[], T],
                judge: Callable[[T, float], str | None], local: bool = True,
                say: Callable[[str], None] = lambda line: None) -> tuple[T, dict[str, float]]:
    """Run the timing `attempt` under the device's lock (when the device is this machine's,
    `local`), watching the others; while `judge(value, other_cpu)` says it was disturbed,
    time again, up to MAX_RETIMES more times, each said through `say`. Gives the value of the
    clean attempt, or when none was clean of the one during which the others used the least
    CPU (the earliest of equals), and the metrics of the phase: `timing_wait_s` (waiting for the lock),
    `timing_attempts`, `timing_other_cpu` and `timing_load` (of the attempt kept),
    `timing_start` / `timing_end` (epoch seconds of the whole phase, under the lock)."""
    with timing_lock(device, enabled=local) as waited:
        tries = []
        for n in range(MAX_RETIMES + 1):
            with Watch() as watch:
                value = attempt()
            why = judge(value, watch.other_cpu if local else 0.0)
            tries.append((why is not None, watch.other_cpu, n, value, watch))
            if why is None:
                break
            say(f"timing on {device} looks disturbed: {why}; "
                + (f"timing again ({n + 2} of at most {MAX_RETIMES + 1})" if n < MAX_RETIMES
                   else f"kept the quietest of {n + 1} attempts"))
    _, _, _, value, kept = min(tries, key=lambda t: t[:3])
    return value, {"timing_wait_s": waited, "timing_attempts": float(len(tries)),
                   "timing_other_cpu": kept.other_cpu, "timing_load": kept.load,
                   "timing_start": tries[0][4].start, "timing_end": tries[-1][4].end}


def away_from_timing(timing_threads: int, workers: int) -> list[int] | None:
    """In a worker process of a study with `workers` workers: keep this process's work off the
    first `timing_threads` CPUs (those timing.pinned times on) when every worker still has a
    CPU of its own; the CPUs left to it, or None when the machine has too few (then the lock
    and `disturbed` are what keep timings honest)."""
    from .timing import MACHINE_CPUS

    rest = MACHINE_CPUS[timing_threads:]
    if not hasattr(os, "sched_setaffinity") or len(rest) < workers:
        return None
    os.sched_setaffinity(0, rest)
    return rest
