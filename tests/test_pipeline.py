"""The six layers on a tiny configuration, checked against PyTorch."""
import pytest
import torch

from dlas_search import compression, data, hardware, models, pipeline
from dlas_search.cache import StageCache
from dlas_search.space import load_space

from conftest import compiled_error, randomise_batchnorm, slow_except


@pytest.fixture(scope="module")
def digits16():
    return data.load(data.DataConfig(image_size=16, val_fraction=0.3), seed=0)


def test_digits_split_is_seeded_and_shaped(digits16):
    again = data.load(data.DataConfig(image_size=16, val_fraction=0.3), seed=0)
    other = data.load(data.DataConfig(image_size=16, val_fraction=0.3), seed=1)
    x, y = digits16.val.dataset.tensors
    assert x.shape[1:] == (3, 16, 16) and digits16.input_shape == (1, 3, 16, 16)
    assert digits16.num_classes == 10 and set(y.tolist()) == set(range(10))
    assert len(digits16.train.dataset) + len(x) == 1797
    assert torch.equal(x, again.val.dataset.tensors[0])
    assert not torch.equal(y, other.val.dataset.tensors[1])


@pytest.mark.parametrize("arch,stem,conv", slow_except([("resnet18", "standard", "direct"),
                                                        ("resnet18", "standard", "direct_nhwc"),
                                                        ("mobilenet_v2", "cifar", "direct")],
                                                       ("resnet18", "standard", "direct"),
                                                       ("resnet18", "standard", "direct_nhwc")))
def test_compiled_module_matches_pytorch(digits16, arch, stem, conv):
    model = randomise_batchnorm(models.create(models.ModelConfig(arch=arch, stem=stem), 10))
    built, error = compiled_error(model, digits16.example(), conv)
    assert built.metrics["batchnorm_folded"] > 0
    assert error < 1e-4


def test_unstructured_pruning_reaches_the_amount_and_shrinks_storage(digits16):
    model = models.create(models.ModelConfig(arch="resnet18"), 10)
    result = compression.compress(compression.CompressConfig("unstructured", 0.8),
                                  compression.FinetuneConfig(epochs=1), model, digits16)
    assert abs(result.metrics["sparsity"] - 0.8) < 0.005  # fine-tuning kept the zeros
    assert not any(hasattr(m, "weight_mask") for m in result.module.modules())  # permanent
    assert result.metrics["size_mb"] < 0.5 * result.metrics["size_dense_mb"]
    assert 0.0 <= result.metrics["accuracy"] <= 1.0


def test_pipeline_on_a_tiny_configuration(tiny_space, cache_dir):
    config = load_space(tiny_space).pin({"compress.method": "unstructured",
                                         "compress.amount": 0.5}).defaults()
    result = pipeline.run(config, StageCache(cache_dir))
    m = result.metrics
    assert 0.0 <= m["accuracy"] <= 1.0
    assert m["accuracy"] > 0.3  # one epoch on digits is far above chance (0.1)
    assert m["max_rel_error"] < 1e-4
    assert m["latency_ms"] > 0 and m["torch_latency_ms"] > 0 and m["latency_std_ms"] >= 0
    assert m["speedup_vs_torch"] == pytest.approx(m["torch_latency_ms"] / m["latency_ms"])
    for prefix in ("", "torch_"):  # every latency comes with its 95% interval
        assert m[f"{prefix}latency_ci_low_ms"] <= m[f"{prefix}latency_ms"] \
            <= m[f"{prefix}latency_ci_high_ms"]
    assert m["speedup_vs_torch_ci_low"] <= m["speedup_vs_torch"] <= m["speedup_vs_torch_ci_high"]
    assert 1 <= m["timing_attempts"] <= 3 and m["timing_other_cpu"] >= 0
    assert m["timing_start"] < m["timing_end"]
    assert m["sparsity"] == pytest.approx(0.5, abs=0.005)
    again = pipeline.run(config, StageCache(cache_dir))
    assert again.cache["finetune"] == "hit"
    assert again.metrics["accuracy"] == m["accuracy"]


@pytest.mark.parametrize("method,precision,arithmetic", slow_except([
    ("unstructured+int8", "int8", "uint8xint8->int32"),
    ("fp16", "fp16", "float16xfloat16->float32")], ("fp16", "fp16", "float16xfloat16->float32")))
def test_pipeline_keeps_reduced_precision_through_the_stack(tiny_space, cache_dir, method,
                                                            precision, arithmetic):
    config = load_space(tiny_space).pin({"compress.method": method,
                                         "compress.amount": 0.9}).defaults()
    result = pipeline.run(config, StageCache(cache_dir))
    m = result.metrics
    assert result.info["precision"] == precision
    assert result.info["arithmetic"] == f"conv2d {arithmetic}; matmul {arithmetic}"
    assert m["accuracy"] > 0.3 and m["latency_ms"] > 0 and m["torch_latency_ms"] > 0
    if precision == "int8":  # 90% zeros in int8: CSR (5 bytes a value) beats dense (1 byte)
        assert m["sparsity"] == pytest.approx(0.9, abs=0.005)
        assert m["size_mb"] < 0.7 * m["size_dense_mb"] < 0.3 * 4 * m["params"] / 1e6
    else:
        assert m["size_mb"] == m["size_dense_mb"] < 0.55 * 4 * m["params"] / 1e6
    again = pipeline.run(config, StageCache(cache_dir))  # the quantised model was cached
    assert again.cache["finetune"] == "hit"
    assert m["convert_s"] > 0 and again.metrics["convert_s"] == 0.0
    assert again.metrics["accuracy"] == m["accuracy"]
    assert again.info["arithmetic"] == result.info["arithmetic"]


def test_local_target_uses_only_features_the_os_reports():
    target = hardware.local_target(1)
    flags = hardware._cpuinfo_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo")
    enabled = tvm_features(target)
    hidden = {f for f in enabled if f.startswith("avx512") and f not in flags}
    assert not hidden
    # and nothing the OS does report is switched off (LLVM's `amx-bf16` is cpuinfo's amx_bf16)
    off = {f[1:] for f in target.attrs.get("mattr", [])}
    assert not {f for f in off if hardware._feature_key(f) in flags}


def tvm_features(target) -> set:
    import tvm
    return set(tvm.target.codegen.llvm_get_cpu_features(target))


def test_hw_threads_sets_the_tvm_pool_and_leaves_the_cpu_mask_alone():
    """TVM's default pool is half the hardware threads on x86 and pins the caller to CPU 0
    (inherited by PyTorch's threads and every child process): resolve() must avoid both."""
    import os

    import tvm
    before = os.sched_getaffinity(0)
    threads = min(2, os.cpu_count() or 1)
    hardware.resolve(hardware.HardwareConfig(threads=threads))
    assert tvm.get_global_func("runtime.NumThreads")() == threads
    assert os.sched_getaffinity(0) == before
    hardware.resolve(hardware.HardwareConfig(threads=1))
    assert tvm.get_global_func("runtime.NumThreads")() == 1
