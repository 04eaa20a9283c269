"""`random` pruning: zeros a random fraction of every conv and linear weight.

A baseline, not a technique to deploy: magnitude pruning (`unstructured`) should beat it at the
same `amount`, and a search that finds otherwise has a fine-tuning problem. It also shows what
adding a technique takes: this file (auto-imported by the package) and a value in a space's
`compress.method`. Its zeros are unstructured, so it composes with int8/fp16
(`random+int8`) and can feed the sparse format, like `unstructured`.
"""
from __future__ import annotations

from torch.nn.utils import prune

from .contract import METHODS, Method, setting
from .pruning import prunable

__all__ = ["RandomPruning"]


@METHODS.register("random")
class RandomPruning(Method):
    """Random unstructured pruning of `amount` of each conv and linear weight (seeded by the
    trial's seed); the masks stay attached while fine-tuning."""
    label = "random"
    settings = ("amount",)   # the same setting as `unstructured`: it applies to both
    kind = "pruning"
    sparse = True            # same-shape weights with zeros: what the sparse format stores

    def apply(self, model, cfg, example):
        for module, name in prunable(model):
            prune.random_unstructured(module, name, amount=setting(cfg, "amount"))
        return model

    def finish(self, model):
        for module, name in prunable(model):
            if prune.is_pruned(module):
                prune.remove(module, name)
        return model

