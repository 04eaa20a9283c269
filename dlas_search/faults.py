"""Faults and limits of one trial: which layer an exception came from, and a trial run in a
child process under a time and memory limit (the space's `budget.trial_timeout_s` and
`budget.trial_memory_mb`) so a hang or a runaway allocation is really stopped.

    with layer("compile"):                 # an exception leaving here names the layer
        built = compiler.compile(...)
    failed_layer(error)                    # -> "compile"
    result = run_limited(pipeline.run, config, cache_root, timeout_s=60, memory_mb=4000)
"""
from __future__ import annotations

import contextlib
import multiprocessing
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .result import TrialResult
from .stack import STAGES

__all__ = ["LAYERS", "layer", "failed_layer", "TrialFailed", "Limits", "run_limited"]

LAYERS = STAGES  # what a failure is attributed to (stack.py names them)
_ATTRIBUTE = "dlas_layer"
# a spawned child imports torch, TVM and the package before the trial starts; the time limit
# counts from the trial's start, this bounds the imports (a loaded machine takes tens of s)
STARTUP_LIMIT_S = 300
# set in a child process: tells the parent which layer the trial is in (for a time-out)
_report_layer: Callable[[str], None] | None = None


@contextlib.contextmanager
def layer(name: str):
    """Attribute an exception raised inside to layer `name` (the innermost layer wins)."""
    if _report_layer is not None:
        _report_layer(name)
    try:
        yield
    except BaseException as e:
        if getattr(e, _ATTRIBUTE, None) is None:
            with contextlib.suppress(AttributeError, TypeError):  # a few C types refuse
                setattr(e, _ATTRIBUTE, name)
        raise


def failed_layer(error: BaseException) -> str:
    """The layer an exception came from ("trial" if it left no layer: the search itself)."""
    return getattr(error, _ATTRIBUTE, None) or "trial"


class TrialFailed(RuntimeError):
    """A trial that failed in its child process (or was stopped by a limit); carries the
    layer and the child's traceback, which is what the MLflow run keeps as error.txt."""

    def __init__(self, message: str, layer_name: str, child_traceback: str):
        super().__init__(message)
        self.dlas_layer, self.child_traceback = layer_name, child_traceback


@dataclass(frozen=True)
class Limits:
    timeout_s: float | None = None
    memory_mb: float | None = None

    def __bool__(self) -> bool:
        return self.timeout_s is not None or self.memory_mb is not None


def _child(conn, run: Callable, config: Any, cache_root: str | None) -> None:
    """In the child: run the trial, send back what the parent logs (never torch or TVM
    objects: they stay here)."""
    global _report_layer
    from .cache import StageCache
    _report_layer = lambda name: conn.send(("layer", name))  # noqa: E731
    conn.send(("started", None))
    try:
        result = run(config, StageCache(cache_root))
        conn.send(("done", result.to_message()))
    except BaseException as e:
        conn.send(("error", (f"{type(e).__name__}: {e}", failed_layer(e),
                             traceback.format_exc())))
    finally:
        conn.close()


def _kill(process) -> None:
    """Kill the child and whatever it started (TVM's tuning workers)."""
    import psutil
    with contextlib.suppress(psutil.Error):
        family = psutil.Process(process.pid)
        for p in [*family.children(recursive=True), family]:
            with contextlib.suppress(psutil.Error):
                p.kill()
    process.join(10)


def _rss_mb(pid: int) -> float:
    """Resident memory of the child and its children, in MB."""
    import psutil
    total = 0
    with contextlib.suppress(psutil.Error):
        family = psutil.Process(pid)
        for p in [family, *family.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
    return total / 2 ** 20


def run_limited(run: Callable, config: Any, cache_root: str | Path | None, limits: Limits,
                poll_s: float = 0.2):
    """Run `run(config, StageCache(cache_root))` in a spawned child (torch and TVM do not
    survive fork) and return a `TrialResult` of what it measured; kill the child and
    raise TrialFailed when it runs past `limits.timeout_s` or its resident memory (with its
    children's) passes `limits.memory_mb`."""
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, name="dlas-trial", daemon=True,
                              args=(send, run, config, str(cache_root) if cache_root else None))
    start = time.monotonic()
    process.start()
    send.close()
    current, stopped, started = "trial", None, False
    try:
        while True:
            if receive.poll(poll_s):
                try:
                    kind, payload = receive.recv()
                except EOFError:  # the child died without a word (killed, segfault)
                    process.join(10)
                    raise TrialFailed(
                        f"the trial's process died (exit code {process.exitcode}) in layer "
                        f"{current}", current, f"child exit code {process.exitcode}") from None
                if kind == "started":  # the time limit counts from here, not the imports
                    start, started = time.monotonic(), True
                elif kind == "layer":
                    current = payload
                elif kind == "done":
                    process.join(30)
                    return TrialResult.from_message(payload)
                else:
                    message, where, text = payload
                    process.join(30)
                    raise TrialFailed(message, where, text)
            elapsed = time.monotonic() - start
            if not started:
                if elapsed > STARTUP_LIMIT_S:
                    stopped = f"the trial's process did not start within {STARTUP_LIMIT_S} s"
            elif limits.timeout_s is not None and elapsed > limits.timeout_s:
                stopped = f"timed out after {limits.timeout_s:g} s (in layer {current})"
            elif limits.memory_mb is not None and \
                    (used := _rss_mb(process.pid)) > limits.memory_mb:
                stopped = (f"used {used:.0f} MB of memory, over the limit of "
                           f"{limits.memory_mb:g} MB (budget.trial_memory_mb; in layer "
                           f"{current})")
            if stopped:
                raise TrialFailed(stopped, current, f"stopped by the parent: {stopped}")
    finally:
        if process.is_alive():
            _kill(process)
        receive.close()
