"""bench/compiler.py: the FMA loop whose rate is reported as the machine's fp32 peak
really computes `depth` dependent multiply-adds per accumulator and iteration (so the FLOPs it
counts are FLOPs done), on every thread's slice; `--conv` names one primitive or one per model."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import tvm

from conftest import ROOT
from dlas_search import hardware

spec = importlib.util.spec_from_file_location("bench_compiler", ROOT / "bench" / "compiler.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_fma_loop_does_the_multiply_adds_it_counts():
    threads, lanes, chains, iters = 2, 8, 3, 5
    func, depth = bench.fma_loop(threads, lanes, chains)
    kernel = tvm.compile(func, hardware.local_target(1))
    start = np.random.default_rng(0).random((threads, chains, lanes), dtype="float32")
    acc = tvm.runtime.tensor(start)
    kernel(acc, 1.01, 0.001, iters)
    expected = start.astype("float64")
    for _ in range(iters * depth):
        expected = expected * 1.01 + 0.001  # 1% per step: a step more or less shows
    np.testing.assert_allclose(acc.numpy(), expected, rtol=1e-5)


def test_conv_can_be_one_primitive_or_one_per_model():
    per_model = "resnet18=winograd_nhwc,mobilenet_v2=direct_nhwc"
    assert bench.conv_of("direct_nhwc", "resnet18") == "direct_nhwc"
    assert bench.conv_of(per_model, "resnet18") == "winograd_nhwc"
    assert bench.conv_of(per_model, "mobilenet_v2") == "direct_nhwc"
    with pytest.raises(SystemExit, match="names no primitive for vgg11 .it names resnet18, "
                                         "mobilenet_v2"):
        bench.conv_of(per_model, "vgg11")
