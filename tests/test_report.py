"""The DLAS perturbation study: `dlas perturb` runs a (tiny) grid and writes the report from
MLflow; the report's verdicts are computed from the data (change the data, the verdict flips)."""
from __future__ import annotations

import csv
import itertools

import pytest

from conftest import ROOT, write_space
from dlas_search import cli, interactions, mlproject, observations, pareto, report
from dlas_search.space import load_space

# the study's axes cut to the bone, resnet18 at 16x16: unpruned (direct), or pruned to 0.8 with
# direct dense, direct sparse or im2col+GEMM dense: a grid of 4 trials
TINY_GRID = """\
study: tinygrid
seed: 0
objectives: {accuracy: maximize, latency_ms: minimize, size_mb: minimize}
sampler: {name: nsga2}
budget: {trials: 100}
space:
  data: {name: digits, image_size: 16, val_fraction: 0.3}
  model: {arch: resnet18, epochs: 1}
  compress:
    method: [none, unstructured]
    amount: [0.8]
  finetune: {epochs: 0}
  algo:
    conv: {choices: [direct, im2col_gemm], when: {compress.method: unstructured}}
    format: {choices: [dense, sparse], when: {algo.conv: direct}}
  hw: {threads: 1, warmup: 1, repeat: 3, min_repeat_ms: 1}
"""


@pytest.mark.slow  # `dlas perturb` runs a grid study of 4 trials
def test_perturb_runs_the_grid_and_writes_the_report(workdir, cache_dir, capsys):
    space = write_space(workdir, TINY_GRID)
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    code = cli.main(["perturb", "--space", str(space), "--tracking-uri", uri,
                     "--storage", f"sqlite:///{workdir / 'optuna.db'}",
                     "--cache-dir", str(cache_dir), "--out", str(workdir / "rep")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "4 complete, 0 failed of a grid of 4" in printed  # nsga2 in the file: grid anyway

    out = workdir / "rep"
    text = (out / "report.md").read_text()
    for name in ("configurations", "compression_speedup", "sparse_vs_dense"):
        assert (out / f"{name}.html").stat().st_size > 1000
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"

    def rows(name):
        with open(out / f"{name}.csv") as f:
            return list(csv.DictReader(f))
    # 4 metrics -> 6 pairs; one compression level on one target, untuned
    assert [(r["a"], r["b"]) for r in rows("correlation")] == list(
        itertools.combinations(report.CORRELATED, 2))
    speed = rows("compression_speedup")
    assert [(r["compression"], r["target"], r["tuner"]) for r in speed] == [
        ("unstructured 0.8", "local", "none")]
    assert float(speed[0]["speedup"]) > 0
    # one cell per (compression, tuning): the only primitive (unpruned) or the best of 3
    best = {r["compression"]: r["best"] for r in rows("best_primitive")}
    assert best.keys() == {"none", "unstructured 0.8"} and best["none"] == "direct"
    assert best["unstructured 0.8"] in {"direct", "im2col_gemm", "direct sparse"}
    sparse = rows("sparse_vs_dense")
    assert [(r["sparsity_level"], r["pairs"]) for r in sparse] == [("0.8", "1")]
    assert [r["precision"] for r in rows("quantisation_primitive")] == ["fp32"]
    assert {r["layer"] for r in rows("importance")} >= {"algo", "compress"}

    # a verdict line per observation, each with its statistic; on this data: one target, no
    # tuning, no quantisation, one sparsity level -> those four cannot be tested
    verdicts = rows("verdicts")
    assert len(verdicts) == len(observations.OBSERVATIONS)
    by_name = {v["name"]: v for v in verdicts}
    for name in ("hardware", "tuning", "quantisation", "sparse"):
        assert by_name[name]["verdict"] == observations.UNTESTABLE, by_name[name]
    assert by_name["correlation"]["verdict"] != observations.UNTESTABLE
    assert "rho" in by_name["correlation"]["detail"]
    low, value, high = (float(by_name["correlation"][k]) for k in ("low", "value", "high"))
    assert low <= value <= high
    assert [v["source"] for v in verdicts] == ["paper"] * 3 + ["hypothesis"] * 2
    assert text.index("## The paper's observations") < text.index("## This project's hypotheses")
    # 4 trials: unpruned direct, pruned direct dense / sparse / im2col; latency only varies
    pairs = {(r["objective"], r["a"], r["b"]): r for r in rows("interactions")}
    assert pairs[("latency_ms", "compression", "compression")]["df"] == "1.0"
    assert pairs[("latency_ms", "compression", "hardware")]["df"] == "0.0"  # one target
    assert (out / "interactions.png").read_bytes()[:4] == b"\x89PNG"
    for v in verdicts:
        assert f"**{v['verdict']}**: {v['claim']}" in text

    # logged to the study's parent run; `dlas report` rebuilds the same from MLflow alone
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    parent = report.study_run_id(uri, "tinygrid")
    logged = {a.path for a in client.list_artifacts(parent, "report")}
    assert {"report/report.md", "report/verdicts.csv", "report/sparse_vs_dense.png"} <= logged
    assert cli.main(["report", "--experiment", "tinygrid", "--tracking-uri", uri,
                     "--out", str(workdir / "again")]) == 0
    assert (workdir / "again" / "verdicts.csv").read_text() == (out / "verdicts.csv").read_text()

    # resumable: the grid is done, a second run adds no trial
    assert cli.main(["perturb", "--space", str(space), "--tracking-uri", uri,
                     "--storage", f"sqlite:///{workdir / 'optuna.db'}",
                     "--cache-dir", str(cache_dir), "--out", str(out)]) == 0
    assert "4 complete, 0 failed" in capsys.readouterr().out


# --- verdicts computed from a synthetic study -------------------------------------------------

def synthetic(latency, accuracy=lambda c: 0.9, size=lambda c: 10.0, targets=("a", "b"),
              ci=0.0):
    """A finished study over 2 models, 2 targets, untuned/tuned, 5 compression levels and
    2 primitives (dense, and sparse when pruned); `latency(config)` etc. give the metrics,
    each latency with a 95% interval of +-`ci` (a fraction) when given."""
    rows = []
    levels = [("none", None), ("unstructured", 0.5), ("unstructured", 0.9), ("int8", None),
              ("fp16", None)]
    for n, (arch, target, tuner, (method, amount), conv, fmt) in enumerate(itertools.product(
            ("m1", "m2"), targets, ("none", "metaschedule"), levels,
            ("direct", "spatial_pack"), ("dense", "sparse"))):
        if fmt == "sparse" and method != "unstructured":
            continue
        c = {"arch": arch, "target": target, "tuner": tuner, "method": method,
             "amount": amount, "conv": conv, "format": fmt}
        params = {"data.name": "digits", "model.arch": arch, "hw.target": target,
                  "compiler.tuner": tuner, "compiler.trials": "8" if tuner != "none" else "-",
                  "compress.method": method, "compress.amount": str(amount or "-"),
                  "compress.ratio": "-", "algo.conv": conv, "algo.format": fmt}
        metrics = {"latency_ms": latency(c), "accuracy": accuracy(c), "size_mb": size(c),
                   "macs": 1e6}
        if ci:
            metrics["latency_ci_low_ms"] = metrics["latency_ms"] * (1 - ci)
            metrics["latency_ci_high_ms"] = metrics["latency_ms"] * (1 + ci)
        rows.append({"trial": n, "run_id": str(n), "name": str(n), "params": params,
                     "metrics": metrics})
    return pareto.Trials("synthetic", {"accuracy": "maximize", "latency_ms": "minimize",
                                       "size_mb": "minimize"}, rows)


def base_latency(c):
    """direct is faster than spatial_pack everywhere; compression speeds up by the same
    factor on every target; sparse pays only at 0.9 sparsity."""
    t = 10.0 + (1.0 if c["conv"] == "spatial_pack" else 0.0) + (0.5 if c["arch"] == "m2" else 0)
    t *= {"none": 1.0, "unstructured": 0.95, "int8": 0.5, "fp16": 0.9}[c["method"]]
    if c["format"] == "sparse":
        t *= 0.5 if c["amount"] == 0.9 else 2.0
    return t


def verdicts(trials, *names, replicates=50):
    """The verdicts of the observations `names` (all when none are named)."""
    frame = report.runs_frame(trials)
    return {o.name: observations.judge(o, frame, replicates)
            for o in observations.OBSERVATIONS if not names or o.name in names}


def test_verdicts_follow_the_data():
    v = verdicts(synthetic(base_latency))
    assert v["hardware"].verdict == observations.NOT_SUPPORTED       # same speedup everywhere
    assert v["tuning"].verdict == observations.NOT_SUPPORTED         # direct always wins
    assert v["quantisation"].verdict == observations.NOT_SUPPORTED
    assert v["sparse"].verdict == observations.SUPPORTED             # pays from 0.9 only
    assert "0.5: 0.50x, 0.9: 2.00x" in v["sparse"].detail

    # int8 is 4x faster on target b only: hardware dependent
    def hw(c):
        return base_latency(c) * (0.25 if c["target"] == "b" and c["method"] == "int8" else 1)
    assert verdicts(synthetic(hw), "hardware")["hardware"].verdict == observations.SUPPORTED
    # with one target there is nothing to compare
    single = verdicts(synthetic(base_latency, targets=("a",)), "hardware")["hardware"]
    assert single.verdict == observations.UNTESTABLE and "1 target" in single.detail

    # tuning makes spatial_pack 30% faster than direct
    def tuned(c):
        t = base_latency(c)
        return t * 0.6 if c["tuner"] != "none" and c["conv"] == "spatial_pack" else t
    assert verdicts(synthetic(tuned), "tuning")["tuning"].verdict == observations.SUPPORTED
    # a 2% flip is within the margin: not a change
    def noise(c):
        t = base_latency(c)
        return t * 0.89 if c["tuner"] != "none" and c["conv"] == "spatial_pack" else t
    assert verdicts(synthetic(noise), "tuning")["tuning"].verdict == observations.NOT_SUPPORTED

    # at int8 spatial_pack wins
    def quant(c):
        t = base_latency(c)
        return t * 0.5 if c["method"] == "int8" and c["conv"] == "spatial_pack" else t
    quantised = verdicts(synthetic(quant), "quantisation")["quantisation"]
    assert quantised.verdict == observations.SUPPORTED

    # sparse pays already at 0.5: "only at high sparsity" does not hold
    def sparse_everywhere(c):
        t = base_latency(c)
        return t / 4 if c["format"] == "sparse" and c["amount"] == 0.5 else t
    everywhere = verdicts(synthetic(sparse_everywhere), "sparse")["sparse"]
    assert everywhere.verdict == observations.NOT_SUPPORTED

    # size, accuracy and latency moving together: correlated, the claim is not supported
    def size_follows(c):
        return base_latency(c) * 3
    def acc_follows(c):
        return base_latency(c) / 100
    together = verdicts(synthetic(base_latency, accuracy=acc_follows, size=size_follows),
                        "correlation")
    assert together["correlation"].verdict == observations.NOT_SUPPORTED
    def acc_independent(c):  # accuracy depends on tuning only, latency does not
        return 0.9 if c["tuner"] == "none" else 0.8
    apart = verdicts(synthetic(base_latency, accuracy=acc_independent, size=size_follows),
                     "correlation")
    assert apart["correlation"].verdict == observations.SUPPORTED


def test_perturb_bad_input(workdir, capsys):
    assert cli.main(["perturb", "--reduced", "--space", "x.yaml"]) == 2
    assert "--reduced and --space" in capsys.readouterr().err
    assert cli.main(["report", "--experiment", "nope",
                     "--tracking-uri", f"sqlite:///{workdir / 'none.db'}"]) == 2
    assert not (workdir / "none.db").exists()


def test_paper_spaces_are_grids_of_the_papers_axes():
    full = load_space(ROOT / "spaces" / "dlas_paper.yaml")
    reduced = load_space(ROOT / "spaces" / "dlas_paper_reduced.yaml")
    assert full.sampler["name"] == reduced.sampler["name"] == "grid"
    assert len(full.params["model.arch"].values()) == 7
    assert set(full.params["compress.method"].values()) == {
        "none", "unstructured", "channel", "fp16", "int8"}
    assert set(full.params["algo.conv"].values()) == {"direct", "im2col_gemm", "spatial_pack"}
    assert set(full.params["compiler.tuner"].values()) == {"none", "metaschedule"}
    assert reduced.size() < full.size()
    assert mlproject.translate(["perturb", "--reduced", "true", "--out", ""]) == [
        "perturb", "--reduced"]


def test_timing_noise_makes_a_verdict_inconclusive():
    """Tuning makes spatial_pack 15% faster, so the untuned winner (direct) is 7% slower once
    tuned: supported when the timings are exact; with each latency known only to +-15%, the
    interval straddles the 5% margin and the verdict says so."""
    def tuned(c):
        t = base_latency(c)
        return t * 0.85 if c["tuner"] != "none" and c["conv"] == "spatial_pack" else t
    exact = verdicts(synthetic(tuned), "tuning")["tuning"]
    assert exact.verdict == observations.SUPPORTED
    assert exact.low == pytest.approx(exact.value) == pytest.approx(10.5 / (11.5 * 0.85) - 1)
    noisy = verdicts(synthetic(tuned, ci=0.15), "tuning")["tuning"]
    assert noisy.verdict == observations.INCONCLUSIVE
    assert noisy.low < report.MARGIN < noisy.high
    assert "inconclusive here" in noisy.line() and "95% interval" in noisy.line()


def test_resampling_keeps_copies_of_a_unit_apart():
    frame = report.runs_frame(synthetic(base_latency))
    rng = __import__("numpy").random.default_rng(1)
    replicate = observations.resample(frame, ("arch",), rng)
    assert len(replicate) == len(frame)  # two models: two units of equal size drawn
    assert replicate["data"].nunique() == 2  # each drawn copy its own label
    assert set(replicate["arch"]) <= {"m1", "m2"}


def test_interactions_find_the_pair_that_acts_together():
    """int8 is 4x faster with spatial_pack only: compression x algorithm interacts on
    latency; compression x hardware does not (same on both targets)."""
    def together(c):
        t = base_latency(c)
        return t * 0.25 if c["method"] == "int8" and c["conv"] == "spatial_pack" else t
    frame = report.runs_frame(synthetic(together))
    table = interactions.interactions(frame, ["latency_ms", "accuracy"])
    pairs = {(r.a, r.b): r for r in table[table["objective"] == "latency_ms"].itertuples()}
    assert pairs[("compression", "algorithm")].partial_eta2 > 0.8
    assert pairs[("compression", "algorithm")].p < 1e-6
    assert pairs[("compression", "hardware")].partial_eta2 < 0.05
    assert set(table["objective"]) == {"latency_ms"}  # accuracy is constant: nothing to explain


def test_interactions_name_a_pair_the_grid_cannot_separate():
    frame = report.runs_frame(synthetic(base_latency, targets=("a",)))
    table = interactions.interactions(frame, ["latency_ms"])
    row = table[(table["a"] == "compression") & (table["b"] == "hardware")].iloc[0]
    assert row["df"] == 0 and row["partial_eta2"] != row["partial_eta2"]  # nan
