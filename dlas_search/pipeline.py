"""One trial: the stack walked top to bottom, one layer per line.

    result = run(config)          # config: space.TrialConfig
    result.metrics["latency_ms"]
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from . import algorithms, compiler, compression, data, hardware, models
from .cache import StageCache
from .space import TrialConfig


@dataclass
class TrialResult:
    metrics: dict[str, float]
    cache: dict[str, str] = field(default_factory=dict)   # stage -> hit / miss
    info: dict[str, str] = field(default_factory=dict)    # device, target, ...
    # what the trial built (for callers that look further: benchmarks, tests); not logged
    compressed: compression.Compressed | None = None
    built: compiler.Compiled | None = None
    dataset: data.Data | None = None

    def tags(self) -> dict[str, str]:
        """MLflow tags of the trial: `cache.<stage>` hit/miss and `dlas.<info>`."""
        return {**{f"cache.{k}": v for k, v in self.cache.items()},
                **{f"dlas.{k}": v for k, v in self.info.items()}}


def run(cfg: TrialConfig, cache: StageCache | None = None) -> TrialResult:
    """Run one configuration through the six layers and measure it."""
    cache = cache or StageCache(None)
    device = hardware.resolve(cfg.hw)                                          # L6 target
    dataset = data.load(cfg.data, cfg.seed)                                    # L1
    stages = _Stages(cfg, cache, dataset)
    compressed, ft_hit = cache.get_or_make(                                    # L2 + L3
        "finetune", stages.key("compress", "finetune"), stages.compress)
    primitive = algorithms.plan(cfg.algo)                                      # L4
    built = compiler.compile(compressed.module, dataset.example(), primitive,  # L5
                             cfg.compiler, device.target, compressed.precision)
    result = measure(compressed, built, dataset, device, cfg)                  # L6
    result.cache = {"model": stages.model_cache, "finetune": "hit" if ft_hit else "miss"}
    result.compressed, result.built, result.dataset = compressed, built, dataset
    if ft_hit:  # nothing was fine-tuned or quantised in this trial
        result.metrics["finetune_s"] = result.metrics["convert_s"] = 0.0
    result.metrics.setdefault("train_s", stages.train_s)
    result.info.update(stages.provenance)
    result.info["precision"] = compressed.precision
    result.info["arithmetic"] = "; ".join(  # what the compiled convs and matmuls multiply
        f"{op} {', '.join(sorted(kinds))}" for op, kinds in built.arithmetic.items() if kinds)
    return result


class _Stages:
    """Layers 2 and 3 as cached stages; layer 2 runs only when layer 3 is not cached."""

    def __init__(self, cfg: TrialConfig, cache: StageCache, dataset: data.Data):
        self.cfg, self.cache, self.dataset = cfg, cache, dataset
        self.model_cache, self.train_s = "unused", 0.0
        self.provenance = models.describe(cfg.model)  # hashes a checkpoint: once per trial

    def key(self, *layers: str) -> str:
        """Cache key of the layers from data down to `layers`; includes where the weights came
        from (a checkpoint's hash), so an overwritten checkpoint is not mistaken for the old."""
        return self.cfg.key("data", "model", *layers) + self.provenance["model.weights_source"]

    def compress(self) -> compression.Compressed:
        cfg = self.cfg
        start = time.perf_counter()
        trained, hit = self.cache.get_or_make(
            "model", self.key(), lambda: models.build(cfg.model, self.dataset, cfg.seed))
        self.model_cache, self.train_s = ("hit" if hit else "miss"), time.perf_counter() - start
        torch.manual_seed(cfg.seed)
        return compression.compress(cfg.compress, cfg.finetune, trained, self.dataset)


def measure(compressed: compression.Compressed, built: compiler.Compiled, dataset: data.Data,
            device: hardware.Device, cfg: TrialConfig) -> TrialResult:
    """Layer 6: check the compiled module against PyTorch, then time both side by side."""
    example = dataset.example()
    with torch.no_grad():
        reference = compressed.module(example).numpy()
    error = compiler.max_relative_error(hardware.run_tvm(built.executable, example), reference)
    start = time.perf_counter()
    tvm_time = hardware.time_tvm(built.executable, example, cfg.hw)
    torch_time = hardware.time_torch(compressed.module, example, cfg.hw)
    metrics = {
        **compressed.metrics, **built.metrics,
        "latency_ms": tvm_time.median_ms, "latency_std_ms": tvm_time.std_ms,
        "latency_p90_ms": tvm_time.p90_ms,
        "torch_latency_ms": torch_time.median_ms, "torch_latency_std_ms": torch_time.std_ms,
        "speedup_vs_torch": torch_time.median_ms / tvm_time.median_ms,
        "max_rel_error": error, "measure_s": time.perf_counter() - start,
    }
    return TrialResult(metrics, info={"device": device.description,
                                      "target": str(device.target),
                                      "threads": str(device.threads)})
