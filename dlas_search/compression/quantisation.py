"""Quantisation: lower-precision arithmetic, applied last, to the fine-tuned model.

`int8` is post-training static quantisation with PyTorch's PT2E flow, calibrated on training
images; `fp16` rounds weights and activations to half precision. Each hands down a module
PyTorch runs fp32 in, fp32 out (`Quantized`, `HalfPrecision`), with `for_export` giving the
graph TVM's importer takes; `precision` tells the compiler which arithmetic to keep
(lowering.py). Registered int8 first: the order `allowed:` lists them in.
"""
from __future__ import annotations

import contextlib
import copy
import io
from unittest import mock

import torch
from torch import nn

from .. import lowering
from .contract import CALIBRATION_IMAGES, METHODS, Method

__all__ = ["Int8", "Fp16", "Quantized", "HalfPrecision"]


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


def _without_dead_weights(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """convert_pt2e folds each weight's quantisation into an int8 constant and leaves the fp32
    weight behind, read by nothing: drop it, so the model holds its weights once, in int8
    (resnet18: 11 MB, not 56 MB of fp32 and int8 in the stage cache and the run's model)."""
    graph.graph.eliminate_dead_code()
    used = {node.target for node in graph.graph.nodes if node.op == "get_attr"}
    for name, _ in [*graph.named_parameters(), *graph.named_buffers()]:
        if name not in used:
            owner, _, attribute = name.rpartition(".")
            delattr(graph.get_submodule(owner) if owner else graph, attribute)
    graph.recompile()
    return graph


@contextlib.contextmanager
def _without_qat_batchnorm_folding():
    """convert_pt2e runs its quantisation-aware-training step, folding BatchNorm into the conv
    before it, whenever a BatchNorm is left in the graph. After prepare_pt2e (post-training)
    every conv+BatchNorm pair is already folded, so the step matches nothing, but it traces 96
    pattern graphs to find that out: 23 of densenet121's 34 s, whose BatchNorms come before
    their convs. It is skipped here: the graph, weights and outputs are the same
    (tests/test_compression.py); if torchao moves the step, it simply runs."""
    from torchao.quantization.pt2e import quantize_pt2e
    if not hasattr(quantize_pt2e, "_fold_conv_bn_qat"):
        yield
        return
    with mock.patch.object(quantize_pt2e, "_fold_conv_bn_qat", lambda graph: graph):
        yield


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


@METHODS.register("int8")
class Int8(Method):
    """Post-training static quantisation with PyTorch's PT2E flow (torchao's `prepare_pt2e`
    and `convert_pt2e`, X86InductorQuantizer): int8 weights per output channel (symmetric),
    uint8 activations per tensor, ranges calibrated on `calibration_images` training images."""
    label = "int8"
    settings = ("calibration_images",)
    precision = "int8"
    kind = "quantisation"

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
        with _without_qat_batchnorm_folding():
            quantized = _without_dead_weights(convert_pt2e(prepared))
        return Quantized(torch.export.export(quantized, (batch,),
                                             dynamic_shapes=_any_batch()))


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


@METHODS.register("fp16")
class Fp16(Method):
    """Half precision: weights rounded to fp16, activations in fp16."""
    label = "fp16"
    precision = "fp16"
    kind = "quantisation"

    def convert(self, model, cfg, data):
        return HalfPrecision(model)
