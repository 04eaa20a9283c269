"""Layer 3, model optimisations: a trained module in, a compressed, fine-tuned module out, with
its accuracy, size and sparsity.

Each technique is one small class registered by the name the YAML uses (`compress.method`):
`apply` compresses before fine-tuning, `finish` makes it permanent afterwards. Adding one is
one class here and one entry in a space file.

| method | setting | what it does |
| --- | --- | --- |
| `none` | | the baseline, fine-tuned like the others |
| `unstructured` | `amount` | zeros the smallest conv/linear weights (same shapes, sparse) |
| `channel` | `ratio` | removes whole channels (smaller dense layers, fewer MACs) |

    result = compress(CompressConfig("channel", ratio=0.5), FinetuneConfig(epochs=1), model, data)
    result.metrics["params"] / result.metrics["params_before"]     # about 0.25
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, fields

import torch
from torch import nn
from torch.nn.utils import prune

from . import training
from .data import Data
from .errors import BadInput

METHODS: dict[str, "Method"] = {}


def method(name: str):
    def register(cls):
        METHODS[name] = cls()
        return cls
    return register


@dataclass(frozen=True)
class CompressConfig:
    method: str = field(default="none", metadata={"choices": METHODS})
    # Fraction of conv and linear weights set to zero (unstructured pruning only).
    amount: float | None = field(default=None, metadata={
        "min": 0.0, "max": 0.99, "when": {"compress.method": ("unstructured",)}})
    # Fraction of the channels removed from each prunable layer (channel pruning only).
    ratio: float | None = field(default=None, metadata={
        "min": 0.0, "max": 0.95, "when": {"compress.method": ("channel",)}})


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = field(default=1, metadata={"min": 0, "max": 1000})
    lr: float = field(default=0.01, metadata={"min": 1e-6, "max": 10.0})


@dataclass
class Compressed:
    """What layer 3 gives the layers below."""
    module: nn.Module
    metrics: dict[str, float]


class Method:
    """Contract for a compression technique. `apply` gets one example input (batch 1) for
    techniques that trace the model; it may change the model in place or return a new one."""

    def apply(self, model: nn.Module, cfg: CompressConfig, example: torch.Tensor) -> nn.Module:
        return model

    def finish(self, model: nn.Module) -> nn.Module:
        return model


@method("none")
class NoCompression(Method):
    """The uncompressed baseline (still fine-tuned, so that every trial trains equally long)."""


def prunable(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """The conv and linear weights: what pruning acts on and sparsity is measured over."""
    return [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def setting(cfg: CompressConfig, name: str) -> float:
    """`cfg.<name>`, required by `cfg.method` and checked against the field's range."""
    meta = next(f.metadata for f in fields(CompressConfig) if f.name == name)
    value, allowed = getattr(cfg, name), f"allowed: {meta['min']} to {meta['max']}"
    if value is None:
        raise BadInput(f"compress.{name} is required for compress.method={cfg.method}; {allowed}")
    if not meta["min"] <= value <= meta["max"]:
        raise BadInput(f"compress.{name}: {value!r} is out of range for "
                       f"compress.method={cfg.method}; {allowed}")
    return value


@method("unstructured")
class UnstructuredPruning(Method):
    """Global magnitude pruning over all conv and linear weights.

    The masks stay attached during fine-tuning (so the zeros stay zero) and are removed last.
    """

    def apply(self, model, cfg, example):
        prune.global_unstructured(prunable(model), pruning_method=prune.L1Unstructured,
                                  amount=setting(cfg, "amount"))
        return model

    def finish(self, model):
        for module, name in prunable(model):
            if prune.is_pruned(module):
                prune.remove(module, name)
        return model


@method("channel")
class ChannelPruning(Method):
    """Structured pruning: removes the `ratio` of each layer's channels with the smallest L2
    norm, leaving a smaller dense model. Torch-Pruning's dependency graph (traced on the
    example) prunes coupled layers together, so residual additions, depthwise convs and
    concatenations stay consistent. The final classifier keeps its outputs.
    """

    def apply(self, model, cfg, example):
        import torch_pruning as tp  # imported here: only this method needs it (and it is slow)
        ratio = setting(cfg, "ratio")  # at most 0.95: every layer keeps some channels
        head = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
        pruner = tp.pruner.MagnitudePruner(  # eval: tracing must not move BatchNorm statistics
            model.eval(), example, importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=ratio, ignored_layers=[head])
        pruner.step()
        return model


def sparsity(model: nn.Module) -> float:
    """Fraction of zeros among conv and linear weights."""
    weights = [getattr(m, name) for m, name in prunable(model)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / sum(w.numel() for w in weights)


def storage_bytes(tensor: torch.Tensor) -> int:
    """Bytes to store a tensor: dense, or CSR (values, int32 column indices, int32 row
    pointers) when that is smaller."""
    dense = tensor.numel() * tensor.element_size()
    if tensor.dim() < 2:
        return dense
    rows = tensor.shape[0]
    nnz = int(torch.count_nonzero(tensor))
    return min(dense, nnz * (tensor.element_size() + 4) + (rows + 1) * 4)


@torch.no_grad()
def count_macs(model: nn.Module, example: torch.Tensor) -> float:
    """Multiply-accumulates of one forward pass (dense: zeros in weights still count)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        model.eval()(example)
    return counter.get_total_flops() / 2


def count_params(model: nn.Module) -> float:
    return float(sum(p.numel() for p in model.parameters()))


def measure(model: nn.Module, example: torch.Tensor) -> dict[str, float]:
    """Size and cost metrics of a (compressed) model."""
    state = model.state_dict()
    tensors = [t for t in state.values() if t.is_floating_point()]
    return {
        "params": count_params(model),
        "nonzero_params": float(sum(int(torch.count_nonzero(p)) for p in model.parameters())),
        "size_mb": sum(storage_bytes(t) for t in tensors) / 1e6,
        "size_dense_mb": sum(t.numel() * t.element_size() for t in tensors) / 1e6,
        "sparsity": sparsity(model),
        "macs": count_macs(model, example),
    }


def compress(cfg: CompressConfig, finetune: FinetuneConfig, model: nn.Module,
             data: Data) -> Compressed:
    """Compress `model` (in place), fine-tune it, and measure accuracy and size; `params` and
    `macs` are after compression, `params_before` and `macs_before` before it."""
    technique, example = METHODS[cfg.method], data.example()
    before = {"params_before": count_params(model), "macs_before": count_macs(model, example)}
    model = technique.apply(model, cfg, example)
    start = time.perf_counter()
    training.fit(model, data.train, finetune.epochs, finetune.lr, desc=f"fine-tune {cfg.method}")
    finetune_s = time.perf_counter() - start
    model = technique.finish(model)
    model = training.recalibrate_batchnorm(model, data.train)
    metrics = {**before, **measure(model, example)}
    metrics["accuracy"] = training.accuracy(model, data.val)
    metrics["finetune_s"] = finetune_s
    return Compressed(model.eval(), metrics)
