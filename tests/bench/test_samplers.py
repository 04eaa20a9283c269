"""bench/samplers.py's replay on a synthetic grid (no trial runs): the grid sampler finds the
whole front, fractions never fall with budget, pruned samples are not counted, and a saved grid
is reused instead of run again."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from conftest import ROOT, write_space
from dlas_search.space import infeasible, load_space

spec = importlib.util.spec_from_file_location("bench_samplers", ROOT / "bench" / "samplers.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

SPACE = """\
study: synthetic
seed: 0
objectives: {accuracy: maximize, latency_ms: minimize, size_mb: minimize}
sampler: {name: grid}
space:
  data: {name: digits, image_size: 16}
  model: {arch: [resnet18, mobilenet_v2]}
  compress:
    method: [none, unstructured, int8]
    amount: [0.5, 0.9]
  algo:
    conv: [direct, direct_nhwc]
    format: [dense, sparse]
"""


def synthetic_grid(space, failed: int = 0, seed: int = 0) -> dict:
    """Every feasible configuration of the space with random objective values."""
    configs = {bench.config_key(c): c for c in space.variants(*space.params)
               if infeasible(c) is None}
    rng = np.random.default_rng(seed)
    rows = []
    for i, key in enumerate(sorted(configs)):
        if i < failed:
            rows.append({"config": key, "state": "FAIL", "error": "boom"})
        else:
            acc, lat, size = rng.uniform(0.5, 1.0), rng.uniform(1, 50), rng.uniform(1, 40)
            rows.append({"config": key, "state": "COMPLETE",
                         "values": {"accuracy": acc, "latency_ms": lat, "size_mb": size}})
    return {"space_text": space.text, "rows": rows, "wall_s": 0.0}


@pytest.fixture
def space(workdir):
    return load_space(write_space(workdir, SPACE, "synthetic.yaml"))


def test_synthetic_grid_is_the_whole_space(space):
    assert space.size() == 24
    assert len(synthetic_grid(space)["rows"]) == 24


def test_grid_sampler_reaches_the_full_hypervolume(space):
    result = bench.evaluate(space, synthetic_grid(space), ["grid"], seeds=3, populations=(4,))
    assert result["counts"][1.0] == 24
    full = result["table"]["grid"][1.0]
    assert full == pytest.approx([1.0, 1.0, 1.0])
    assert all(f < 1.0 for f in result["table"]["grid"][0.1])  # 2 of 24 points: not the front


def test_fractions_never_fall_with_budget_and_stay_within_one(space):
    result = bench.evaluate(space, synthetic_grid(space, failed=2), list(bench.SAMPLERS),
                            seeds=3, populations=(4,))
    for name, row in result["table"].items():
        per_seed = np.array([row[b] for b in bench.BUDGETS]).T
        assert (np.diff(per_seed, axis=1) >= -1e-12).all(), name
        assert ((per_seed >= 0) & (per_seed <= 1 + 1e-12)).all(), name


def test_pruned_samples_are_not_counted(space):
    grid = synthetic_grid(space, failed=1)
    cached = {r["config"]: ([r["values"][m] for m in space.objectives]
                            if r["state"] == "COMPLETE" else None) for r in grid["rows"]}
    for name in ("random", "tpe", "nsga2", "qmc"):
        found = bench.replay(space, cached, name, seed=1, trials=20, population=4)
        assert len(found) == 20, name  # 20 counted trials, however many samples were pruned
        done = [tuple(v) for v in found if v is not None]
        assert len(done) == len(set(done)), name  # no configuration counted twice
    everything = bench.replay(space, cached, "grid", seed=0, trials=100, population=4)
    assert len(everything) == 24 and sum(v is None for v in everything) == 1


def test_a_saved_grid_is_reused_not_run_again(space, workdir, monkeypatch):
    saved = workdir / "grid.json"
    saved.write_text(json.dumps(synthetic_grid(space)))
    monkeypatch.setattr(bench, "GRID", saved)
    monkeypatch.setattr(bench, "run_grid", lambda s: pytest.fail("the grid ran again"))
    assert len(bench.load_grid(space)["rows"]) == 24
    other = load_space(write_space(workdir, SPACE.replace("seed: 0", "seed: 1"), "other.yaml"))
    with pytest.raises(SystemExit, match="another version"):
        bench.load_grid(other)
