"""The observations the report tests on a study's runs, each with a verdict and how sure it is.

An observation is a claim, a statistic computed from the runs, and a rule on that statistic
(`statistic > threshold` or `< threshold`). Which claims are the DLAS paper's and which are
this project's hypotheses is part of each (`source`); docs/paper.md says where each comes from.

One run of a study gives one number per configuration, and latencies are medians of a few
timed repeats, so a statistic computed once can flip on a re-run. Each claim is about some
instance (a cell where tuning changes the winner, a technique whose speedup depends on the
target, a pair of metrics that is not correlated), so the statistic is computed per instance,
and each instance gets a bootstrap interval (`BOOTSTRAP` replicates, percentile) resampling:

- the timing, always: each latency redrawn from its own 95% interval (the timing protocol's
  `latency_ci_*`, or the confirmed one), log-normally;
- the configurations, where the statistic aggregates over them (`units`: a configuration for
  the correlations, a model for the speedups, a (model, target, tuning, primitive) pair for
  sparse vs dense), drawn with replacement, a unit drawn twice counted twice; a claim whose
  instance is one cell (tuning, quantisation) is decided by that cell's own timings.

The intervals are 95% over all of a claim's instances together (Bonferroni), so one cell
among forty flipping by noise does not make a claim. The verdict is `supported` when some
instance's whole interval is on the rule's side of the threshold, `not supported` when every
instance's interval is wholly on the other side, and otherwise `inconclusive here`, with the
numbers of the instance that decides it (the surest to hold, or the one reaching furthest
towards holding); `not testable here` when the runs give no instance.
A statistic that is a maximum over instances would be pushed up by noise; per-instance
intervals with the family-wise level are what keeps noise from reading as a change.

    verdicts = [judge(observation, frame) for observation in OBSERVATIONS]
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import pandas as pd

from . import report

__all__ = ["Observation", "Verdict", "OBSERVATIONS", "SUPPORTED", "NOT_SUPPORTED",
           "INCONCLUSIVE", "UNTESTABLE", "WEAK_RHO", "HW_SPREAD", "BOOTSTRAP", "judge",
           "resample"]

SUPPORTED, NOT_SUPPORTED = "supported", "not supported"
INCONCLUSIVE, UNTESTABLE = "inconclusive here", "not testable here"
BOOTSTRAP = 1000  # replicates per verdict
Z95 = 1.959963984540054
# the correlation claim's threshold: |rho| below it is "not correlated"
WEAK_RHO = 0.5
# speedups of one technique on two targets differing by this factor are "hardware dependent"
HW_SPREAD = 1.25


@dataclass(frozen=True)
class Observation:
    name: str
    claim: str
    source: str                     # "paper" or "hypothesis" (this project's)
    statistic: str                  # what the number is
    threshold: float
    above: bool                     # the claim holds when the statistic is above the threshold
    units: tuple[str, ...]          # columns of a resampled unit of configurations; (): none
    # the statistic per instance of the claim (cell, technique, pair), and a detail or, with
    # no instance, why the claim cannot be tested
    measure: Callable[[pd.DataFrame], tuple[pd.Series, str]]
    changes: str                    # what would change the verdict

    @property
    def rule(self) -> str:
        return f"{'>' if self.above else '<'} {self.threshold:g}"


@dataclass
class Verdict:
    name: str
    claim: str
    source: str
    statistic: str
    rule: str
    verdict: str
    value: float = math.nan
    low: float = math.nan
    high: float = math.nan
    instance: str = ""              # the instance shown: the one that decides the verdict
    instances: int = 0
    detail: str = ""
    changes: str = ""

    def line(self) -> str:
        shown = "not computed" if math.isnan(self.value) else \
            f"{self.value:.3g} (95% interval {self.low:.3g} to {self.high:.3g}) for " \
            f"{self.instance}, of {self.instances}"
        return (f"- **{self.verdict}**: {self.claim} *({'the paper' if self.source == 'paper' else 'this project’s hypothesis'})*"
                f"  \n  {self.statistic}: {shown}; rule: {self.rule}"
                + (f"; {self.detail}" if self.detail else "")
                + f"  \n  What would change it: {self.changes}")

    def short(self) -> str:
        """One line for the terminal: verdict, claim, and the numbers behind it."""
        numbers = "" if math.isnan(self.value) else \
            f" ({self.value:.3g}, 95% {self.low:.3g} to {self.high:.3g}; rule {self.rule})"
        return f"{self.verdict}: {self.claim}{numbers}"

    def row(self) -> dict:
        return asdict(self)


# --- the statistics: each a value per instance of the claim --------------------------------

def _correlation(frame: pd.DataFrame) -> tuple[pd.Series, str]:
    corr = report.correlations(frame)
    wanted = {("size_mb", "accuracy"), ("size_mb", "latency_ms"), ("accuracy", "latency_ms")}
    pairs = corr[[pair in wanted for pair in zip(corr["a"], corr["b"])]].dropna(subset=["rho"])
    if len(pairs) < 3:
        return pd.Series(dtype=float), "fewer than 3 configurations, or size, accuracy or " \
            "latency did not vary"
    shown = "; ".join(f"{r.a}~{r.b} rho {r.rho:+.2f}" for r in pairs.itertuples())
    return pd.Series(pairs["rho"].abs().to_numpy(), index=pairs["a"] + "~" + pairs["b"]), \
        f"{shown} (n {int(pairs['n'].min())})"


def _hardware(frame: pd.DataFrame) -> tuple[pd.Series, str]:
    speed = report.compression_speedups(frame)
    targets = speed["target"].nunique() if not speed.empty else 0
    if targets < 2:
        return pd.Series(dtype=float), f"compression speedups measured on {targets} " \
            "target(s); needs two"
    spread = speed.groupby(["compression", "tuner"])["speedup"].agg(
        lambda s: s.max() / s.min() if len(s) > 1 else math.nan).dropna()
    if spread.empty:
        return pd.Series(dtype=float), "no technique was measured on two targets"
    spread.index = [f"{c} ({t})" for c, t in spread.index]
    return spread, f"{len(spread)} techniques over {', '.join(sorted(speed['target'].unique()))}"


def _winner_loss(changes: pd.DataFrame, frame: pd.DataFrame, keys: list[str], what: str,
                 none: str) -> tuple[pd.Series, str]:
    changes = changes.dropna(subset=["loss"])
    if frame["primitive"].nunique() < 2:
        return pd.Series(dtype=float), "only one primitive ran"
    if changes.empty:
        return pd.Series(dtype=float), none
    n = int(changes["changed"].astype(bool).sum())  # report's rule: loss beyond MARGIN
    index = changes[keys].astype(str).agg(" / ".join, axis=1)
    return pd.Series(changes["loss"].to_numpy(), index=index), \
        f"the winner changed by more than {report.MARGIN:.0%} in {n} of {len(changes)} {what}"


def _tuning(frame: pd.DataFrame) -> tuple[pd.Series, str]:
    return _winner_loss(report.tuning_changes(frame), frame,
                        ["data", "arch", "target", "compression", "tuner"], "cells",
                        "no configuration ran both untuned and tuned")


def _quantisation(frame: pd.DataFrame) -> tuple[pd.Series, str]:
    return _winner_loss(report.quantisation_changes(frame), frame,
                        ["data", "arch", "target", "tuner", "precision"],
                        "(model, target, tuning, level) groups",
                        "no model ran both fp32 and a quantised level with the same settings")


def _sparse(frame: pd.DataFrame) -> tuple[pd.Series, str]:
    table = report.sparse_vs_dense(frame).sort_values("sparsity_level")
    if len(table) < 2:
        return pd.Series(dtype=float), f"sparse and dense compared at {len(table)} sparsity " \
            "level(s); needs two"
    low, high = table["median_ratio"].iloc[0], table["median_ratio"].iloc[-1]
    shown = ", ".join(f"{r.sparsity_level:g}: {r.median_ratio:.2f}x" for r in table.itertuples())
    return pd.Series([float(min(high, 1 / low))], index=["every pair"]), \
        f"median dense/sparse latency by sparsity {shown}"


OBSERVATIONS = (
    Observation(
        "correlation", "Model size, accuracy and inference time are not guaranteed to be "
        "correlated.", "paper", "|Spearman rho| over the configurations, per pair of size, "
        "accuracy and latency", WEAK_RHO, False, ("trial",), _correlation,
        "more configurations, or more models of different sizes and accuracies (with two "
        "models the pairs' rho mostly says which model ran); a second dataset"),
    Observation(
        "hardware", "Speedups from compression are very hardware dependent.", "paper",
        "per technique, largest / smallest of its speedup over the uncompressed model across "
        "targets (geometric mean over models)", HW_SPREAD, True, ("arch",), _hardware,
        "a second real hardware target: `local-2t` is the same CPU with two threads, not "
        "another device; add an RPC board or a GPU to targets.yaml (docs/hardware.md) and "
        "run the study on both"),
    Observation(
        "tuning", "Auto-tuning can change which algorithmic primitive is best for a "
        "configuration.", "paper", "per (model, target, compression, tuning) cell, the "
        "slowdown once tuned of the untuned winner against the tuned winner",
        report.MARGIN, True, (), _tuning,
        "more cells tuned, a larger tuning budget (compiler.trials), or tighter timings "
        "(hw.repeat) where the interval straddles the margin"),
    Observation(
        "quantisation", "The best primitive varies with the level of quantisation.",
        "hypothesis", "per (model, target, tuning, level) group, the slowdown at the "
        "quantised level of fp32's winner against that level's winner",
        report.MARGIN, True, (), _quantisation,
        "more models and targets per precision, or tighter timings"),
    Observation(
        "sparse", "Sparse primitives pay off only at high sparsity; below that, dense code is "
        "faster.", "hypothesis", "the smaller of dense/sparse latency at the highest sparsity "
        "and sparse/dense at the lowest (both > 1: dense wins low, sparse wins high)", 1.0,
        True, ("data", "arch", "target", "tuner", "conv"), _sparse,
        "more sparsity levels between the two, or a sparse kernel tuned like the dense ones"),
)


# --- how sure ---------------------------------------------------------------------------------

def _log_spread(frame: pd.DataFrame) -> np.ndarray:
    """Each latency's log-scale standard deviation, from its 95% interval (0 without one)."""
    low, high = frame["latency_ci_low_ms"].to_numpy(float), \
        frame["latency_ci_high_ms"].to_numpy(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        spread = np.log(high / low) / (2 * Z95)
    return np.where(np.isfinite(spread) & (spread > 0), spread, 0.0)


def resample(frame: pd.DataFrame, units: tuple[str, ...], rng: np.random.Generator,
             jitter: np.ndarray | None = None) -> pd.DataFrame:
    """One bootstrap replicate: units of configurations drawn with replacement (each drawn
    copy its own `data` label, so copies stay apart; `()`: every configuration once), and
    each latency redrawn from its interval (`jitter`: log-scale standard deviations)."""
    if units:
        groups = list(frame.groupby(list(units), sort=False, dropna=False).indices.values())
        picks = rng.integers(len(groups), size=len(groups))
        rows = np.concatenate([groups[i] for i in picks])
        copies = np.repeat(np.arange(len(picks)), [len(groups[i]) for i in picks])
        out = frame.iloc[rows].reset_index(drop=True)
        out["data"] = out["data"].astype(str) + "#" + copies.astype(str)
    else:
        rows, out = np.arange(len(frame)), frame.copy()
    if jitter is not None:
        out["latency_ms"] = out["latency_ms"].to_numpy(float) * np.exp(
            rng.normal(0.0, jitter[rows]))
    return out


def judge(observation: Observation, frame: pd.DataFrame, replicates: int = BOOTSTRAP,
          seed: int = 0) -> Verdict:
    """The observation's statistic per instance on `frame`, each instance's bootstrap
    interval (Bonferroni: at 95% over all instances together), and the verdict."""
    o = observation
    values, detail = o.measure(frame)
    verdict = Verdict(o.name, o.claim, o.source, o.statistic, o.rule, UNTESTABLE,
                      detail=detail, changes=o.changes, instances=len(values))
    values = values.dropna().groupby(level=0, sort=False).first()
    if values.empty:
        return verdict
    rng, jitter = np.random.default_rng(seed), _log_spread(frame)
    drawn = pd.DataFrame([o.measure(resample(frame, o.units, rng, jitter))[0]
                          .groupby(level=0).first().reindex(values.index)
                          for _ in range(replicates)], columns=values.index)
    alpha = 0.05 / len(values)
    lows = np.fmin(drawn.quantile(alpha / 2), values)
    highs = np.fmax(drawn.quantile(1 - alpha / 2), values)
    # shown: the instance that decides the verdict: the surest to hold when one holds, else
    # the one reaching furthest towards holding (it keeps an inconclusive verdict open)
    if o.above:
        holds, fails = bool((lows > o.threshold).any()), bool((highs <= o.threshold).all())
        shown = lows.idxmax() if holds else highs.idxmax()
    else:
        holds, fails = bool((highs < o.threshold).any()), bool((lows >= o.threshold).all())
        shown = highs.idxmin() if holds else lows.idxmin()
    verdict.value, verdict.low, verdict.high = (float(values[shown]), float(lows[shown]),
                                                float(highs[shown]))
    verdict.instance = str(shown)
    verdict.verdict = SUPPORTED if holds else NOT_SUPPORTED if fails else INCONCLUSIVE
    return verdict
