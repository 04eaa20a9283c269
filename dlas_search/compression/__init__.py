"""Layer 3, model optimisations: a trained module in, a compressed, fine-tuned module out, with
its accuracy, size and sparsity.

Each technique is one small class registered by the name the YAML uses (`compress.method`):
`apply` compresses before fine-tuning, `finish` makes it permanent afterwards, `convert`
lowers the precision last. Adding one is one class registered in METHODS (contract.py says
what it declares) and one entry in a space file.

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

The package: contract.py (Method, the METHODS registry, the settings and the result),
pruning.py, quantisation.py (the methods, registered in this order), random.py (a baseline,
and the worked example of adding a technique: any module here registers itself on import),
metrics.py (size, MACs, parameters, sparsity), and `compress`, the layer's entry, here.
"""
from __future__ import annotations

import contextlib
import copy
import time
import traceback

import torch
from torch import nn

from .. import training
from ..data import Data
from ..errors import BadInput
from ..faults import layer
from .contract import (CALIBRATION_IMAGES, METHODS, Chain, CompressConfig, Compressed,
                       FinetuneConfig, Method, MethodRegistry, NoCompression, NotApplicable,
                       prunes_unstructured, setting, summary, technique)
from .pruning import ChannelPruning, UnstructuredPruning, prunable
from .quantisation import Fp16, HalfPrecision, Int8, Quantized
from .quantisation import _load_quantized  # noqa: F401  (pickles in stage caches name it here)
from .metrics import (WEIGHT_BYTES, count_macs, count_params, deployed_bytes, measure,
                      sparsity, storage_bytes)
from ..registry import discover

discover(__name__, __path__)  # any other module (random.py, a user's technique) registers too

__all__ = [
    "compress", "NotApplicable",
    # the contract and the registry
    "Method", "Chain", "MethodRegistry", "METHODS", "CompressConfig", "FinetuneConfig",
    "Compressed", "technique", "setting", "summary", "prunes_unstructured",
    "CALIBRATION_IMAGES",
    # the methods and the modules they hand down
    "NoCompression", "UnstructuredPruning", "ChannelPruning", "Int8", "Fp16", "Quantized",
    "HalfPrecision", "prunable",
    # measurements
    "WEIGHT_BYTES", "sparsity", "storage_bytes", "deployed_bytes", "count_macs",
    "count_params", "measure",
]


def compress(cfg: CompressConfig, finetune: FinetuneConfig, model: nn.Module,
             data: Data) -> Compressed:
    """Compress `model` (in place), fine-tune it, and measure accuracy and size; `params` and
    `macs` are after compression, `params_before` and `macs_before` before it. The accuracy is
    that of the module handed down (for int8: PyTorch's quantised model)."""
    steps, example = technique(cfg.method), data.example()
    before = {"params_before": count_params(model), "macs_before": count_macs(model, example)}
    teacher = copy.deepcopy(model).eval() if finetune.distill and finetune.epochs > 0 else None
    with _applying(cfg.method, "compressing"):
        model = steps.apply(model, cfg, example)
        with torch.no_grad():  # a library can leave a model that no longer runs: say so now
            model.eval()(example)
    start = time.perf_counter()
    with layer("fine-tune"):
        training.fit(model, data.train_loader(finetune.batch_size), finetune.epochs,
                     finetune.lr, desc=f"fine-tune {cfg.method}", teacher=teacher)
    finetune_s = time.perf_counter() - start
    model = steps.finish(model)
    model = training.recalibrate_batchnorm(model, data.train)
    metrics = {**before, **measure(model, example, steps.precision)}
    start = time.perf_counter()
    with torch.no_grad():  # convert may change the model in place (fp16 halves it)
        finite = bool(torch.isfinite(model.eval()(example)).all())
    with _applying(cfg.method, "converting"):
        deployed = steps.convert(model.eval(), cfg, data)
    if finite:
        _check_finite(cfg.method, deployed, example)
    metrics["convert_s"] = time.perf_counter() - start
    metrics["accuracy"] = training.accuracy(deployed, data.val)
    metrics["val_images"] = float(len(data.val.dataset))  # for the accuracy's interval
    metrics["finetune_s"] = finetune_s
    return Compressed(deployed.eval(), metrics, steps.precision)


# (the library function an exception came from, what the model does that it cannot follow)
_KNOWN = (("update_reshape_index_mapping", "its forward reshapes the channel dimension into "
           "groups (a channel shuffle, as in ShuffleNet: x.view(b, groups, c // groups, h, w)), "
           "which torch-pruning's dependency graph cannot follow, so no consistent set of "
           "channels can be removed; prune it with `unstructured`, or quantise it"),)


@torch.no_grad()
def _check_finite(method: str, deployed: nn.Module, example: torch.Tensor) -> None:
    """NotApplicable when the converted model gives NaN or inf (the model before conversion
    did not: swin_v2_t in fp16), naming the first module whose output did."""
    if torch.isfinite(deployed(example)).all():
        return
    seen: list[str] = []

    def hook(name):
        def check(module, inputs, output):
            if not seen and isinstance(output, torch.Tensor) and output.is_floating_point() \
                    and not torch.isfinite(output).all():
                seen.append(f"{name} ({type(module).__name__})")
        return check
    handles = [m.register_forward_hook(hook(n)) for n, m in deployed.named_modules() if n]
    try:
        deployed(example)
    finally:
        for h in handles:
            h.remove()
    where = f", first in {seen[0]}" if seen else ""
    raise NotApplicable(method, f"its converted model computes NaN or inf on an input the "
                        f"model before conversion handles{where}: its arithmetic overflows or "
                        "underflows at this precision; compress this model another way")


@contextlib.contextmanager
def _applying(method: str, doing: str):
    """Turn an exception from inside a library, while `method` is `doing` its work, into
    NotApplicable naming the technique and why (bad settings stay BadInput)."""
    try:
        yield
    except (BadInput, NotApplicable, MemoryError, KeyboardInterrupt):
        raise
    except Exception as e:
        frames = traceback.extract_tb(e.__traceback__)
        known = next((why for name, why in _KNOWN for f in frames if f.name == name), None)
        file = frames[-1].filename if frames else "?"
        where = file.split("site-packages/")[1].split("/")[0] if "site-packages/" in file \
            else file.rsplit("/", 1)[-1]
        raise NotApplicable(method, known or (
            f"{doing} failed inside {where} with {type(e).__name__}: {e}"
            .splitlines()[0][:400])) from e
