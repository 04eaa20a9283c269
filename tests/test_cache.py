"""The compiled-module stage of the stage cache, and the model files each trial's run keeps.

A small CNN (a user factory: this module) keeps the compiles to seconds."""
import copy
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import tvm
from mlflow.tracking import MlflowClient
from torch import nn

from conftest import write_space
from dlas_search import compiler, data, hardware, mlmodel, models, pipeline
from dlas_search.cache import StageCache, fingerprint
from dlas_search.cli import main
from dlas_search.errors import BadInput
from dlas_search.space import load_space

SMALL_SPACE = """\
study: small
seed: 0
{artifacts}
space:
  data: {{name: digits, image_size: 16, val_fraction: 0.3}}
  model: {{arch: "test_cache:small_cnn", epochs: 1}}
  compress: {{method: none}}
  finetune: {{epochs: 0}}
  algo: {{conv: [direct, direct_nhwc]}}
  hw: {{threads: 1, warmup: 1, repeat: 3, min_repeat_ms: 1}}
"""


def small_cnn(num_classes: int) -> nn.Module:
    """Two convs (one with BatchNorm to fold), a pooled linear head."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, num_classes))


def small_space(folder: Path, artifacts: str = ""):
    return load_space(write_space(folder, SMALL_SPACE.format(artifacts=artifacts), "small.yaml"))


def latency_free(result: pipeline.TrialResult) -> dict:
    """What a trial gives that does not depend on timing."""
    keep = ("accuracy", "max_rel_error", "conv_layers", "batchnorm_folded", "size_mb", "params")
    return {**{k: result.metrics[k] for k in keep}, "arithmetic": result.info["arithmetic"],
            "output": hardware.run_tvm(result.built.executable, result.dataset.example())}


def same(a: dict, b: dict) -> bool:
    return all(np.array_equal(a[k], b[k]) if k == "output" else a[k] == b[k] for k in a)


def test_compile_stage_hits_on_timing_only_changes_and_misses_on_code_changes(workdir):
    space, cache = small_space(workdir), StageCache(workdir / "cache")
    first = pipeline.run(space.pin({"algo.conv": "direct"}).defaults(), cache)
    assert first.cache == {"model": "miss", "finetune": "miss", "compile": "miss"}
    assert first.metrics["compile_s"] > 0 and "compile_cached_s" not in first.metrics
    assert first.metrics["max_rel_error"] < 1e-4
    # timing-only settings (repeat, warm-up, pinning) leave the compiled code alone
    timing = space.pin({"algo.conv": "direct", "hw.repeat": 5, "hw.warmup": 2,
                        "hw.pin": False}).defaults()
    again = pipeline.run(timing, cache)
    assert again.cache == {"model": "unused", "finetune": "hit", "compile": "hit"}
    assert again.metrics["compile_s"] == 0.0
    assert again.metrics["compile_cached_s"] == first.metrics["compile_s"]
    assert again.built.library is not None and again.built.library.is_file()
    assert same(latency_free(again), latency_free(first))
    assert again.metrics["latency_ms"] > 0
    # a conv algorithm or a thread count changes the code: a new compile of the cached model
    for pins in ({"algo.conv": "direct_nhwc"}, {"algo.conv": "direct", "hw.threads": 2}):
        other = pipeline.run(space.pin(pins).defaults(), cache)
        assert other.cache == {"model": "unused", "finetune": "hit", "compile": "miss"}, pins
        assert other.metrics["compile_s"] > 0
        assert other.metrics["max_rel_error"] < 1e-4


@pytest.mark.parametrize("broken", [compiler.LIBRARY, compiler.INFO])
def test_a_corrupt_compile_entry_is_rebuilt(workdir, broken):
    space, cache = small_space(workdir), StageCache(workdir / "cache")
    config = space.defaults()
    first = pipeline.run(config, cache)
    entry = first.built.library.parent
    data_ = (entry / broken).read_bytes()
    # truncated, as by a copy that broke off (a new file: the trial has the old one mapped,
    # and the cache itself never rewrites a file in place)
    (entry / broken).unlink()
    (entry / broken).write_bytes(data_[: len(data_) // 3])
    rebuilt = pipeline.run(config, cache)
    assert rebuilt.cache["compile"] == "miss" and rebuilt.metrics["compile_s"] > 0
    assert same(latency_free(rebuilt), latency_free(first))
    assert pipeline.run(config, cache).cache["compile"] == "hit"  # the new entry is whole
    assert not list(entry.parent.glob("*.tmp"))  # nothing half-written left behind


def test_the_cache_key_sees_the_weights_not_the_object():
    model = small_cnn(10).eval()
    twin = copy.deepcopy(model)
    assert fingerprint(model, "fp32") == fingerprint(twin, "fp32")
    assert fingerprint(model, "fp32") != fingerprint(model, "fp16")
    with torch.no_grad():
        twin[0].weight[0, 0, 0, 0] += 1e-6
    assert fingerprint(model, "fp32") != fingerprint(twin, "fp32")


def test_trial_run_keeps_weights_and_library_that_load_back(workdir, capsys):
    """The run's two MLflow Models: the compiled library (a pyfunc) and the PyTorch model
    (torch.export), each holding its weights once; both give the trained model's outputs,
    which a fresh, untrained model does not."""
    path = write_space(workdir, SMALL_SPACE.format(artifacts=""), "small.yaml")
    code = main(["trial", "--space", str(path), "--cache-dir", str(workdir / "cache"),
                 "--json"])
    outcome = json.loads(capsys.readouterr().out)
    assert code == 0 and outcome["status"] == "FINISHED", outcome
    uri = f"sqlite:///{workdir}/tracking/mlflow.db"
    client = MlflowClient(uri)
    run = client.get_run(outcome["run_id"])
    assert run.data.tags["cache.compile"] == "miss"
    assert {a.path for a in client.list_artifacts(outcome["run_id"])} <= {"tuning"}
    folder = workdir / "dl"
    folder.mkdir()
    library = mlmodel.library_of(client, run, folder)
    with mlmodel.using(uri):
        pytorch = mlflow.pytorch.load_model(
            mlmodel.model_uri(run.data.tags[mlmodel.PYTORCH_MODEL_ID]))
        logged = mlflow.get_logged_model(run.data.tags[mlmodel.PYTORCH_MODEL_ID])
    assert logged.name == "pytorch" and logged.source_run_id == outcome["run_id"]

    config = load_space(path).defaults()
    example = data.load(config.data, config.seed).example()
    model = models.create(config.model, 10).eval()   # a fresh, untrained model
    vm = tvm.relax.VMExecutable(tvm.runtime.load_module(str(library)))
    library_out = hardware.run_tvm(vm, example)
    with torch.no_grad():
        assert compiler.max_relative_error(model(example).numpy(), library_out) > 1e-2
        assert compiler.max_relative_error(library_out, pytorch(example).numpy()) < 1e-4


@pytest.mark.parametrize("artifacts,kept", [
    ("artifacts: {weights: false, library: false}", {}),
    ("artifacts: {library: false}", {"pytorch": {"MLmodel"}}),
    ("artifacts: {weights: false}", {"model": {"model.so"}}),
    ("artifacts: {model: false}", {"model": {"weights.pt", "model.so"}})])
def test_model_artifacts_can_be_switched_off(workdir, artifacts, kept):
    space = small_space(workdir, artifacts)
    result = pipeline.run(space.defaults(), StageCache(workdir / "cache"))
    try:
        folders = {name: {p.name for p in folder.iterdir()}
                   for name, folder in result.artifacts.items() if name != "tuning"}
        assert set(folders) == set(kept)
        for name, files in kept.items():
            assert files <= folders[name]
        assert ("input_shape" in result.deploy) == ("model: false" not in artifacts and
                                                    "library: false" not in artifacts)
    finally:
        result.discard_artifacts()


@pytest.mark.parametrize("text,message", [
    ("artifacts: {weights: maybe}", "artifacts.weights: 'maybe' must be true or false"),
    ("artifacts: {onnx: true}",
     "artifacts: 'onnx' is not allowed; allowed: weights, library, model"),
    ("artifacts: [weights]", "artifacts: a mapping of weights / library / model -> true or")])
def test_bad_artifacts_option_is_refused(workdir, text, message, capsys):
    path = write_space(workdir, SMALL_SPACE.format(artifacts=text), "small.yaml")
    with pytest.raises(BadInput, match=message.replace("[", r"\[")):
        load_space(path)
    assert main(["space", "show", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_a_second_compile_of_the_same_model_reuses_its_import(monkeypatch):
    """Compiling one model again (other algorithm, other target) skips torch.export and the
    Relax import; the result is the same as a compile from scratch; another model is imported."""
    from dlas_search import algorithms
    torch.manual_seed(0)
    model, example = small_cnn(10).eval(), torch.randn(1, 3, 16, 16)
    imports = []
    real_import = compiler.import_module
    monkeypatch.setattr(compiler, "import_module",
                        lambda *a, **k: imports.append(1) or real_import(*a, **k))
    monkeypatch.setattr(compiler, "_IMPORTS", type(compiler._IMPORTS)())
    key = fingerprint(model, "fp32")
    target = tvm.target.Target({"kind": "llvm", "num-cores": 1})
    nhwc = algorithms.plan(algorithms.AlgoConfig(conv="direct_nhwc"))
    direct = algorithms.plan(algorithms.AlgoConfig(conv="direct"))
    compiler.compile(model, example, direct, compiler.CompilerConfig(), target, model_key=key)
    reused = compiler.compile(model, example, nhwc, compiler.CompilerConfig(), target,
                              model_key=key)
    assert len(imports) == 1
    fresh = compiler.compile(model, example, nhwc, compiler.CompilerConfig(), target)
    assert len(imports) == 2  # no key: imported again
    np.testing.assert_array_equal(hardware.run_tvm(reused.executable, example),
                                  hardware.run_tvm(fresh.executable, example))
    assert reused.metrics["batchnorm_folded"] == fresh.metrics["batchnorm_folded"] == 1
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[0].weight.add_(1.0)
    compiler.compile(other, example, nhwc, compiler.CompilerConfig(), target,
                     model_key=fingerprint(other, "fp32"))
    assert len(imports) == 3
