"""Any torchvision classifier through every technique (opt-in: DLAS_SWEEP=1; 16 min on 2
cores with `-n 2`, measured 2026-12-07 on an AMD EPYC Zen 4).

Every torchvision classification model of up to 30 M parameters that runs and exports with
torch.export at 32x32 goes through none, unstructured (0.5), channel (0.5), int8 and fp16
(untrained, no fine-tuning, a small calibration set), then into TVM: exported, imported into
Relax with the technique's arithmetic, BatchNorm folded, and its convs legalised by the
algorithm layer's plan (direct; the unstructured model in the sparse format, its dense form
being none's graph with zeros inside). What the models leave out is said, with the reason:

- more than 30 M parameters (torchvision's own count): skipped with the count;
- the uncompressed model does not run or export at 32x32 (inception_v3 needs 75x75): skipped
  with the error;
- a technique that cannot apply to a model (channel pruning on ShuffleNet's channel shuffle
  or on Swin's attention, fp16 where swin_v2_t computes NaN) must fail with
  compression.NotApplicable, naming the technique and why: any other exception fails the test.

    DLAS_SWEEP=1 DLAS_SWEEP_LOG=sweep.jsonl python -m pytest tests/test_models_torchvision.py -n 2 -rs

The count as measured is in docs/paper.md.
"""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torchvision
from tvm import relax

from dlas_search import algorithms, compiler, compression, data, hardware, models
from dlas_search.algorithms import AlgoConfig
from dlas_search.compression import CompressConfig, FinetuneConfig

MAX_PARAMS = 30e6
SIZE = 32
# technique -> (its settings, the formats its model is lowered in by TVM); unstructured's
# dense form is none's graph with zeros inside, so it runs in PyTorch and lowers sparse only
TECHNIQUES = {
    "none": (CompressConfig("none"), ("dense",)),
    "unstructured": (CompressConfig("unstructured", amount=0.5), ("sparse",)),
    "channel": (CompressConfig("channel", ratio=0.5), ("dense",)),
    "int8": (CompressConfig("int8", calibration_images=16), ("dense",)),
    "fp16": (CompressConfig("fp16"), ("dense",)),
}

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not os.environ.get("DLAS_SWEEP"), reason="about 16 min on 2 cores; set DLAS_SWEEP=1")]


def classifiers() -> tuple[list[str], dict[str, str]]:
    """The torchvision classification models up to MAX_PARAMS, and the others with why."""
    kept, left_out = [], {}
    for name in sorted(torchvision.models.list_models(module=torchvision.models)):
        params = torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"]
        if params > MAX_PARAMS:
            left_out[name] = f"{params / 1e6:.1f} M parameters (more than {MAX_PARAMS / 1e6:g} M)"
        else:
            kept.append(name)
    return kept, left_out


KEPT, LEFT_OUT = classifiers()


@pytest.fixture(scope="module", autouse=True)
def one_thread_per_worker():
    """Two xdist workers on two cores: one torch thread each, not two each fighting."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(before)
    else:
        yield


@pytest.fixture(scope="module")
def digits() -> data.Data:
    return data.load(data.DataConfig(image_size=SIZE, val_fraction=0.3, subset_train=64,
                                     subset_val=32), seed=0)


def through_tvm(compressed: compression.Compressed, example: torch.Tensor, fmt: str) -> dict:
    """Export, import into Relax, fold BatchNorm, and legalise with the plan; what it lowered."""
    plan = algorithms.plan(AlgoConfig(conv="direct", format=fmt))
    mod, _ = compiler.imported(compressed.module, example, compressed.precision, None)
    with hardware.local_target(1):
        mod = plan.rewrite(mod)
        mod = relax.transform.LegalizeOps(customize_legalize_map=plan.legalize_map() or None)(mod)
    return plan.metrics()


@pytest.mark.parametrize("arch", KEPT + [  # the others, skipped with why (-rs lists them)
    pytest.param(name, marks=pytest.mark.skip(reason=f"{name}: {why}"))
    for name, why in LEFT_OUT.items()])
def test_every_technique_goes_through_or_says_why_not(arch, digits, record_property):
    torch.manual_seed(0)
    example = digits.example()
    model = models.create(models.ModelConfig(arch=arch), digits.num_classes).eval()
    try:
        with torch.no_grad():
            model(example)
        torch.export.export(model, (example,))
    except Exception as e:
        why = f"does not run or export at {SIZE}x{SIZE}: " \
            f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        _log({"arch": arch, "left_out": why})
        pytest.skip(f"{arch} {why}")
    outcomes = {}
    for name, (cfg, formats) in TECHNIQUES.items():
        try:  # a copy of the model built above: some (googlenet, regnets) are slow to build
            compressed = compression.compress(cfg, FinetuneConfig(epochs=0),
                                              copy.deepcopy(model), digits)
        except compression.NotApplicable as e:
            assert str(e).startswith(f"compression: {cfg.method} cannot compress"), e
            outcomes[name] = f"refused: {e.why}"
            continue
        with torch.no_grad():
            out = compressed.module(example)
        assert out.shape == (1, digits.num_classes) and torch.isfinite(out).all()
        outcomes[name] = "ok"
        for fmt in formats:
            lowered = through_tvm(compressed, example, fmt)
            if fmt == "sparse":
                assert lowered.get("sparse_layers", 0) > 0, lowered  # some conv went sparse
                outcomes[f"{name} sparse"] = "ok"
    record_property("outcomes", outcomes)
    _log({"arch": arch, **outcomes})


def _log(line: dict) -> None:
    """One line per model in $DLAS_SWEEP_LOG, when set: what the sweep's count reads."""
    if os.environ.get("DLAS_SWEEP_LOG"):
        with open(os.environ["DLAS_SWEEP_LOG"], "a") as f:
            f.write(json.dumps(line) + "\n")
