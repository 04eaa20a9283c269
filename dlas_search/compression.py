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
| `int8` | | post-training static quantisation (PT2E), calibrated on training images |
| `fp16` | | half-precision weights and activations |
| `unstructured+int8`, `channel+int8` (and `+fp16`) | as above | pruning, fine-tuning, then quantisation |

    result = compress(CompressConfig("channel", ratio=0.5), FinetuneConfig(epochs=1), model, data)
    result.metrics["params"] / result.metrics["params_before"]     # about 0.25

The module handed down is what PyTorch runs (fp32 in, fp32 out, whatever the precision) and
`Compressed.precision` tells the compiler which arithmetic to keep (lowering.py).
"""
from __future__ import annotations

import copy
import io
import time
from dataclasses import dataclass, field, fields

import torch
from torch import nn
from torch.nn.utils import prune

from . import lowering, training
from .faults import layer
from .data import Data
from .errors import BadInput, allowed

METHODS: dict[str, "Method"] = {}
PRUNING, QUANTISATION = ("unstructured", "channel"), ("int8", "fp16")
# what `compress.method` may be: each technique alone, or pruning followed by quantisation
CHOICES = ("none", *PRUNING, *QUANTISATION,
           *(f"{p}+{q}" for p in PRUNING for q in QUANTISATION))


def method(name: str):
    def register(cls):
        METHODS[name] = cls()
        return cls
    return register


CALIBRATION_IMAGES = 256


def _with(technique: str) -> tuple[str, ...]:
    return tuple(c for c in CHOICES if technique in c.split("+"))


@dataclass(frozen=True)
class CompressConfig:
    method: str = field(default="none", metadata={"choices": CHOICES})
    # Fraction of conv and linear weights set to zero (unstructured pruning only).
    amount: float | None = field(default=None, metadata={
        "min": 0.0, "max": 0.99, "when": {"compress.method": _with("unstructured")}})
    # Fraction of the channels removed from each prunable layer (channel pruning only).
    ratio: float | None = field(default=None, metadata={
        "min": 0.0, "max": 0.95, "when": {"compress.method": _with("channel")}})
    # Training images that calibrate the int8 activation ranges (unset: 256).
    calibration_images: int | None = field(default=None, metadata={
        "min": 1, "max": 100_000, "when": {"compress.method": _with("int8")}, "unset": 256})


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


class Method:
    """Contract for a compression technique. `apply` runs before fine-tuning (it gets one
    example input, batch 1, for techniques that trace the model), `finish` after it, and
    `convert` last, on the fine-tuned model with BatchNorm statistics settled (quantisation).
    Each may change the model in place or return a new one."""
    precision = "fp32"

    def apply(self, model: nn.Module, cfg: CompressConfig, example: torch.Tensor) -> nn.Module:
        return model

    def finish(self, model: nn.Module) -> nn.Module:
        return model

    def convert(self, model: nn.Module, cfg: CompressConfig, data: Data) -> nn.Module:
        return model


class Chain(Method):
    """Pruning then quantisation (`channel+int8`): each step of each method, in order."""

    def __init__(self, *steps: Method):
        self.steps = steps
        self.precision = steps[-1].precision

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


def technique(name: str) -> Method:
    """The method for a `compress.method` value (one name, or names joined by `+`)."""
    if name not in CHOICES:
        raise allowed("compress.method", name, list(CHOICES))
    steps = [METHODS[part] for part in name.split("+")]
    return steps[0] if len(steps) == 1 else Chain(*steps)


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


class HalfPrecision(nn.Module):
    """A model computing in fp16 in PyTorch, fp32 in and out like every other model. TVM's
    importer takes only fp32 graphs, so `for_export` gives the fp32 twin with the same
    (fp16-rounded) weights; the compiler turns it back to fp16 arithmetic."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.half().eval()

    def forward(self, x):
        return self.model(x.half()).float()

    def for_export(self) -> nn.Module:
        return copy.deepcopy(self.model).float().eval()


@method("fp16")
class Fp16(Method):
    """Half precision: weights rounded to fp16, activations in fp16."""
    precision = "fp16"

    def convert(self, model, cfg, data):
        return HalfPrecision(model)


class Quantized(nn.Module):
    """PyTorch's PT2E-quantised model (quantise/dequantise around each conv and linear).
    Pickles as a serialised ExportedProgram: the GraphModule itself cannot be pickled, and the
    stage cache stores it."""

    def __init__(self, program: torch.export.ExportedProgram):
        super().__init__()
        self.program = program
        self.graph = program.module()

    def forward(self, x):
        return self.graph(x)

    def train(self, mode: bool = True):
        """An exported graph is inference-only: it has no train mode to switch to (and
        refuses the call), so eval() is a no-op here."""
        self.training = False
        return self

    def for_export(self) -> nn.Module:
        """The graph alone: exporting it inside this wrapper breaks torch.export's unlifting."""
        return self.program.module()

    def __reduce__(self):
        buffer = io.BytesIO()
        torch.export.save(self.program, buffer)
        return (_load_quantized, (buffer.getvalue(),))


def _load_quantized(blob: bytes) -> Quantized:
    lowering.register_quantized_ops()
    return Quantized(torch.export.load(io.BytesIO(blob)))


def _any_batch():
    """dynamic_shapes for torch.export: the batch size is free (calibration, evaluation)."""
    return ({0: torch.export.Dim("batch", min=1, max=65536)},)


def _split_shared_modules(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Give each call of a module called several times its own name in the graph metadata.

    torchvision's ResNet blocks call one ReLU twice; the quantiser groups nodes by module and
    refuses a group with two outputs ("Input partition has more than one output node")."""
    groups: dict[tuple, list] = {}
    for node in graph.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.op == "call_function" and stack:
            groups.setdefault((list(stack.values())[-1][0], node.target), []).append(node)
    for nodes in groups.values():
        if len(nodes) > 1:
            for node in nodes:
                stack = dict(node.meta["nn_module_stack"])
                last = list(stack)[-1]
                stack[last] = (f"{stack[last][0]}@{node.name}", stack[last][1])
                node.meta["nn_module_stack"] = stack
    return graph


@method("int8")
class Int8(Method):
    """Post-training static quantisation with PyTorch's PT2E flow (torchao's `prepare_pt2e`
    and `convert_pt2e`, X86InductorQuantizer): int8 weights per output channel (symmetric),
    uint8 activations per tensor, ranges calibrated on `calibration_images` training images."""
    precision = "int8"

    def convert(self, model, cfg, data):
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86
        lowering.register_quantized_ops()
        quantizer = x86.X86InductorQuantizer().set_global(
            x86.get_default_x86_inductor_quantization_config())
        batch = next(iter(data.train))[0][:2]
        graph = torch.export.export(model.eval(), (batch,),
                                    dynamic_shapes=_any_batch()).module()
        prepared = prepare_pt2e(_split_shared_modules(graph), quantizer)
        wanted, seen = cfg.calibration_images or CALIBRATION_IMAGES, 0
        with torch.no_grad():
            for images, _ in data.train:
                prepared(images[:wanted - seen])
                seen += min(len(images), wanted - seen)
                if seen >= wanted:
                    break
        quantized = convert_pt2e(prepared)
        return Quantized(torch.export.export(quantized, (batch,),
                                             dynamic_shapes=_any_batch()))


def sparsity(model: nn.Module) -> float:
    """Fraction of zeros among conv and linear weights."""
    weights = [getattr(m, name) for m, name in prunable(model)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / sum(w.numel() for w in weights)


# bytes per stored value of a conv/linear weight, by precision (other tensors: fp32 for int8,
# whose biases and scales stay fp32; fp16 for fp16)
WEIGHT_BYTES = {"fp32": 4, "fp16": 2, "int8": 1}


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


def compress(cfg: CompressConfig, finetune: FinetuneConfig, model: nn.Module,
             data: Data) -> Compressed:
    """Compress `model` (in place), fine-tune it, and measure accuracy and size; `params` and
    `macs` are after compression, `params_before` and `macs_before` before it. The accuracy is
    that of the module handed down (for int8: PyTorch's quantised model)."""
    steps, example = technique(cfg.method), data.example()
    before = {"params_before": count_params(model), "macs_before": count_macs(model, example)}
    teacher = copy.deepcopy(model).eval() if finetune.distill and finetune.epochs > 0 else None
    model = steps.apply(model, cfg, example)
    start = time.perf_counter()
    with layer("fine-tune"):
        training.fit(model, data.train_loader(finetune.batch_size), finetune.epochs,
                     finetune.lr, desc=f"fine-tune {cfg.method}", teacher=teacher)
    finetune_s = time.perf_counter() - start
    model = steps.finish(model)
    model = training.recalibrate_batchnorm(model, data.train)
    metrics = {**before, **measure(model, example, steps.precision)}
    start = time.perf_counter()
    deployed = steps.convert(model.eval(), cfg, data)
    metrics["convert_s"] = time.perf_counter() - start
    metrics["accuracy"] = training.accuracy(deployed, data.val)
    metrics["finetune_s"] = finetune_s
    return Compressed(deployed.eval(), metrics, steps.precision)
