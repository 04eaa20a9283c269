"""Layer 3, model optimisations: a trained module in, a compressed, fine-tuned module out, with
its accuracy, size and sparsity.

Each technique is one small class registered by the name the YAML uses (`compress.method`):
`apply` compresses before fine-tuning, `finish` makes it permanent afterwards. Adding one is
one class here and one entry in a space file.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import prune

from . import training
from .data import Data

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
    """Contract for a compression technique."""

    def apply(self, model: nn.Module, cfg: CompressConfig) -> nn.Module:
        return model

    def finish(self, model: nn.Module) -> nn.Module:
        return model


@method("none")
class NoCompression(Method):
    """The uncompressed baseline (still fine-tuned, so that every trial trains equally long)."""


def prunable(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """The conv and linear weights: what pruning acts on and sparsity is measured over."""
    return [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@method("unstructured")
class UnstructuredPruning(Method):
    """Global magnitude pruning over all conv and linear weights.

    The masks stay attached during fine-tuning (so the zeros stay zero) and are removed last.
    """

    def apply(self, model, cfg):
        if cfg.amount is None:
            raise ValueError("compress.amount is required for compress.method=unstructured")
        prune.global_unstructured(prunable(model), pruning_method=prune.L1Unstructured,
                                  amount=cfg.amount)
        return model

    def finish(self, model):
        for module, name in prunable(model):
            if prune.is_pruned(module):
                prune.remove(module, name)
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


def measure(model: nn.Module, example: torch.Tensor) -> dict[str, float]:
    """Size and cost metrics of a (compressed) model."""
    state = model.state_dict()
    tensors = [t for t in state.values() if t.is_floating_point()]
    return {
        "params": float(sum(p.numel() for p in model.parameters())),
        "nonzero_params": float(sum(int(torch.count_nonzero(p)) for p in model.parameters())),
        "size_mb": sum(storage_bytes(t) for t in tensors) / 1e6,
        "size_dense_mb": sum(t.numel() * t.element_size() for t in tensors) / 1e6,
        "sparsity": sparsity(model),
        "macs": count_macs(model, example),
    }


def compress(cfg: CompressConfig, finetune: FinetuneConfig, model: nn.Module,
             data: Data) -> Compressed:
    """Compress `model` (in place), fine-tune it, and measure accuracy and size."""
    technique = METHODS[cfg.method]
    model = technique.apply(model, cfg)
    start = time.perf_counter()
    training.fit(model, data.train, finetune.epochs, finetune.lr, desc=f"fine-tune {cfg.method}")
    finetune_s = time.perf_counter() - start
    model = technique.finish(model)
    model = training.recalibrate_batchnorm(model, data.train)
    metrics = measure(model, data.example())
    metrics["accuracy"] = training.accuracy(model, data.val)
    metrics["finetune_s"] = finetune_s
    return Compressed(model.eval(), metrics)
