"""The stages of one trial: each layer's work wrapped in what every stage needs.

`pipeline.run` calls one method per layer; each method here attributes a failure to its
layer (`faults.layer`), keeps what it produces in the stage cache where that can be reused,
times itself, and records cache hits and provenance for the trial's run:

| stage | layer | cached by |
| --- | --- | --- |
| `target` | 6 | (nothing to cache: a lookup, and a reachability check for RPC) |
| `data` | 1 | (loading is cheap) |
| `compressed` | 2 + 3 | data, model, compression and fine-tune settings, seed, weights source |
| `algorithms` | 4 | (a plan is a few objects) |
| `compiled` | 5 | the compressed model's fingerprint, algo and compiler settings, target, input, TVM version, the revisions of the plan's primitives (where past 1), the tuning database's digest and the tuning guard's rule (local CPU builds only) |
| `measured` | 6 | (never: a measurement is what a trial is for) |

What a stage produces depends only on the configuration of the layers above it, so a trial
that differs from an earlier one only in lower layers reuses the upper stages.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
import tvm

from . import (algorithms, compiler, compression, data, hardware, models, tuning,
               tuning_guard)
from .cache import StageCache, fingerprint, folder_digest
from .console import say
from .faults import layer
from .gates import Gates
from .result import TrialResult

__all__ = ["Stages", "keep_model", "measure", "measure_eager", "latency_metrics",
           "speedup_metrics"]


class Stages:
    """One trial's stages over the configuration `cfg` (a space.TrialConfig) and `cache`."""

    def __init__(self, cfg, cache: StageCache | None = None, gates: Gates | None = None):
        self.cfg, self.cache, self.gates = cfg, cache or StageCache(None), gates
        self.hits = {"model": "unused", "finetune": "unused", "compile": "unused"}
        self.train_s = 0.0
        self.dataset: data.Data | None = None
        self.device: hardware.Device | None = None
        self.records: Path | None = None
        self.provenance: dict[str, str] = {}
        self.untuned: dict[str, float] = {}  # the untuned-build gate's measurements
        self.gate_rule: str | None = None    # and its rule, with its numbers

    # --- the layers, in the order pipeline.run calls them ----------------------------------------

    def target(self) -> hardware.Device:
        """Layer 6's target, resolved first: an unreachable board fails before any work."""
        with layer("hardware"):
            self.device = hardware.resolve(self.cfg.hw, self.cfg.targets)
        return self.device

    def data(self) -> data.Data:
        """Layer 1."""
        with layer("data"):
            self.dataset = data.load(self.cfg.data, self.cfg.seed)
        return self.dataset

    def compressed(self) -> compression.Compressed:
        """Layers 2 and 3 as one cached stage (layer 2, itself cached, runs only on a miss)."""
        self.provenance = models.describe(self.cfg.model)  # hashes a checkpoint: once a trial
        compressed, hit = self.cache.get_or_make(
            "finetune", self._key("compress", "finetune"), self._compress)
        self.hits["finetune"] = "hit" if hit else "miss"
        return compressed

    def cached_compressed(self) -> compression.Compressed | None:
        """Layers 2 and 3 from the stage cache only (None when absent: nothing is trained)."""
        self.provenance = models.describe(self.cfg.model)
        return self.cache.get("finetune", self._key("compress", "finetune"))

    def algorithms(self) -> algorithms.Plan | None:
        """Layer 4: how each conv lowers (None for PyTorch eager, which lowers nothing)."""
        if self.cfg.compiler.backend == "torch":
            return None
        return algorithms.plan(self.cfg.resolved("algo"))

    def compiled(self, compressed: compression.Compressed,
                 plan: algorithms.Plan | None) -> compiler.Compiled | None:
        """Layer 5 (None for PyTorch eager). Cached for the local CPU (see the table above);
        remote and GPU builds are not cached."""
        if plan is None:
            return None
        with layer("compile"):
            return self._compile(compressed, plan)

    def tunes(self) -> bool:
        """Whether layer 5 tunes this trial (MetaSchedule, on TVM)."""
        settings = self.cfg.resolved("compiler")
        return settings.backend == "tvm" and settings.tuner == "metaschedule"

    def untuned_gate(self, compressed: compression.Compressed,
                     plan: algorithms.Plan) -> str | None:
        """The untuned-build gate (gates.py): build the trial untuned (the stage cache
        shares it with the untuned trial of this configuration), time it briefly and ask the
        gate; why it stops, or None. The rule and its numbers go to the run either way."""
        plain = dataclasses.replace(self.cfg, compiler=dataclasses.replace(
            self.cfg.compiler, tuner="none", trials=None, database=None, cold_weights=None,
            transfer=None))
        start = time.perf_counter()
        with layer("compile"):
            untuned = Stages(plain, self.cache)
            untuned.device, untuned.dataset, untuned.provenance = \
                self.device, self.dataset, self.provenance
            built = untuned._compile(compressed, plan)
        brief = dataclasses.replace(self.cfg.hw, repeat=min(self.cfg.hw.repeat, 5))
        with layer("measure"):
            timings, _ = hardware.exclusively(
                self.device.name, lambda: {"tvm": self.device.measure(
                    built.executable, self.dataset.example(), brief)[1]},
                _judge("tvm"), local=not self.device.remote, say=say)
        untuned_ms = timings["tvm"].median_ms
        self.untuned = {"untuned_latency_ms": untuned_ms,
                        "untuned_gate_s": time.perf_counter() - start}
        why, self.gate_rule = self.gates.after_untuned(compressed.metrics, untuned_ms,
                                                       self.cfg.algo.conv)
        say(f"  untuned-build gate: {self.gate_rule if why is None else why}")
        return why

    def measured(self, compressed: compression.Compressed,
                 built: compiler.Compiled | None) -> TrialResult:
        """Layer 6: check and time the build (or PyTorch eager), then gather the trial's
        metrics, cache hits and provenance."""
        with layer("measure"):
            if built is None:
                result = measure_eager(compressed, self.dataset, self.device, self.cfg)
            else:
                result = measure(compressed, built, self.dataset, self.device, self.cfg)
        return self._finish(result, compressed, built)

    def stopped(self, stage: str, reason: str,
                compressed: compression.Compressed) -> TrialResult:
        """The result of a trial a gate stopped after `stage`: what was measured so far."""
        result = TrialResult({**compressed.metrics, **self.untuned},
                             stopped={"at": stage, "reason": reason},
                             info={"precision": compressed.precision, **self.provenance})
        if self.hits["finetune"] == "hit":
            result.metrics["finetune_s"] = result.metrics["convert_s"] = 0.0
        result.metrics.setdefault("train_s", self.train_s)
        result.cache = dict(self.hits)
        result.compressed, result.dataset = compressed, self.dataset
        return result

    # --- stage bookkeeping ------------------------------------------------------------------------

    def _key(self, *groups: str) -> str:
        """Cache key of the layers from data down to `groups`; includes where the weights
        came from (a checkpoint's hash), so an overwritten checkpoint is not mistaken for the
        old."""
        return self.cfg.key("data", "model", *groups) + self.provenance["model.weights_source"]

    def _compress(self) -> compression.Compressed:
        cfg = self.cfg
        start = time.perf_counter()
        with layer("model"):
            trained, hit = self.cache.get_or_make(
                "model", self._key(), lambda: models.build(cfg.model, self.dataset, cfg.seed))
        self.hits["model"], self.train_s = ("hit" if hit else "miss"), time.perf_counter() - start
        torch.manual_seed(cfg.seed)
        with layer("compression"):
            try:
                return compression.compress(cfg.resolved("compress"), cfg.finetune, trained,
                                            self.dataset)
            except compression.NotApplicable as e:
                e.model = cfg.model.arch  # the technique knows why; this names the model
                raise

    def _compile(self, compressed: compression.Compressed,
                 plan: algorithms.Plan) -> compiler.Compiled:
        cfg, device, example = self.cfg, self.device, self.dataset.example()
        settings, capped = cfg.resolved("compiler"), None
        if settings.tuner == "metaschedule" and self.gates is not None:  # the study's budget
            trials = compiler.DEFAULT_TRIALS if settings.trials is None else settings.trials
            if self.gates.tuning_trials(trials) < trials:
                capped = self.gates.tuning_trials(trials)
                settings = dataclasses.replace(settings, trials=capped)
                say(f"  tuning: {capped} new trials of the {trials} asked (" + (
                    f"the round before spent {self.gates.extend_from}; "
                    if self.gates.extend_from else "") + (
                    f"the study's budget.tuning_trials has {self.gates.tuning_left} left"
                    if self.gates.tuning_left is not None else "") + ")")
        if settings.tuner != "none":
            self.records = Path(tempfile.mkdtemp(prefix="dlas-records-")) / "tuning"
        model_key = fingerprint(compressed.module, compressed.precision)

        extend = bool(self.gates and self.gates.extend_from)  # a tuning round: tune on

        def make() -> compiler.Compiled:
            return compiler.compile(compressed.module, example, plan, settings, device.target,
                                    compressed.precision, records_to=self.records,
                                    measure_on=device.rpc, model_key=model_key,
                                    extend_tuning=extend)

        if self.cache.root is None or device.remote or device.target.kind.name != "llvm":
            return make()
        database = ""
        if settings.tuner == "metaschedule":
            database = folder_digest(tuning.target_folder(  # with the guard's stored times
                settings.database, device.target, cold_weights=bool(settings.cold_weights)))
            database += f" {tuning_guard.RULE}"  # which records are applied
        key = {"model": model_key,
               "settings": cfg.key("algo", "compiler"), "target": str(device.target),
               "input": [list(example.shape), str(example.dtype)],
               "tvm": tvm.__version__, "database": database}
        if capped is not None:  # fewer trials than its settings say: another build
            key["tuning_trials_capped"] = capped
        if extend:
            key["extends"] = self.gates.extend_from
        if plan.revisions():  # a primitive whose code changed: its old builds are stale
            key["lowering"] = plan.revisions()
        key = json.dumps(key, sort_keys=True)
        built, hit, entry = self.cache.get_or_make_folder(
            "compile", key, make, lambda b, folder: compiler.save(b, folder, self.records),
            compiler.load)
        self.hits["compile"] = "hit" if hit else "miss"
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
            if self.records is not None and (entry / compiler.RECORDS).is_dir():
                shutil.rmtree(self.records, ignore_errors=True)
                shutil.copytree(entry / compiler.RECORDS, self.records)
        return built

    def _finish(self, result: TrialResult, compressed: compression.Compressed,
                built: compiler.Compiled | None) -> TrialResult:
        if built is not None:
            if self.records is not None and self.records.is_dir():  # the records it used
                result.artifacts["tuning"] = self.records
            if built.tuning is not None:
                result.info["tuning_database"] = str(built.tuning.database)
                if built.tuning.untuned:
                    result.info["untuned_tasks"] = ", ".join(built.tuning.untuned)[:5000]
                kept_default = getattr(built.tuning, "kept_default", [])  # an older entry: []
                if kept_default:
                    result.info["default_kept_tasks"] = ", ".join(kept_default)[:5000]
                transferred = getattr(built.tuning, "transferred", [])  # an older entry: []
                if transferred:
                    result.info["transferred_tasks"] = ", ".join(transferred)[:5000]
        if self.untuned:  # the untuned-build gate let it through: what tuning gave
            result.metrics.update(self.untuned)
            result.metrics["tuning_speedup"] = (self.untuned["untuned_latency_ms"] /
                                                result.metrics["latency_ms"])
            result.info["untuned_gate"] = self.gate_rule
        result.cache = dict(self.hits)
        result.compressed, result.built, result.dataset = compressed, built, self.dataset
        if self.hits["finetune"] == "hit":  # nothing was fine-tuned or quantised in this trial
            result.metrics["finetune_s"] = result.metrics["convert_s"] = 0.0
        result.metrics.setdefault("train_s", self.train_s)
        result.info.update(self.provenance)
        result.info["precision"] = compressed.precision
        if built is not None:
            result.info["arithmetic"] = "; ".join(  # what the compiled convs and matmuls multiply
                f"{op} {', '.join(sorted(kinds))}" for op, kinds in built.arithmetic.items()
                if kinds)
        which, example = self.cfg.artifacts, self.dataset.example()
        if which.get("model", True):  # what the run's MLflow Models need (mlmodel.py)
            result.deploy = {"dataset": data.describe(self.cfg.data, self.dataset),
                             "precision": compressed.precision}
        if built is not None and self.device is not None and self.device.spec.device == \
                "local" and which.get("library", True) and which.get("model", True):
            result.deploy.update({  # the compiled library runs on this CPU
                "input_shape": list(example.shape), "classes": self.dataset.num_classes,
                "target": str(self.device.target),
                "preprocessing": f"the validation transform of data.name {self.cfg.data.name} "
                                 f"at {self.cfg.data.image_size}px (float32 NCHW)",
                "example": example.numpy().tolist()})
        result.artifacts.update(keep_model(compressed, built, self.device, which, example))
        return result


def keep_model(compressed: compression.Compressed, built: compiler.Compiled | None,
               device: hardware.Device, which: dict[str, bool],
               example: torch.Tensor) -> dict[str, Path]:
    """The run's model files by artifact folder (the space's `artifacts:` says which):
    `pytorch/`, the compressed PyTorch model as an MLflow Model saved with torch.export (its
    weights at the precision it computes in; logged as the run's LoggedModel `pytorch`), or,
    with `artifacts: {model: false}`, its state_dict `model/weights.pt`; and `model/model.so`,
    the compiled library (the cached one, or exported for the device)."""
    from . import mlmodel
    root = Path(tempfile.mkdtemp(prefix="dlas-model-"))
    folder, out = root / "model", {}
    folder.mkdir()
    if which.get("weights", True) and which.get("model", True):
        try:
            out["pytorch"] = mlmodel.save_pytorch(compressed.module, example, root / "pytorch")
        except Exception as e:  # torch.export refuses this model: keep its weights as before
            say(f"the PyTorch model is kept as model/weights.pt, not as an MLflow Model: "
                f"torch.export could not save it ({type(e).__name__}: {str(e)[:200]})")
            shutil.rmtree(root / "pytorch", ignore_errors=True)
    if which.get("weights", True) and "pytorch" not in out:
        torch.save(compressed.module.state_dict(), folder / "weights.pt")
    if which.get("library", True) and built is not None:
        if built.library is not None and built.library.is_file():
            shutil.copyfile(built.library, folder / "model.so")
        else:
            hardware.export_library(built.executable, device, folder)
    if any(folder.iterdir()):
        out["model"] = folder
    if not out:
        shutil.rmtree(root)
    return out


def latency_metrics(prefix: str, timing: hardware.Timing,
                    stem: str = "latency") -> dict[str, float]:
    """`<prefix><stem>_ms` (the median), its std, p90 and 95% interval, of one timing."""
    name = f"{prefix}{stem}"
    return {f"{name}_ms": timing.median_ms, f"{name}_std_ms": timing.std_ms,
            f"{name}_p90_ms": timing.p90_ms, f"{name}_ci_low_ms": timing.ci_ms[0],
            f"{name}_ci_high_ms": timing.ci_ms[1]}


def speedup_metrics(torch_time: hardware.Timing, tvm_time: hardware.Timing,
                    name: str = "speedup_vs_torch") -> dict[str, float]:
    """`speedup_vs_torch` (ratio of the medians) and its 95% interval (bootstrap)."""
    low, high = hardware.ratio_ci(torch_time.repeats, tvm_time.repeats)
    return {name: torch_time.median_ms / tvm_time.median_ms,
            f"{name}_ci_low": low, f"{name}_ci_high": high}


def _judge(*names: str):
    """A judge for hardware.exclusively over the timings named in an attempt's dict."""
    def judge(timings: dict, other_cpu: float) -> str | None:
        return hardware.disturbed({name: (timings[name].median_ms, timings[name].ci_ms)
                                   for name in names if timings.get(name) is not None},
                                  other_cpu)
    return judge


def measure_eager(compressed: compression.Compressed, dataset: data.Data,
                  device: hardware.Device, cfg) -> TrialResult:
    """Layer 6 for `compiler.backend: torch`: PyTorch eager is the deployed code; it is timed
    once, under the protocol that times TVM, and is its own baseline."""
    start = time.perf_counter()
    example = dataset.example()
    timings, phase = hardware.exclusively(
        device.name, lambda: {"torch": hardware.time_torch(compressed.module, example, cfg.hw,
                                                           device.threads)},
        _judge("torch"), say=say)
    eager = timings["torch"]
    metrics = {**compressed.metrics, "compile_s": 0.0, **latency_metrics("", eager),
               **latency_metrics("torch_", eager), **phase, "speedup_vs_torch": 1.0,
               "speedup_vs_torch_ci_low": 1.0, "speedup_vs_torch_ci_high": 1.0,
               "measure_s": time.perf_counter() - start}
    return TrialResult(metrics, info={**device.info(), "target": "torch eager"})


def measure(compressed: compression.Compressed, built: compiler.Compiled, dataset: data.Data,
            device: hardware.Device, cfg) -> TrialResult:
    """Layer 6: check the compiled module against PyTorch, then time both side by side, alone
    on the device (hardware.exclusively: its lock, and timing again when others disturbed it).
    The device kind runs and times the module (a remote one uploads it, checks and times it
    there); the PyTorch baseline is timed only where PyTorch eager runs (the local CPU)."""
    example = dataset.example()
    with torch.no_grad():
        reference = compressed.module(example).numpy()
    start = time.perf_counter()

    def attempt() -> dict:
        output, tvm_time = device.measure(built.executable, example, cfg.hw)  # wherever it is
        torch_time = None  # the PyTorch eager baseline runs here, on a device of this CPU
        if device.kind.eager:
            torch_time = hardware.time_torch(compressed.module, example, cfg.hw,
                                             device.threads)
        return {"output": output, "tvm": tvm_time, "torch": torch_time}

    timings, phase = hardware.exclusively(device.name, attempt, _judge("tvm", "torch"),
                                          local=not device.remote, say=say)
    tvm_time, torch_time = timings["tvm"], timings["torch"]
    metrics = {
        **compressed.metrics, **built.metrics, **latency_metrics("", tvm_time), **phase,
        "max_rel_error": compiler.max_relative_error(timings["output"], reference),
        "measure_s": time.perf_counter() - start,
    }
    if torch_time is not None:
        metrics.update(latency_metrics("torch_", torch_time))
        metrics.update(speedup_metrics(torch_time, tvm_time))
    return TrialResult(metrics, info=device.info())
