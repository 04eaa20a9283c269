"""Shared fixtures: a tiny space (digits at 16x16, one training epoch, short timing) and a
working directory per test, so the embedded stores under tracking/ land in tmp."""
from __future__ import annotations

import inspect
import re
import textwrap
from pathlib import Path

import pytest
import torch

from dlas_search import algorithms, compiler, hardware

ROOT = Path(__file__).resolve().parents[1]

# Tests that try a fault or a bad input, listed in docs/reliability.md by
# tools/reliability_table.py: every test with `@pytest.mark.reliability(tried, sees, kept=...)`,
# and every test of these files (tried: the test's name and parameters; sees: its docstring's
# first sentence, or first paragraph when that has no full stop; kept: the rest of it).
RELIABILITY_FILES = ("test_faults.py", "test_bad_input.py")


def pytest_configure(config):
    config.addinivalue_line("markers", "reliability(tried, sees, kept=...): a fault or bad "
                            "input and what the user sees; listed in docs/reliability.md")


def _reliability_row(item) -> dict | None:
    """What the table says about this test, or None when it is not a reliability test."""
    mark = item.get_closest_marker("reliability")
    if mark is None and Path(str(item.fspath)).name not in RELIABILITY_FILES:
        return None
    doc = inspect.cleandoc(getattr(item.function, "__doc__", None) or "")
    paragraphs = [" ".join(p.split()) for p in doc.split("\n\n") if p.strip()] or [""]
    sentence = re.match(r"(.+?[.!?])(\s|$)", paragraphs[0])
    first = sentence.group(1) if sentence else paragraphs[0]
    rest = " ".join([paragraphs[0][len(first):].strip(), *paragraphs[1:]]).strip()
    if mark is None:
        tried = item.originalname.removeprefix("test_").replace("_", " ")
        sees, kept = first, rest
    else:
        tried, sees = (list(mark.args) + ["", ""])[:2]
        kept = mark.kwargs.get("kept", "")
    callspec = getattr(item, "callspec", None)
    tried += f" [{callspec.id}]" if callspec else ""
    return {"tried": tried, "sees": sees or first, "kept": kept}


def pytest_collection_modifyitems(items):
    """Mark and describe the reliability tests, so `-m reliability` selects them all and a
    JUnit XML report (--junitxml) carries the description as properties."""
    for item in items:
        row = _reliability_row(item)
        if row is not None:
            if item.get_closest_marker("reliability") is None:
                item.add_marker(pytest.mark.reliability())
            item.user_properties += [(f"reliability.{k}", v) for k, v in row.items()]

ParameterSet = type(pytest.param())  # what pytest.param returns


def slow_except(values, *fast):
    """Parameters for @pytest.mark.parametrize: those in `fast` as they are, the others marked
    slow (left out by `-m "not slow"`), with the ids they had. A tuple is one parameter set
    (several argnames: wrap a tuple meant as one argument in pytest.param); a pytest.param is
    matched by its id. With several parametrize
    decorators, a test is slow when any of its parameters is."""
    def is_fast(value):
        return (value.id if isinstance(value, ParameterSet) else value) in fast

    def param(value):
        if isinstance(value, ParameterSet):
            return pytest.param(*value.values, marks=[*value.marks, pytest.mark.slow],
                                id=value.id)
        return pytest.param(*value if isinstance(value, tuple) else (value,),
                            marks=pytest.mark.slow)
    return [v if is_fast(v) else param(v) for v in values]


TINY_SPACE = """\
study: tiny
seed: 0
objectives: {accuracy: maximize, latency_ms: minimize, size_mb: minimize}
sampler: {name: nsga2, population_size: 2}
budget: {trials: 2}
space:
  data: {name: digits, image_size: 16, val_fraction: 0.3}
  model: {arch: resnet18, epochs: 1}
  compress:
    method: [none, unstructured]
    amount: [0.5, 0.8]
  finetune: {epochs: 0}
  algo: {conv: [direct, direct_nhwc]}
  hw: {threads: 1, warmup: 1, repeat: 3, min_repeat_ms: 1}
"""


def write_space(folder: Path, text: str = TINY_SPACE, name: str = "tiny.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One stage cache for the whole run: trained models are reused across tests."""
    return tmp_path_factory.mktemp("stage-cache")


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def tiny_space(workdir) -> Path:
    return write_space(workdir)


def randomise_batchnorm(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Non-trivial running statistics, so BatchNorm folding is really tested."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


def compiled_error(model: torch.nn.Module, example: torch.Tensor, conv: str = "direct",
                   precision: str = "fp32"):
    """Compile `model` for the local CPU with primitive `conv` in `precision`; return the build
    and the max relative error of its output against PyTorch's (shapes must agree)."""
    built = compiler.compile(model.eval(), example, algorithms.PRIMITIVES[conv],
                             compiler.CompilerConfig(), hardware.local_target(1), precision)
    ours = hardware.run_tvm(built.executable, example)
    with torch.no_grad():
        reference = model(example).numpy()
    assert ours.shape == reference.shape
    return built, compiler.max_relative_error(ours, reference)


COMPILED_SPACE = """\
study: compiled
seed: 0
objectives: {accuracy: maximize, latency_ms: minimize, size_mb: minimize}
sampler: {name: grid}
budget: {trials: 2}
space:
  data: {name: digits, image_size: 16, val_fraction: 0.3}
  model: {arch: resnet18, epochs: 2}
  compress: {method: [none, int8]}
  finetune: {epochs: 0}
  algo: {conv: direct_nhwc}
  hw: {threads: 1, warmup: 1, repeat: 3, min_repeat_ms: 1}
"""


@pytest.fixture(scope="session")
def compiled_study(tmp_path_factory, cache_dir) -> dict:
    """A finished two-trial study (resnet18 fp32 and int8, compiled for this CPU) in its own
    stores: the MLflow Models and exports of test_mlmodel.py and test_export.py read it
    (their modules share the xdist group `compiled_study`, so it is made once)."""
    from dlas_search.search import run_search
    from dlas_search.space import load_space
    folder = tmp_path_factory.mktemp("compiled-study")
    space = load_space(write_space(folder, COMPILED_SPACE, "compiled.yaml"))
    uri = f"sqlite:///{folder}/mlflow.db"
    outcome = run_search(space, trials=2, storage=f"sqlite:///{folder}/optuna.db",
                         tracking_uri=uri, out_dir=folder / "pareto", cache_dir=cache_dir)
    assert sum(t.state.name == "COMPLETE" for t in outcome.study.trials) == 2
    return {"folder": folder, "uri": uri, "space": space, "outcome": outcome}
