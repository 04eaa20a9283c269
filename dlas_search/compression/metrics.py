"""What a (compressed) model costs: parameters, multiply-accumulates, sparsity, and its size
as deployed in the precision the compiler keeps.

The size counts what a deployment would store: conv and linear weights at their precision's
bytes (int8 adds a fp32 scale per output channel), CSR when the zeros of unstructured pruning
make that smaller, every other tensor at fp32 (fp16 for fp16). MACs are counted dense: zeros
in the weights still count (what a dense kernel computes).
"""
from __future__ import annotations

import torch
from torch import nn

from .pruning import prunable

__all__ = ["WEIGHT_BYTES", "sparsity", "storage_bytes", "deployed_bytes", "count_macs",
           "count_params", "measure"]

# bytes per stored value of a conv/linear weight, by precision (other tensors: fp32 for int8,
# whose biases and scales stay fp32; fp16 for fp16)
WEIGHT_BYTES = {"fp32": 4, "fp16": 2, "int8": 1}


def sparsity(model: nn.Module) -> float:
    """Fraction of zeros among conv and linear weights."""
    weights = [getattr(m, name) for m, name in prunable(model)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / sum(w.numel() for w in weights)


def storage_bytes(tensor: torch.Tensor, value_bytes: int | None = None) -> int:
    """Bytes to store a tensor with `value_bytes` per value (default: its own dtype): dense,
    or CSR (values, int32 column indices, int32 row pointers) when that is smaller."""
    value_bytes = value_bytes or tensor.element_size()
    dense = tensor.numel() * value_bytes
    if tensor.dim() < 2:
        return dense
    rows = tensor.shape[0]
    nnz = int(torch.count_nonzero(tensor))
    return min(dense, nnz * (value_bytes + 4) + (rows + 1) * 4)


def deployed_bytes(model: nn.Module, precision: str = "fp32") -> tuple[int, int]:
    """(bytes as deployed, bytes stored dense) of a model's tensors in `precision`: conv and
    linear weights at WEIGHT_BYTES (int8 adds one fp32 scale per output channel), everything
    else fp32 (fp16 for fp16). Only the pruned weights can go CSR."""
    weights = {id(getattr(m, name)) for m, name in prunable(model)}
    other_bytes = 2 if precision == "fp16" else 4
    deployed = dense = 0
    for tensor in model.state_dict(keep_vars=True).values():
        if not tensor.is_floating_point():
            continue
        if id(tensor) in weights:
            per_value = WEIGHT_BYTES[precision]
            scales = tensor.shape[0] * 4 if precision == "int8" else 0
            deployed += storage_bytes(tensor.detach(), per_value) + scales
            dense += tensor.numel() * per_value + scales
        else:
            deployed += tensor.numel() * other_bytes
            dense += tensor.numel() * other_bytes
    return deployed, dense


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


def measure(model: nn.Module, example: torch.Tensor, precision: str = "fp32") -> dict[str, float]:
    """Size and cost metrics of a (compressed) fp32 model deployed in `precision`."""
    size, dense = deployed_bytes(model, precision)
    return {
        "params": count_params(model),
        "nonzero_params": float(sum(int(torch.count_nonzero(p)) for p in model.parameters())),
        "size_mb": size / 1e6,
        "size_dense_mb": dense / 1e6,
        "sparsity": sparsity(model),
        "macs": count_macs(model, example),
    }
