"""The observations the report tests on a study's runs: each a claim, the statistic computed
from the report's tables, the rule that decides it, and the verdict (`supported`, `not
supported`, or `not testable here` with why). docs/paper.md says which are the paper's.

    verdicts = [observe(tables, frame) for observe in OBSERVATIONS]
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

__all__ = ["Verdict", "OBSERVATIONS", "SUPPORTED", "NOT_SUPPORTED", "UNTESTABLE", "MARGIN",
           "WEAK_RHO", "HW_SPREAD"]

# a winner "changes" only when the earlier winner is this much slower in the new setting
# (timing noise on a shared CPU is a few percent)
MARGIN = 0.05
# one observation's correlation threshold: |rho| below it is "not correlated"
WEAK_RHO = 0.5
# speedups of one technique on two targets differing by this factor are "hardware dependent"
HW_SPREAD = 1.25


@dataclass
class Verdict:
    claim: str
    statistic: str
    verdict: str  # supported | not supported | not testable here
    why: str = ""

    def line(self) -> str:
        return f"- **{self.verdict}**: {self.claim} Statistic: {self.statistic}" + \
            (f" ({self.why})" if self.why else "")


SUPPORTED, NOT_SUPPORTED, UNTESTABLE = "supported", "not supported", "not testable here"


def obs_correlation(tables: dict, frame: pd.DataFrame) -> Verdict:
    claim = "Model size, accuracy and inference time are not guaranteed to be correlated."
    corr = tables["correlation"]
    wanted = {("size_mb", "accuracy"), ("size_mb", "latency_ms"), ("accuracy", "latency_ms")}
    pairs = corr[[pair in wanted for pair in zip(corr["a"], corr["b"])]].dropna(subset=["rho"])
    if len(pairs) < 3:
        return Verdict(claim, "Spearman rho of size-accuracy, size-latency, accuracy-latency",
                       UNTESTABLE, "fewer than 3 configurations, or size, accuracy or latency "
                       "did not vary")
    weakest = pairs.loc[pairs["rho"].abs().idxmin()]
    shown = "; ".join(f"{r.a}~{r.b} rho {r.rho:+.2f}" for r in pairs.itertuples())
    stat = f"{shown} (n {int(pairs['n'].min())}); weakest |rho| {abs(weakest.rho):.2f}, " \
           f"rule: some |rho| < {WEAK_RHO}"
    return Verdict(claim, stat, SUPPORTED if abs(weakest.rho) < WEAK_RHO else NOT_SUPPORTED)


def obs_hardware(tables: dict, frame: pd.DataFrame) -> Verdict:
    claim = "Speedups from compression are very hardware dependent."
    speed = tables["compression_speedup"]
    targets = speed["target"].nunique() if not speed.empty else 0
    if targets < 2:
        return Verdict(claim, "per technique, largest / smallest speedup across targets",
                       UNTESTABLE, f"compression speedups measured on {targets} target(s); "
                       "needs two")
    spread = speed.groupby(["compression", "tuner"])["speedup"].agg(
        lambda s: s.max() / s.min() if len(s) > 1 else math.nan).dropna()
    if spread.empty:
        return Verdict(claim, "per technique, largest / smallest speedup across targets",
                       UNTESTABLE, "no technique was measured on two targets")
    top = spread.idxmax()
    stat = f"largest spread {spread.max():.2f}x ({top[0]}, {top[1]}) over {targets} targets; " \
           f"rule: some technique's speedups differ by >= {HW_SPREAD}x across targets"
    return Verdict(claim, stat, SUPPORTED if spread.max() >= HW_SPREAD else NOT_SUPPORTED)


def _primitive_changes(claim: str, changes: pd.DataFrame, frame: pd.DataFrame, what: str,
                       no_pairs: str, counted: str) -> Verdict:
    """Supported when the best primitive changes (by more than MARGIN) in at least one of the
    compared `changes` groups; not testable without such groups or with one primitive."""
    changes = changes.dropna(subset=["changed"])
    if changes.empty or frame["primitive"].nunique() < 2:
        why = no_pairs if changes.empty else "only one primitive ran"
        return Verdict(claim, what, UNTESTABLE, why)
    n = int(changes["changed"].astype(bool).sum())
    stat = f"{counted.format(n=n, of=len(changes), margin=f'{MARGIN:.0%}')}; rule: at least one"
    return Verdict(claim, stat, SUPPORTED if n else NOT_SUPPORTED)


def obs_tuning(tables: dict, frame: pd.DataFrame) -> Verdict:
    return _primitive_changes(
        "Auto-tuning can change which algorithmic primitive is best for a configuration.",
        tables["tuning_changes"], frame, "cells whose best primitive changes with tuning",
        "no configuration ran both untuned and tuned",
        "best primitive changed in {n} of {of} cells (the untuned winner >{margin} slower "
        "once tuned)")


def obs_quantisation(tables: dict, frame: pd.DataFrame) -> Verdict:
    return _primitive_changes(
        "The best primitive varies with the level of quantisation.",
        tables["quantisation_changes"], frame,
        "groups whose best primitive differs from fp32's",
        "no model ran both fp32 and a quantised level with the same settings",
        "best primitive differs from fp32's in {n} of {of} (model, target, tuning, level) "
        "groups (by >{margin})")


def obs_sparse(tables: dict, frame: pd.DataFrame) -> Verdict:
    claim = "Sparse primitives pay off only at high sparsity; below that, dense code is faster."
    table = tables["sparse_vs_dense"].sort_values("sparsity_level")
    if len(table) < 2:
        return Verdict(claim, "median dense/sparse latency per sparsity level", UNTESTABLE,
                       f"sparse and dense compared at {len(table)} sparsity level(s); needs two")
    shown = ", ".join(f"{r.sparsity_level:g}: {r.median_ratio:.2f}x" for r in table.itertuples())
    pays = list(table["sparse_pays"])
    # supported: dense wins at the lowest level, sparse at the highest, and once sparse pays
    # it keeps paying at every higher level
    crossover = next(i for i, p in enumerate(pays) if p) if any(pays) else None
    holds = crossover is not None and crossover > 0 and all(pays[crossover:])
    stat = f"median dense/sparse latency by sparsity {shown}" + \
           (f"; sparse pays from {table['sparsity_level'].iloc[crossover]:g}" if holds else "") + \
           "; rule: < 1 at the lowest level, > 1 from some level up to the highest"
    return Verdict(claim, stat, SUPPORTED if holds else NOT_SUPPORTED)


OBSERVATIONS = (obs_correlation, obs_hardware, obs_tuning, obs_quantisation, obs_sparse)
