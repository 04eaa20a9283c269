"""One strided conv (+bias, ReLU) tuned alone with cold weights under `direct_nhwc` and
`im2col_gemm_nhwc`, each in a fresh database; prints each task's best time (us).

    python stride2_one_conv.py IN OUT SIZE KERNEL STRIDE TRIALS direct_nhwc,im2col_gemm_nhwc
"""
import sys
import tempfile
import time

import torch

from dlas_search import algorithms, compiler, hardware

cin, cout, size, kernel, stride, trials = (int(a) for a in sys.argv[1:7])
model = torch.nn.Sequential(torch.nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2),
                            torch.nn.ReLU()).eval()
example = torch.randn(1, cin, size, size)
target = hardware.local_target(2)
for name in sys.argv[7].split(","):
    start = time.time()
    built = compiler.compile(model, example, algorithms.plan(algorithms.AlgoConfig(conv=name)),
                             compiler.CompilerConfig(tuner="metaschedule", trials=trials,
                                                     database=tempfile.mkdtemp(),
                                                     cold_weights=True), target)
    tasks = [(r["task"], round(r["best_us"])) for r in built.tuning.task_table if r["best_us"]]
    print(f"{name}: {time.time() - start:.0f} s tuning; best us per task: {tasks}", flush=True)
