"""A trial's configuration: one frozen settings group per layer (the parameter groups of
stack.py), validated values, and the constraints that rule a combination out (decided once,
when the configuration is made)."""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

from .. import algorithms, compiler, compression, data, hardware, models, registry, stack
from ..errors import BadInput, allowed

__all__ = ["LAYERS", "OBJECTIVE_METRICS", "DIRECTIONS", "TOP_LEVEL", "ARTIFACTS", "TrialConfig",
           "check_value", "infeasible"]


# parameter group -> its configuration class, in stack order (stack.GROUPS)
LAYERS: dict[str, type] = dict(zip(stack.GROUPS, (
    data.DataConfig, models.ModelConfig, compression.CompressConfig,
    compression.FinetuneConfig, algorithms.AlgoConfig, compiler.CompilerConfig,
    hardware.HardwareConfig)))
OBJECTIVE_METRICS = ("accuracy", "latency_ms", "size_mb", "macs", "params", "sparsity",
                     "speedup_vs_torch")
DIRECTIONS = ("maximize", "minimize")
TOP_LEVEL = ("study", "description", "seed", "objectives", "thresholds", "gates", "sampler",
             "budget", "targets", "artifacts", "space")
# what each finished trial's run keeps under `model/` (tens of MB each: can be switched off)
# weights: the PyTorch state_dict (model/weights.pt); library: the compiled model.so; model:
# the library as an MLflow Model (mlmodel.py; local CPU targets), which then holds it alone
ARTIFACTS = {"weights": True, "library": True, "model": True}


@dataclass(frozen=True)
class TrialConfig:
    """One point of the stack: a frozen group per layer, and the seed."""
    data: data.DataConfig
    model: models.ModelConfig
    compress: compression.CompressConfig
    finetune: compression.FinetuneConfig
    algo: algorithms.AlgoConfig
    compiler: compiler.CompilerConfig
    hw: hardware.HardwareConfig
    seed: int = 0
    # the space's target registry (name -> entry), for the names `hw.target` may use
    targets: Mapping[str, hardware.TargetSpec] = field(default_factory=dict, compare=False)
    # the run artifacts to keep (ARTIFACTS): not a setting of the stack
    artifacts: Mapping[str, bool] = field(default_factory=lambda: dict(ARTIFACTS),
                                          compare=False)
    # why the space rules this configuration out (None: it can run), decided once, here
    ruled_out: str | None = field(default=None, init=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "ruled_out", infeasible(self))

    def target(self) -> hardware.TargetSpec:
        return hardware.lookup(self.hw.target, self.targets)

    def params(self) -> dict[str, Any]:
        """Flat dotted names -> values (None where a parameter does not apply)."""
        return {f"{layer}.{k}": v for layer in LAYERS
                for k, v in dataclasses.asdict(getattr(self, layer)).items()}

    def key(self, *layers: str) -> str:
        """A stable text of the given layers' settings and the seed (for cache keys). A
        setting added after stores existed (`keyed_if_set` in its field's metadata) is left
        out where it does not apply, so the stages stored before it was added are still found
        (where it applies, it joins the key: the stage's work changed)."""
        params = self.params()

        def applies(name: str) -> bool:
            meta = _field_info(name).metadata
            return not meta.get("keyed_if_set") or params[name] is not None or all(
                params.get(parent) in values for parent, values in meta.get("when", {}).items())
        chosen = {k: v for k, v in params.items() if k.split(".")[0] in layers and applies(k)}
        return json.dumps({"seed": self.seed, **chosen}, sort_keys=True)

    def resolved(self, group: str):
        """The settings of parameter group `group` as its layer uses them: a setting that
        applies but was left unset takes the default its field declares (`unset`), so a layer
        never sees None for a setting it uses. `params()` and `key()` keep the values as
        given (they name the run and key the stage cache)."""
        settings, params, fill = getattr(self, group), self.params(), {}
        for f in dataclasses.fields(settings):
            applies = all(params.get(parent) in values
                          for parent, values in f.metadata.get("when", {}).items())
            if getattr(settings, f.name) is None and "unset" in f.metadata and \
                    "when" in f.metadata and applies:
                fill[f.name] = f.metadata["unset"]
        return dataclasses.replace(settings, **fill) if fill else settings

    def summary(self) -> str:
        """A short, unambiguous name for run names and progress lines: the model, the
        compression (`fp32` for none), the conv algorithm (with the sparse block where sparse),
        untuned or tuned with its trials, and the target where not the local CPU, e.g.
        `resnet18 int8 direct_nhwc untuned`, `mobilenet_v2 unstructured0.7 direct sparse1x1
        tuned64`, `resnet18 fp32 eager`."""
        words = [self.model.arch, "fp32" if self.compress.method == "none" else
                 compression.summary(self.compress)]
        if self.compiler.backend == "torch":
            words.append(compiler.BACKENDS.label("torch"))
        else:
            words.append(self.algo.conv)
            if self.algo.format != "dense":
                words.append(self.algo.format + (self.resolved("algo").block or ""))
            settings = self.resolved("compiler")
            words.append(compiler.TUNERS.label(settings.tuner) +
                         (str(settings.trials) if settings.tuner != "none" else ""))
        if self.hw.target != "local":
            words.append(self.hw.target)
        return " ".join(words)


def _field_info(name: str) -> dataclasses.Field:
    layer, _, key = name.partition(".")
    return {f.name: f for f in dataclasses.fields(LAYERS[layer])}[key]


def _base_type(f: dataclasses.Field) -> type:
    """int, float, str or bool from the field's annotation (`float | None` -> float)."""
    hint = typing.get_type_hints(_owner(f))[f.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _owner(f: dataclasses.Field) -> type:
    return next(cls for cls in LAYERS.values() if f in dataclasses.fields(cls))


def check_value(name: str, value: Any, where: str = "") -> Any:
    """Validate one value of parameter `name` against its type, choices and bounds."""
    f = _field_info(name)
    kind = _base_type(f)
    label = f"{where}{name}"
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BadInput(f"{label}: {value!r} is a {type(value).__name__}; expected {kind.__name__}")
    choices = f.metadata.get("choices")
    if choices is not None and value not in choices:
        raise allowed(label, value, list(choices))
    low, high = f.metadata.get("min"), f.metadata.get("max")
    if low is not None and value < low or high is not None and value > high:
        raise BadInput(f"{label}: {value!r} is out of range; allowed: {low} to {high}")
    return value



# --- constraints: combinations of valid values that cannot run together ----------------------

def infeasible(config: TrialConfig) -> str | None:
    """Why the space rules this configuration out (naming the problem and what is allowed),
    or None. Each choice declares its own constraints in the registry (the sparse format
    needs unstructured fp32 weights; PyTorch eager runs on the local CPU)."""
    return registry.infeasible(config.params(), config)


def _all_names() -> list[str]:
    return [f"{layer}.{f.name}" for layer, cls in LAYERS.items() for f in dataclasses.fields(cls)]
