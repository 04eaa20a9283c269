"""Layer 5, tuning's measurements: where and how candidate schedules are built and timed.

    builder = KeptPoolBuilder(max_workers=1, timeout_sec=120,
                              initializer=partial(stub_foreign_intrinsics, ()))
    times = timer(target, threads=1, rpc=None, keep=(), cold_weights=False)(mods)

MetaSchedule's search (`tuning`), the guard (`tuning_guard`) and transfer-tuning (`transfer`)
measure with the same builder (worker processes kept between batches, the foreign intrinsic
tables stubbed out) and the same runner (the trial's threads, local or RPC, warm or cold
weights), so their times compare. Kept free of torch: the worker processes import this module.
"""
from __future__ import annotations

import sys
import types
from functools import partial

import tvm
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.builder import local_builder
from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

from . import tuning_guard

__all__ = ["stub_foreign_intrinsics", "used_intrinsics", "set_threads", "KeptPoolBuilder",
           "runner", "timer"]

# Tensor-intrinsic tables the builder workers import but an x86 build never uses; the CUDA one
# alone took 20-50 s to import here, past the builder's time-out.
_FOREIGN_INTRINSICS = ("cuda", "rocm", "hexagon", "arm_cpu", "riscv_cpu", "metal")


def stub_foreign_intrinsics(keep: tuple[str, ...] = ()) -> None:
    """Empty modules in place of the intrinsic tables the target does not use: in the builder
    workers (their initializer) and in this process before a CPU tuning run (the schedule
    rules import the tables: 38 s here, nearly all of it CUDA's). An aarch64 target keeps
    arm_cpu (its int8 dot-product rules need the real table)."""
    for name in _FOREIGN_INTRINSICS:
        if name not in keep:
            sys.modules.setdefault(f"tvm.s_tir.tensor_intrin.{name}",
                                   types.ModuleType(f"tvm.s_tir.tensor_intrin.{name}"))


def used_intrinsics(target: tvm.target.Target) -> tuple[str, ...]:
    triple = str(target.attrs.get("mtriple", ""))
    return ("arm_cpu",) if triple.startswith(("aarch64", "arm")) else ()


def set_threads(threads: int) -> None:
    """Runner worker initializer: measure with the trial's thread count."""
    tvm.get_global_func("runtime.config_threadpool")(1, threads)


@derived_object
class KeptPoolBuilder(ms.builder.PyBuilder):
    """MetaSchedule's LocalBuilder with its worker processes kept between batches. The
    LocalBuilder starts a fresh pool for every batch of candidates (3.4 s here: a process
    importing TVM); a small budget measures one candidate per batch, so that start-up was
    most of a tuning run. A worker is replaced after `renew_after` builds (TVM renews them for
    a memory leak in long-lived workers) and after a time-out."""

    def __init__(self, max_workers: int, timeout_sec: float, initializer=None,
                 renew_after: int = 64) -> None:
        super().__init__()
        self.timeout_sec = timeout_sec
        self.pool: PopenPoolExecutor | None = PopenPoolExecutor(
            max_workers=max_workers, timeout=timeout_sec, initializer=initializer,
            maximum_process_uses=renew_after)

    def build(self, build_inputs: list) -> list:
        jobs = [(None, None, b.mod, b.target, local_builder._serialize_params(b.params))
                for b in build_inputs]
        results = []
        for outcome in self.pool.map_with_error_catching(
                lambda job: local_builder._worker_func(*job), jobs):
            if outcome.status == StatusKind.COMPLETE:
                results.append(ms.builder.BuilderResult(outcome.value, None))
            elif outcome.status == StatusKind.TIMEOUT:
                results.append(ms.builder.BuilderResult(
                    None, f"LocalBuilder: Timeout, killed after {self.timeout_sec} seconds"))
            else:
                results.append(ms.builder.BuilderResult(
                    None, f"LocalBuilder: An exception occurred\n{outcome.value}"))
        return results

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
        self.pool = None


def runner(threads: int, rpc: tuple[str, int, str] | None,
            cold_weights: bool = False) -> ms.runner.Runner:
    """Where candidates are measured: the device the trial targets. A remote server runs with
    the thread count it was started with (TVM_NUM_THREADS in its environment). Cold weights:
    TVM flushes every argument but the first from the caches before each single run."""
    evaluator = (ms.runner.EvaluatorConfig(number=1, repeat=5, min_repeat_ms=0,
                                           enable_cpu_cache_flush=True) if cold_weights else
                 ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=50,
                                           enable_cpu_cache_flush=False))
    if rpc is None:
        return ms.runner.LocalRunner(timeout_sec=60, initializer=partial(set_threads, threads),
                                     evaluator_config=evaluator)
    host, port, key = rpc
    return ms.runner.RPCRunner(
        rpc_config=ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key,
                                       session_priority=1, session_timeout_sec=120),
        evaluator_config=evaluator, max_workers=1)


def timer(target: tvm.target.Target, threads: int, rpc: tuple[str, int, str] | None,
          keep: tuple[str, ...], cold_weights: bool):
    """A function timing TIR modules (`tuning_guard.measure`) with the tuning's builder and
    runner: what the guard and transfer time schedules with."""
    def time_them(mods: list[tvm.IRModule]) -> list[float | None]:
        builder = KeptPoolBuilder(max_workers=1, timeout_sec=120,
                                  initializer=partial(stub_foreign_intrinsics, keep))
        try:
            return tuning_guard.measure(mods, target, builder, runner(threads, rpc, cold_weights))
        finally:
            builder.close()
    return time_them
