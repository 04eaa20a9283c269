"""One trial: the stack walked top to bottom, one layer per line.

    result = run(config)          # config: space.TrialConfig
    result.metrics["latency_ms"]
"""
from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import algorithms, compiler, compression, data, hardware, models
from .faults import layer
from .cache import StageCache
from .errors import BadInput
from .space import TrialConfig, infeasible


@dataclass
class TrialResult:
    metrics: dict[str, float]
    cache: dict[str, str] = field(default_factory=dict)   # stage -> hit / miss
    info: dict[str, str] = field(default_factory=dict)    # device, target, ...
    # what the trial built (for callers that look further: benchmarks, tests); not logged
    compressed: compression.Compressed | None = None
    built: compiler.Compiled | None = None
    dataset: data.Data | None = None
    # folders the trial's run keeps as artifacts (name -> folder), e.g. the tuning records
    artifacts: dict[str, Path] = field(default_factory=dict)

    def discard_artifacts(self) -> None:
        """Remove the artifact folders once they are logged (they live in temporary space)."""
        for folder in self.artifacts.values():
            shutil.rmtree(folder.parent if folder.parent.name.startswith("dlas-") else folder,
                          ignore_errors=True)
        self.artifacts.clear()

    def tags(self) -> dict[str, str]:
        """MLflow tags of the trial: `cache.<stage>` hit/miss and `dlas.<info>`."""
        return {**{f"cache.{k}": v for k, v in self.cache.items()},
                **{f"dlas.{k}": v for k, v in self.info.items()}}


def run(cfg: TrialConfig, cache: StageCache | None = None) -> TrialResult:
    """Run one configuration through the six layers and measure it."""
    cache = cache or StageCache(None)
    reason = infeasible(cfg)  # before any work (a search prunes these before calling run)
    if reason:
        raise BadInput(reason)
    with layer("hardware"):
        device = hardware.resolve(cfg.hw, cfg.targets)                         # L6 target
    with layer("data"):
        dataset = data.load(cfg.data, cfg.seed)                                # L1
    stages = _Stages(cfg, cache, dataset)
    compressed, ft_hit = cache.get_or_make(                                    # L2 + L3
        "finetune", stages.key("compress", "finetune"), stages.compress)
    if cfg.compiler.backend == "torch":                                        # L5: eager
        with layer("measure"):
            result, built = measure_eager(compressed, dataset, device, cfg), None
    else:
        primitive = algorithms.plan(cfg.algo)                                  # L4
        records = None  # the tuning records this trial used: a run artifact
        if cfg.compiler.tuner != "none":
            records = Path(tempfile.mkdtemp(prefix="dlas-records-")) / "tuning"
        with layer("compile"):
            built = compiler.compile(compressed.module, dataset.example(), primitive,  # L5
                                     cfg.compiler, device.target, compressed.precision,
                                     records_to=records, measure_on=device.rpc)
        with layer("measure"):
            result = measure(compressed, built, dataset, device, cfg)          # L6
        if records is not None:
            result.artifacts["tuning"] = records
        if built.tuning is not None:
            result.info["tuning_database"] = str(built.tuning.database)
            if built.tuning.untuned:
                result.info["untuned_tasks"] = ", ".join(built.tuning.untuned)[:5000]
    result.cache = {"model": stages.model_cache, "finetune": "hit" if ft_hit else "miss"}
    result.compressed, result.built, result.dataset = compressed, built, dataset
    if ft_hit:  # nothing was fine-tuned or quantised in this trial
        result.metrics["finetune_s"] = result.metrics["convert_s"] = 0.0
    result.metrics.setdefault("train_s", stages.train_s)
    result.info.update(stages.provenance)
    result.info["precision"] = compressed.precision
    if built is not None:
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
        with layer("model"):
            trained, hit = self.cache.get_or_make(
                "model", self.key(), lambda: models.build(cfg.model, self.dataset, cfg.seed))
        self.model_cache, self.train_s = ("hit" if hit else "miss"), time.perf_counter() - start
        torch.manual_seed(cfg.seed)
        with layer("compression"):
            return compression.compress(cfg.compress, cfg.finetune, trained, self.dataset)


def measure_eager(compressed: compression.Compressed, dataset: data.Data,
                  device: hardware.Device, cfg: TrialConfig) -> TrialResult:
    """Layer 6 for `compiler.backend: torch`: PyTorch eager is the deployed code; it is timed
    once, under the protocol that times TVM, and is its own baseline."""
    start = time.perf_counter()
    eager = hardware.time_torch(compressed.module, dataset.example(), cfg.hw, device.threads)
    metrics = {**compressed.metrics, "compile_s": 0.0,
               "latency_ms": eager.median_ms, "latency_std_ms": eager.std_ms,
               "latency_p90_ms": eager.p90_ms, "torch_latency_ms": eager.median_ms,
               "torch_latency_std_ms": eager.std_ms, "speedup_vs_torch": 1.0,
               "measure_s": time.perf_counter() - start}
    return TrialResult(metrics, info={**device.info(), "target": "torch eager"})


def measure(compressed: compression.Compressed, built: compiler.Compiled, dataset: data.Data,
            device: hardware.Device, cfg: TrialConfig) -> TrialResult:
    """Layer 6: check the compiled module against PyTorch, then time both side by side (on a
    remote device: upload, check and time it there; no PyTorch baseline)."""
    example = dataset.example()
    with torch.no_grad():
        reference = compressed.module(example).numpy()
    start = time.perf_counter()
    if device.remote:
        output, tvm_time = hardware.measure_remote(built.executable, example, cfg.hw, device)
        torch_time = None
    else:
        output = hardware.run_tvm(built.executable, example)
        tvm_time = hardware.time_tvm(built.executable, example, cfg.hw, device.threads)
        torch_time = hardware.time_torch(compressed.module, example, cfg.hw, device.threads)
    metrics = {
        **compressed.metrics, **built.metrics,
        "latency_ms": tvm_time.median_ms, "latency_std_ms": tvm_time.std_ms,
        "latency_p90_ms": tvm_time.p90_ms,
        "max_rel_error": compiler.max_relative_error(output, reference),
        "measure_s": time.perf_counter() - start,
    }
    if torch_time is not None:
        metrics.update(torch_latency_ms=torch_time.median_ms,
                       torch_latency_std_ms=torch_time.std_ms,
                       speedup_vs_torch=torch_time.median_ms / tvm_time.median_ms)
    return TrialResult(metrics, info=device.info())
