"""Pruning: two ways of removing weights.

`unstructured` zeros the smallest conv/linear weights (same shapes, sparse: what the sparse
kernels of layer 4 store); `channel` removes whole channels (smaller dense layers, fewer
MACs). Both act before fine-tuning, which then recovers the accuracy they cost.
"""
from __future__ import annotations

from torch import nn
from torch.nn.utils import prune

from .contract import METHODS, Method, NotApplicable, setting

__all__ = ["UnstructuredPruning", "ChannelPruning", "prunable"]


def prunable(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """The conv and linear weights: what pruning acts on and sparsity is measured over."""
    return [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@METHODS.register("unstructured")
class UnstructuredPruning(Method):
    """Global magnitude pruning over all conv and linear weights.

    The masks stay attached during fine-tuning (so the zeros stay zero) and are removed last.
    """
    label = "unstructured"
    settings = ("amount",)
    kind = "pruning"
    sparse = True

    def apply(self, model, cfg, example):
        prune.global_unstructured(prunable(model), pruning_method=prune.L1Unstructured,
                                  amount=setting(cfg, "amount"))
        return model

    def finish(self, model):
        for module, name in prunable(model):
            if prune.is_pruned(module):
                prune.remove(module, name)
        return model


@METHODS.register("channel")
class ChannelPruning(Method):
    """Structured pruning: removes the `ratio` of each layer's channels with the smallest L2
    norm, leaving a smaller dense model. Torch-Pruning's dependency graph (traced on the
    example) prunes coupled layers together, so residual additions, depthwise convs and
    concatenations stay consistent. The final classifier keeps its outputs.

    Attention layers (a module with `num_heads`, as in Swin or MaxViT) are refused before
    tracing: their channels are split into heads by reshapes that the dependency graph expands
    index by index (swin_t grew past 14 GB there), and pruning them needs per-model head
    settings this technique does not take.
    """
    label = "channel"
    settings = ("ratio",)
    kind = "pruning"

    def apply(self, model, cfg, example):
        heads = sorted({type(m).__name__ for m in model.modules()
                        if hasattr(m, "num_heads") or hasattr(m, "n_heads")})
        if heads:
            raise NotApplicable(self.name, f"its attention layers ({', '.join(heads)}) split "
                                "channels into heads, which channel pruning cannot follow "
                                "(torch-pruning's graph of their reshapes does not fit in "
                                "memory); prune it with `unstructured`, or quantise it")
        import torch_pruning as tp  # imported here: only this method needs it (and it is slow)
        ratio = setting(cfg, "ratio")  # at most 0.95: every layer keeps some channels
        head = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
        pruner = tp.pruner.MagnitudePruner(  # eval: tracing must not move BatchNorm statistics
            model.eval(), example, importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=ratio, ignored_layers=[head])
        pruner.step()
        return model
