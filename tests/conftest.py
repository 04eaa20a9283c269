"""Shared fixtures: a tiny space (digits at 16x16, one training epoch, short timing) and a
working directory per test, so the embedded stores under tracking/ land in tmp."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

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
