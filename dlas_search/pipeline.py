"""One trial: the stack walked top to bottom, one layer per line.

    result = run(config)          # config: space.TrialConfig
    result.metrics["latency_ms"]
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import tvm

from . import algorithms, compiler, compression, data, hardware, models, tuning
from .cache import StageCache, folder_digest, fingerprint
from .faults import layer
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
        with layer("compile"):
            built, records = stages.compile(compressed, primitive, device)     # L5
        with layer("measure"):
            result = measure(compressed, built, dataset, device, cfg)          # L6
        if records is not None and records.is_dir():  # the tuning records this trial used
            result.artifacts["tuning"] = records
        if built.tuning is not None:
            result.info["tuning_database"] = str(built.tuning.database)
            if built.tuning.untuned:
                result.info["untuned_tasks"] = ", ".join(built.tuning.untuned)[:5000]
    result.cache = {"model": stages.model_cache, "finetune": "hit" if ft_hit else "miss",
                    "compile": stages.compile_cache}
    result.compressed, result.built, result.dataset = compressed, built, dataset
    if ft_hit:  # nothing was fine-tuned or quantised in this trial
        result.metrics["finetune_s"] = result.metrics["convert_s"] = 0.0
    result.metrics.setdefault("train_s", stages.train_s)
    result.info.update(stages.provenance)
    result.info["precision"] = compressed.precision
    if built is not None:
        result.info["arithmetic"] = "; ".join(  # what the compiled convs and matmuls multiply
            f"{op} {', '.join(sorted(kinds))}" for op, kinds in built.arithmetic.items() if kinds)
    if any(cfg.artifacts.values()):
        result.artifacts["model"] = keep_model(compressed, built, device, cfg.artifacts)
    return result


def keep_model(compressed: compression.Compressed, built: compiler.Compiled | None,
               device: hardware.Device, which: dict[str, bool]) -> Path:
    """The run artifact `model/`: `weights.pt`, the compressed model's state_dict, and
    `model.so`, the compiled library (the cached one, or exported for the device)."""
    folder = Path(tempfile.mkdtemp(prefix="dlas-model-")) / "model"
    folder.mkdir()
    if which.get("weights", True):
        torch.save(compressed.module.state_dict(), folder / "weights.pt")
    if which.get("library", True) and built is not None:
        if built.library is not None and built.library.is_file():
            shutil.copyfile(built.library, folder / "model.so")
        else:
            hardware.export_library(built.executable, device, folder)
    return folder


class _Stages:
    """Layers 2, 3 and 5 as cached stages; layer 2 runs only when layer 3 is not cached."""

    def __init__(self, cfg: TrialConfig, cache: StageCache, dataset: data.Data):
        self.cfg, self.cache, self.dataset = cfg, cache, dataset
        self.model_cache, self.train_s = "unused", 0.0
        self.compile_cache = "unused"
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

    def compile(self, compressed: compression.Compressed, primitive: algorithms.Primitive,
                device: hardware.Device) -> tuple[compiler.Compiled, Path | None]:
        """Layer 5 as a cached stage (for the local CPU): keyed by the compressed model's
        fingerprint, the algo and compiler settings, the TVM target (threads included), the
        input shape, TVM's version and, when tuning, the tuning database as it is now (a
        database that grew may give better schedules). Remote and GPU builds are not cached.
        Returns the build and the folder of the tuning records it used (or None)."""
        cfg, example = self.cfg, self.dataset.example()
        records = None
        if cfg.compiler.tuner != "none":
            records = Path(tempfile.mkdtemp(prefix="dlas-records-")) / "tuning"

        model_key = fingerprint(compressed.module, compressed.precision)

        def make() -> compiler.Compiled:
            return compiler.compile(compressed.module, example, primitive, cfg.compiler,
                                    device.target, compressed.precision, records_to=records,
                                    measure_on=device.rpc, model_key=model_key)

        if self.cache.root is None or device.remote or device.target.kind.name != "llvm":
            return make(), records
        database = ""
        if cfg.compiler.tuner == "metaschedule":
            database = folder_digest(tuning.target_folder(
                cfg.compiler.database or compiler.DEFAULT_DATABASE, device.target,
                cold_weights=bool(cfg.compiler.cold_weights)))
        key = json.dumps({"model": model_key,
                          "settings": cfg.key("algo", "compiler"), "target": str(device.target),
                          "input": [list(example.shape), str(example.dtype)],
                          "tvm": tvm.__version__, "database": database}, sort_keys=True)
        built, hit, entry = self.cache.get_or_make_folder(
            "compile", key, make, lambda b, folder: compiler.save(b, folder, records),
            compiler.load)
        self.compile_cache = "hit" if hit else "miss"
        if entry is not None and not hit:  # run the stored library: LLVM generates the code
            built.executable = compiler.load(entry).executable  # once (for it), not twice
        if entry is not None:
            built.library = entry / compiler.LIBRARY
        if hit:  # nothing was compiled or tuned in this trial
            built.metrics["compile_cached_s"] = built.metrics["compile_s"]
            built.metrics["compile_s"] = 0.0
            if "tune_s" in built.metrics:
                built.metrics["tune_cached_s"] = built.metrics["tune_s"]
                built.metrics["tune_s"] = 0.0
            if records is not None and (entry / compiler.RECORDS).is_dir():
                shutil.rmtree(records, ignore_errors=True)
                shutil.copytree(entry / compiler.RECORDS, records)
        return built, records


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
