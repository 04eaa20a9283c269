"""How the layers of the stack interact: for each objective, how much of its variation over a
study's grid is explained by two layers together beyond what each explains alone.

The DLAS paper's central claim is that the layers do not act independently: a compression
technique's speedup depends on the primitive, a primitive's rank on tuning, and so on. A
single-layer tool cannot measure that; a grid over all the layers can. For each objective
(latency and size on a log scale, so effects are ratios; accuracy as it is) and each pair of
layers (model, compression, algorithm, tuning, hardware), two linear models are fitted with
statsmodels:

    main:  y ~ C(model) + C(compression) + C(algorithm) + C(tuning) + C(hardware)
    full:  main + C(a):C(b)

and compared by an F-test (`anova_lm(main, full)`). The interaction's strength is its partial
eta squared, SS(a:b) / (SS(a:b) + SS(residual of full)): the share of what the main effects
leave unexplained that the pair explains together. A pair the grid cannot separate (the
conditions never vary one layer within the other, or one layer is constant) is "not
estimable" (df 0). Each layer's own effect (partial eta squared of dropping it from the main
model) is reported on the diagonal of the heat map.

    table = interactions(frame, ["accuracy", "latency_ms", "size_mb"])
    heatmap(table, "interactions.png")
"""
from __future__ import annotations

import itertools
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["LAYERS", "LOG_SCALE", "interactions", "heatmap"]

# layer -> the report frame's column holding its choice
LAYERS = {"model": "arch", "compression": "compression", "algorithm": "primitive",
          "tuning": "tuner", "hardware": "target"}
LOG_SCALE = ("latency_ms", "size_mb", "macs")  # positive and multiplicative: effects as ratios
COLUMNS = ["objective", "a", "b", "partial_eta2", "F", "df", "p", "n"]


def _fit(formula: str, data: pd.DataFrame):
    import statsmodels.formula.api as smf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a grid with conditions is rank-deficient: expected
        return smf.ols(formula, data=data).fit()


def _compare(small, big) -> tuple[float, float, float, float]:
    """(partial eta squared, F, df, p) of what `big` adds to `small`."""
    from statsmodels.stats.anova import anova_lm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rank-deficient grids and exact fits warn
        table = anova_lm(small, big)
    df, gain = float(table["df_diff"].iloc[1]), float(table["ss_diff"].iloc[1])
    if df < 1 or not math.isfinite(gain):
        return math.nan, math.nan, 0.0, math.nan
    # sums of squares below this are rounding: an objective the upper layers fix exactly
    # (accuracy, size: model x compression) fits with no residual at all
    tiny = 1e-9 * max(float(big.centered_tss), 1e-300)
    gain, resid = (0.0 if gain < tiny else gain), (0.0 if big.ssr < tiny else float(big.ssr))
    if gain == 0.0:
        return 0.0, 0.0, df, 1.0
    if resid == 0.0:  # explained exactly: no test needed, none possible
        return 1.0, math.inf, df, 0.0
    return gain / (gain + resid), float(table["F"].iloc[1]), df, float(table["Pr(>F)"].iloc[1])


def interactions(frame: pd.DataFrame, objectives) -> pd.DataFrame:
    """One row per objective and layer pair (a, b), and per layer alone (a == b): partial eta
    squared, F, df and p; nan with df 0 where the grid cannot estimate it."""
    rows = []
    for objective in objectives:
        if objective not in frame:
            continue
        data = frame[[*LAYERS.values(), objective]].dropna()
        y = data[objective].astype(float)
        if objective in LOG_SCALE:
            data = data[y > 0]
            y = np.log(data[objective].astype(float))
        data = pd.DataFrame({layer: data[column].astype(str)
                             for layer, column in LAYERS.items()}).assign(y=y.to_numpy())
        varied = [layer for layer in LAYERS if data[layer].nunique() > 1]
        if len(data) < 3 or not varied or data["y"].nunique() < 2:
            continue
        main_terms = [f"C({layer})" for layer in varied]
        main = _fit("y ~ " + " + ".join(main_terms), data)
        for layer in LAYERS:
            if layer not in varied:
                rows.append(dict(objective=objective, a=layer, b=layer, partial_eta2=math.nan,
                                 F=math.nan, df=0.0, p=math.nan, n=len(data)))
                continue
            others = [t for t in main_terms if t != f"C({layer})"]
            without = _fit("y ~ " + (" + ".join(others) if others else "1"), data)
            rows.append(dict(objective=objective, a=layer, b=layer, n=len(data),
                             **dict(zip(("partial_eta2", "F", "df", "p"),
                                        _compare(without, main)))))
        for a, b in itertools.combinations(LAYERS, 2):
            if a in varied and b in varied:
                full = _fit("y ~ " + " + ".join(main_terms) + f" + C({a}):C({b})", data)
                found = _compare(main, full)
            else:
                found = (math.nan, math.nan, 0.0, math.nan)
            rows.append(dict(objective=objective, a=a, b=b, n=len(data),
                             **dict(zip(("partial_eta2", "F", "df", "p"), found))))
    return pd.DataFrame(rows, columns=COLUMNS)


def heatmap(table: pd.DataFrame, path: str | Path) -> bool:
    """One panel per objective: partial eta squared of each layer pair (each layer alone on
    the diagonal), blank where not estimable; False (nothing written) for an empty table."""
    if table.empty:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, objectives = list(LAYERS), list(dict.fromkeys(table["objective"]))
    fig, axes = plt.subplots(1, len(objectives), figsize=(3.6 * len(objectives) + 1.6, 4.8),
                             squeeze=False, constrained_layout=True)
    for k, (ax, objective) in enumerate(zip(axes[0], objectives)):
        grid = np.full((len(layers), len(layers)), np.nan)
        for r in table[table["objective"] == objective].itertuples():
            i, j = layers.index(r.a), layers.index(r.b)
            grid[j, i] = grid[i, j] = r.partial_eta2
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
        for i, j in itertools.product(range(len(layers)), repeat=2):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if grid[i, j] < 0.6 else "black")
        ax.set_xticks(range(len(layers)), layers, rotation=40, ha="right")
        ax.set_yticks(range(len(layers)), layers if k == 0 else [""] * len(layers))
        scale = "log " if objective in LOG_SCALE else ""
        ax.set_title(f"{scale}{objective}", fontsize=10)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8,
                 label="partial eta squared (diagonal: the layer alone)")
    fig.suptitle("interactions between layers (two-way ANOVA over the grid)", fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
