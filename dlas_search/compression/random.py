"""`random` pruning: zeros a random fraction of every conv and linear weight.

A baseline, not a technique to deploy: magnitude pruning (`unstructured`) should beat it at the
same `amount`, and a search that finds otherwise has a fine-tuning problem. It also shows what
adding a technique takes: this file (auto-imported by the package) and a value in a space's
`compress.method`. Its zeros are unstructured, so it composes with int8/fp16
(`random+int8`) and can feed the sparse format, like `unstructured`.
"""
from __future__ import annotations

from torch.nn.utils import prune

from .contract import METHODS, setting
from .pruning import UnstructuredPruning, prunable

__all__ = ["RandomPruning"]


@METHODS.register("random")
class RandomPruning(UnstructuredPruning):
    """Random unstructured pruning of `amount` of each conv and linear weight (seeded by the
    trial's seed); like `unstructured`, the masks stay attached while fine-tuning and are
    removed after it (`finish`, inherited)."""
    label = "random"

    def apply(self, model, cfg, example):
        for module, name in prunable(model):
            prune.random_unstructured(module, name, amount=setting(cfg, "amount"))
        return model
