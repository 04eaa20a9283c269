"""The contract of layer 3: what a compression method is, the registry of methods, and the
layer's settings (`compress.*`, `finetune.*`) and result.

A method is one small class registered in METHODS by the name the YAML uses
(`compress.method`). It declares what it knows about itself, and everything else derives from
that instead of keeping its own lists:

    label      a few characters for run names (`unstructured`, `int8`)
    settings   the CompressConfig fields that apply only to it (`amount` for unstructured);
               a setting exists in a space only for the methods that declare it (the `when:`
               of the field), and the required ones (no `unset` default) name its level in
               the summary (`unstructured0.7`)
    precision  the arithmetic it leaves the compiler (`fp32`, `fp16`, `int8`)
    kind       "pruning", "quantisation" or None: the allowed `compress.method` values are
               every method alone and every pruning+quantisation pair (`channel+int8`), a
               Chain of the two
    sparse     it leaves zeros in weights of unchanged shape (what the sparse kernels use)

A method registered later (by a user module) thus appears in the choices, the conditions, the
summaries and the error messages at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Iterable

import torch
from torch import nn

from ..data import Data
from ..errors import BadInput, allowed
from ..registry import Registry

__all__ = ["NotApplicable", "Method", "Chain", "MethodNames", "MethodRegistry", "METHODS", "NoCompression",
           "CompressConfig", "FinetuneConfig", "Compressed", "technique", "setting", "summary",
           "prunes_unstructured", "CALIBRATION_IMAGES"]

CALIBRATION_IMAGES = 256


class NotApplicable(RuntimeError):
    """A technique that cannot compress this model, and why: the trial fails alone, naming
    the layer (compression), the technique, the model and the reason. `model` is filled in by
    the caller that knows the model's name (stages.py)."""

    def __init__(self, technique: str, why: str, model: str | None = None):
        self.technique, self.why, self.model = technique, why, model
        super().__init__(str(self))

    def __str__(self) -> str:
        return (f"compression: {self.technique} cannot compress "
                f"{self.model or 'this model'}: {self.why}")


class Method:
    """Contract for a compression technique. `apply` runs before fine-tuning (it gets one
    example input, batch 1, for techniques that trace the model), `finish` after it, and
    `convert` last, on the fine-tuned model with BatchNorm statistics settled (quantisation).
    Each may change the model in place or return a new one."""
    name = ""                         # set by the registry
    label = ""                        # for run names; empty: the name
    settings: tuple[str, ...] = ()    # CompressConfig fields only this method reads
    precision = "fp32"
    kind: str | None = None           # "pruning", "quantisation" or None
    sparse = False                    # leaves zeros in same-shape weights

    def apply(self, model: nn.Module, cfg: "CompressConfig",
              example: torch.Tensor) -> nn.Module:
        return model

    def finish(self, model: nn.Module) -> nn.Module:
        return model

    def convert(self, model: nn.Module, cfg: "CompressConfig", data: Data) -> nn.Module:
        return model


class Chain(Method):
    """Pruning then quantisation (`channel+int8`): each step of each method, in order."""

    def __init__(self, *steps: Method):
        self.steps = steps
        self.name = "+".join(step.name for step in steps)
        self.label = "+".join(step.label or step.name for step in steps)
        self.settings = tuple(s for step in steps for s in step.settings)
        self.precision = steps[-1].precision
        self.sparse = any(step.sparse for step in steps)
        self.doc = f"{steps[0].name}, fine-tuning, then {'+'.join(s.name for s in steps[1:])}"

    def apply(self, model, cfg, example):
        for step in self.steps:
            model = step.apply(model, cfg, example)
        return model

    def finish(self, model):
        for step in self.steps:
            model = step.finish(model)
        return model

    def convert(self, model, cfg, data):
        for step in self.steps:
            model = step.convert(model, cfg, data)
        return model


class MethodNames(list):
    """The `compress.method` values a setting applies to (the `when:` of its field), kept
    current by the registry: refreshed in place whenever a method registers. A list, not a
    lazy view, because its readers (space.py) take `tuple(values)`, `" or ".join(values)`
    and `isinstance(values, (list, tuple))`, which read a list's storage directly."""


class MethodRegistry(Registry):
    """The registry of compression methods. Its names are every method alone and every
    pruning+quantisation pair (by the methods' `kind`); `lookup("channel+int8")` is the Chain
    of the two."""

    def __init__(self, key: str, what: str, *, instantiate: bool = False):
        super().__init__(key, what, instantiate=instantiate)
        self._applying: dict[str, MethodNames] = {}

    def register(self, name: str, obj: Any = None, /, **meta: Any):
        add = super().register(name, None, **meta)

        def add_and_refresh(thing):
            added = add(thing)
            self._refresh()
            return added
        return add_and_refresh if obj is None else add_and_refresh(obj)

    def of_kind(self, kind: str) -> list[str]:
        """The registered methods of a kind ("pruning", "quantisation"), in order."""
        return [n for n, method in self._items.items()
                if self.meta(n).get("kind", getattr(method, "kind", None)) == kind]

    def names(self) -> list[str]:
        """Every method alone, then every pruning+quantisation pair."""
        quantisation = self.of_kind("quantisation")
        pairs = [f"{p}+{q}" for p in self.of_kind("pruning") for q in quantisation]
        return [*self._items, *pairs]

    def steps(self, name: str) -> list[Method]:
        """The registered methods `name` chains (one for a single method)."""
        return [self._items[part] for part in name.split("+")]

    def lookup(self, name: str, where: str = "") -> Method:
        if name not in self:
            raise allowed(f"{where}{self.key}", name, self.names())
        return self[name]

    def __getitem__(self, name: str) -> Method:
        if name in self._items:
            return self._items[name]
        if name not in self.names():
            raise KeyError(name)
        return Chain(*self.steps(name))

    def attr(self, name: str, attribute: str, default: Any = None) -> Any:
        meta = self.meta(name)
        if attribute in meta:
            return meta[attribute]
        entry = self._items.get(name) or (self[name] if name in self else None)
        return getattr(entry, attribute, default)

    def describe(self) -> list[tuple[str, str]]:
        rows = []
        for name in self.names():
            doc = self.attr(name, "doc") or type(self[name]).__doc__ or ""
            rows.append((name, doc.strip().splitlines()[0] if doc.strip() else self.label(name)))
        return rows

    def applying(self, setting: str) -> MethodNames:
        """The `compress.method` values `setting` applies to (those with a step declaring it):
        the `when:` of the setting's field, kept current as methods register."""
        if setting not in self._applying:
            self._applying[setting] = MethodNames()
            self._refresh()
        return self._applying[setting]

    def _refresh(self) -> None:
        names = self.names()
        for setting, values in self._applying.items():
            values[:] = [n for n in names if any(setting in self.attr(part, "settings", ())
                                                 for part in n.split("+"))]


METHODS = MethodRegistry("compress.method", "compression method", instantiate=True)


@METHODS.register("none")
class NoCompression(Method):
    """The uncompressed baseline (still fine-tuned, so that every trial trains equally long)."""
    label = "none"


def _only_for(setting: str) -> dict[str, MethodNames]:
    return {"compress.method": METHODS.applying(setting)}


@dataclass(frozen=True)
class CompressConfig:
    method: str = field(default="none", metadata={"choices": METHODS})
    # Fraction of conv and linear weights set to zero (unstructured pruning only).
    amount: float | None = field(default=None, metadata={
        "min": 0.0, "max": 0.99, "when": _only_for("amount")})
    # Fraction of the channels removed from each prunable layer (channel pruning only).
    ratio: float | None = field(default=None, metadata={
        "min": 0.0, "max": 0.95, "when": _only_for("ratio")})
    # Training images that calibrate the int8 activation ranges (unset: 256).
    calibration_images: int | None = field(default=None, metadata={
        "min": 1, "max": 100_000, "when": _only_for("calibration_images"),
        "unset": CALIBRATION_IMAGES})


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = field(default=1, metadata={"min": 0, "max": 1000})
    lr: float = field(default=0.01, metadata={"min": 1e-6, "max": 10.0})
    # Fine-tuning batch size; unset: the dataset's `data.batch_size`.
    batch_size: int | None = field(default=None, metadata={"min": 1, "max": 65536})
    # Knowledge distillation from the uncompressed model (soft targets at temperature 4).
    distill: bool = False


@dataclass
class Compressed:
    """What layer 3 gives the layers below: a module PyTorch runs (fp32 in and out), the
    arithmetic the compiler must keep (`fp32`, `fp16`, `int8`), and the metrics."""
    module: nn.Module
    metrics: dict[str, float]
    precision: str = "fp32"


def technique(name: str) -> Method:
    """The method for a `compress.method` value (one name, or names joined by `+`)."""
    return METHODS.lookup(name)


def _field(name: str):
    return next(f for f in fields(CompressConfig) if f.name == name)


def setting(cfg: CompressConfig, name: str) -> float:
    """`cfg.<name>`, required by `cfg.method` and checked against the field's range."""
    meta = _field(name).metadata
    value, allowed = getattr(cfg, name), f"allowed: {meta['min']} to {meta['max']}"
    if value is None:
        raise BadInput(f"compress.{name} is required for compress.method={cfg.method}; {allowed}")
    if not meta["min"] <= value <= meta["max"]:
        raise BadInput(f"compress.{name}: {value!r} is out of range for "
                       f"compress.method={cfg.method}; {allowed}")
    return value


def _levels(settings: Iterable[str]) -> list[str]:
    """The settings that name a method's level: the required ones (no `unset` default)."""
    return [s for s in settings if "unset" not in _field(s).metadata]


def summary(cfg: CompressConfig, sep: str = "") -> str:
    """A few characters for run names: each step's label followed by its level when set
    (`unstructured0.7+int8`, `channel0.5`, `none`; `sep=" "`: `unstructured 0.7+int8`)."""
    words = []
    for part in cfg.method.split("+"):
        values = [getattr(cfg, s) for s in _levels(METHODS.attr(part, "settings", ()))]
        words.append(METHODS.label(part) +
                     "".join(f"{sep}{v:g}" for v in values if v is not None))
    return "+".join(words)


def prunes_unstructured(method: str) -> bool:
    """Whether `method` (a `compress.method` value) leaves the zeros of unstructured pruning
    in weights of unchanged shape: what the sparse kernels (algo.format sparse) store."""
    return method in METHODS and bool(METHODS.attr(method, "sparse"))
