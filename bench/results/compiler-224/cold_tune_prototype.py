"""bench/compiler.py with MetaSchedule measuring candidates after flushing the caches of every
argument but the first (TVM's cache_flush_cpu_non_first_arg): weights cold, input warm."""
import sys
from functools import partial
sys.path.insert(0, "/work/main/bench")
from tvm.s_tir import meta_schedule as ms
from dlas_search import tuning

def cold_runner(threads, rpc):
    evaluator = ms.runner.EvaluatorConfig(number=1, repeat=5, min_repeat_ms=0,
                                          enable_cpu_cache_flush=True)
    return ms.runner.LocalRunner(timeout_sec=60, initializer=partial(tuning._set_threads, threads),
                                 evaluator_config=evaluator)

tuning._runner = cold_runner
import compiler
sys.argv = ["compiler.py", *sys.argv[1:]]
compiler.main()
