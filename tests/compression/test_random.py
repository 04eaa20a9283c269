"""The worked example of adding a technique: compression/random.py (one module) and a value in
a space's `compress.method`. It is listed, named, composed and constrained like the built-in
methods, without a line elsewhere."""
import copy

import pytest
import torch

from conftest import write_space
from dlas_search import compression, data, models, registry
from dlas_search.compression import CompressConfig, FinetuneConfig
from dlas_search.errors import BadInput
from dlas_search.space import load_space

SPACE = """\
study: random-baseline
objectives: {accuracy: maximize, size_mb: minimize}
space:
  compress:
    method: [unstructured, random, random+int8]
    amount: 0.6
  algo: {format: sparse}
"""


def test_random_pruning_is_a_choice_everywhere(workdir):
    assert "random" in compression.METHODS and "random+int8" in compression.METHODS
    assert compression.technique("random+fp16").precision == "fp16"
    space = load_space(write_space(workdir, SPACE))
    configs = {c.compress.method: c for c in space.variants("compress.method")}
    assert configs["random"].summary().split()[1] == "random0.6"   # run names
    assert configs["random"].ruled_out is None                     # the sparse format takes it
    assert "unstructured-pruned fp32" in configs["random+int8"].ruled_out
    with pytest.raises(BadInput, match="compress.method: 'randm'.*did you mean 'random'"):
        compression.technique("randm")
    # its setting is required, like unstructured's
    with pytest.raises(BadInput, match="compress.amount is required for compress.method=random"):
        compression.technique("random").apply(torch.nn.Sequential(torch.nn.Linear(4, 2)),
                                              CompressConfig("random"), torch.zeros(1, 4))
    assert registry.REGISTRIES["compress.method"] is compression.METHODS


def test_random_pruning_zeros_a_seeded_random_fraction_of_each_layer():
    dataset = data.load(data.DataConfig(image_size=16, subset_train=64, subset_val=32), seed=0)
    model = models.build(models.ModelConfig(arch="resnet18", epochs=0), dataset, seed=0)
    finetune = FinetuneConfig(epochs=0)
    masks = []
    for method in ("random", "random", "unstructured"):
        torch.manual_seed(0)
        out = compression.compress(CompressConfig(method, amount=0.7), finetune,
                                   copy.deepcopy(model), dataset)
        assert out.metrics["sparsity"] == pytest.approx(0.7, abs=0.005)
        masks.append([(m.weight == 0) for m, _ in compression.prunable(out.module)])
    for mask in masks[0]:  # per layer, not global: each layer loses its 70%
        assert mask.float().mean().item() == pytest.approx(0.7, abs=0.01)
    assert all(torch.equal(a, b) for a, b in zip(masks[0], masks[1]))       # seeded
    assert not all(torch.equal(a, b) for a, b in zip(masks[0], masks[2]))   # not magnitude
