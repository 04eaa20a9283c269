"""The DLAS perturbation study's report, computed from a study's MLflow runs alone: how size,
MACs, accuracy and latency correlate; what each compression technique buys per target and
tuning setting; which conv primitive wins where (and whether tuning or quantisation changes
that); where sparse kernels start to pay; which layers matter for each objective; and a verdict
on each observation (observations.py: the paper's three, then this project's hypotheses),
each with a bootstrap interval; and how strongly the layers interact (interactions.py).

    frame = runs_frame(pareto.load_trials(uri, "dlas_paper_reduced"))
    tables = compute(frame)                     # pandas DataFrames, one per question
    verdicts = [observations.judge(o, frame) for o in observations.OBSERVATIONS]
    write_report(uri, "dlas_paper_reduced", "report/")   # all of it: report.md, CSV, HTML, PNG
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from . import compression, confidence, pareto, tracking
from .errors import BadInput

__all__ = ["CORRELATED", "CELL", "MARGIN", "compression_label", "precision_of", "sparse_eligible",
           "runs_frame", "correlations", "best_latency", "compression_speedups",
           "best_primitives", "tuning_changes", "sparse_vs_dense",
           "quantisation_primitives", "quantisation_changes", "importance", "compute",
           "SECTIONS", "build", "study_run_id", "write_report"]


CORRELATED = ("size_mb", "macs", "accuracy", "latency_ms")
# a cell of the study: the settings a primitive is compared within
CELL = ["data", "arch", "target", "compression", "tuner"]
# a winner "changes" only when the earlier winner is this much slower in the new setting
# (timing noise on a shared CPU is a few percent)
MARGIN = 0.05


# --- the runs as one table --------------------------------------------------------------------

def _number(text: str | None) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def compression_label(method: str, amount: float, ratio: float) -> str:
    """'none', 'unstructured 0.9', 'channel 0.5', 'int8', 'unstructured 0.9+int8'."""
    settings = {"amount": None if math.isnan(amount) else amount,
                "ratio": None if math.isnan(ratio) else ratio}
    try:
        return compression.summary(compression.CompressConfig(method, **settings), sep=" ")
    except BadInput:  # a method this installation does not register (a user's module)
        return method


def precision_of(method: str) -> str:
    try:
        return compression.technique(method).precision
    except BadInput:
        return "fp32"


def sparse_eligible(method: str) -> bool:
    """Whether a method leaves what the sparse format stores (unstructured zeros, fp32)."""
    try:
        return compression.prunes_unstructured(method) and precision_of(method) == "fp32"
    except BadInput:
        return False


def runs_frame(trials: pareto.Trials) -> pd.DataFrame:
    """One row per finished trial: the study's axes (short names) and its metrics."""
    rows = []
    for r in trials.rows:
        p, m = r["params"], r["metrics"]
        method = p.get("compress.method", "none")
        amount, ratio = _number(p.get("compress.amount")), _number(p.get("compress.ratio"))
        tuner = p.get("compiler.tuner", "none")
        budget = p.get("compiler.trials", tracking.ABSENT)
        low, high = confidence.interval(m, "latency_ms") if "latency_ms" in m else (math.nan,) * 2
        rows.append({
            "trial": r["trial"], "data": p.get("data.name", "?"), "arch": p.get("model.arch", "?"),
            "target": p.get("hw.target", "local"), "method": method,
            "compression": compression_label(method, amount, ratio),
            "sparsity_level": amount, "precision": precision_of(method),
            "conv": p.get("algo.conv", "direct"), "format": p.get("algo.format", "dense"),
            "tuner": tuner if tuner == "none" or budget == tracking.ABSENT else f"{tuner} {budget}",
            **{k: m.get(k, math.nan) for k in ("accuracy", "latency_ms", "size_mb", "macs",
                                               "params", "sparsity", "speedup_vs_torch")},
            "latency_ci_low_ms": low, "latency_ci_high_ms": high})
    frame = pd.DataFrame(rows, columns=["trial", "data", "arch", "target", "method",
                                        "compression", "sparsity_level", "precision", "conv",
                                        "format", "tuner", "accuracy", "latency_ms", "size_mb",
                                        "macs", "params", "sparsity", "speedup_vs_torch",
                                        "latency_ci_low_ms", "latency_ci_high_ms"])
    frame["primitive"] = frame["conv"] + np.where(frame["format"] == "sparse", " sparse", "")
    return frame


# --- the tables -------------------------------------------------------------------------------

def correlations(frame: pd.DataFrame) -> pd.DataFrame:
    """Spearman's rho (and p) for each pair of size, MACs, accuracy and latency over all
    configurations."""
    out = []
    for i, a in enumerate(CORRELATED):
        for b in CORRELATED[i + 1:]:
            both = frame[[a, b]].dropna()
            varied = len(both) >= 3 and both[a].nunique() > 1 and both[b].nunique() > 1
            rho, p = stats.spearmanr(both[a], both[b]) if varied else (math.nan, math.nan)
            out.append({"a": a, "b": b, "rho": float(rho), "p": float(p), "n": len(both)})
    return pd.DataFrame(out, columns=["a", "b", "rho", "p", "n"])


def best_latency(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """The fastest run of each group (its primitive and latency)."""
    if frame.empty:
        return frame.assign(latency_ms=[])[keys + ["primitive", "latency_ms"]]
    idx = frame.groupby(keys, dropna=False)["latency_ms"].idxmin()
    return frame.loc[idx, keys + ["primitive", "latency_ms"]].reset_index(drop=True)


def compression_speedups(frame: pd.DataFrame) -> pd.DataFrame:
    """Speedup of each compression level over the uncompressed model, each at its best
    primitive, per model; then the geometric mean over models per (compression, target,
    tuner)."""
    model = ["data", "arch", "target", "tuner"]
    best = best_latency(frame, model + ["compression"])
    base = best[best["compression"] == "none"].set_index(model)["latency_ms"]
    rows = []
    for _, r in best[best["compression"] != "none"].iterrows():
        key = tuple(r[k] for k in model)
        if key in base.index:
            rows.append({**{k: r[k] for k in model}, "compression": r["compression"],
                         "speedup": base[key] / r["latency_ms"]})
    per_model = pd.DataFrame(rows, columns=model + ["compression", "speedup"])
    if per_model.empty:
        return pd.DataFrame(columns=["compression", "target", "tuner", "speedup", "models"])
    grouped = per_model.groupby(["compression", "target", "tuner"])["speedup"]
    return pd.DataFrame({"speedup": grouped.apply(lambda s: float(stats.gmean(s))),
                         "models": grouped.size()}).reset_index()


def best_primitives(frame: pd.DataFrame) -> pd.DataFrame:
    """The fastest primitive of each (data, model, target, compression, tuning) cell."""
    return best_latency(frame, CELL).rename(columns={"primitive": "best", "latency_ms":
                                                    "best_latency_ms"})


def _winner_losses(frame: pd.DataFrame, keys: list[str], setting: str,
                   base: str) -> pd.DataFrame:
    """Per group of `keys` and each value of `setting` other than `base`: the fastest
    primitive under `base` and under that value, and `loss`, how much slower base's winner is
    than the value's winner there (0: it still wins; nan: it did not run there). Beyond
    MARGIN the best primitive "changed"."""
    best = frame.groupby([*keys, setting, "primitive"], sort=True)["latency_ms"].min() \
        .reset_index()
    here, there = best[best[setting] == base], best[best[setting] != base]
    if here.empty or there.empty:
        return pd.DataFrame(columns=[*keys, setting, "best_base", "best_other", "loss"])
    win = here.loc[here.groupby(keys)["latency_ms"].idxmin(), [*keys, "primitive"]] \
        .rename(columns={"primitive": "best_base"})
    top = there.loc[there.groupby([*keys, setting])["latency_ms"].idxmin()] \
        .rename(columns={"primitive": "best_other", "latency_ms": "other_ms"})
    out = top.merge(win, on=keys).merge(
        there.rename(columns={"primitive": "best_base", "latency_ms": "winner_ms"}),
        on=[*keys, setting, "best_base"], how="left")
    out["loss"] = out["winner_ms"] / out["other_ms"] - 1
    return out[[*keys, setting, "best_base", "best_other", "loss"]]


def _changed(loss: pd.Series) -> pd.Series:
    return loss.map(lambda x: None if math.isnan(x) else bool(x > MARGIN)).astype(object)


def tuning_changes(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (data, model, target, compression) and tuned setting: the best primitive untuned
    and tuned, how much slower the untuned winner is once tuned (`loss`), and whether tuning
    changed the best primitive (loss beyond MARGIN)."""
    keys = ["data", "arch", "target", "compression"]
    out = _winner_losses(frame, keys, "tuner", "none").rename(
        columns={"best_base": "best_untuned", "best_other": "best_tuned"})
    out["changed"] = _changed(out["loss"])
    return out[keys + ["tuner", "best_untuned", "best_tuned", "loss", "changed"]] \
        .reset_index(drop=True)


def sparse_vs_dense(frame: pd.DataFrame) -> pd.DataFrame:
    """Per sparsity level: dense latency / sparse latency (>1: sparse is faster) for the same
    model, primitive, target and tuning; median, range and how many pairs."""
    pruned = frame[frame["method"].map(sparse_eligible)]
    keys = ["data", "arch", "target", "tuner", "sparsity_level", "conv"]
    dense = pruned[pruned["format"] == "dense"].groupby(keys)["latency_ms"].min()
    sparse = pruned[pruned["format"] == "sparse"].groupby(keys)["latency_ms"].min()
    ratio = (dense / sparse).dropna()
    if ratio.empty:
        return pd.DataFrame(columns=["sparsity_level", "median_ratio", "min_ratio", "max_ratio",
                                     "pairs", "sparse_pays"])
    grouped = ratio.groupby(level="sparsity_level")
    out = pd.DataFrame({"median_ratio": grouped.median(), "min_ratio": grouped.min(),
                        "max_ratio": grouped.max(), "pairs": grouped.size()}).reset_index()
    out["sparse_pays"] = out["median_ratio"] > 1
    return out


def _precision_levels() -> list[str]:
    """The methods that only change the arithmetic: none (fp32) and each quantisation."""
    return ["none", *compression.METHODS.of_kind("quantisation")]


def quantisation_primitives(frame: pd.DataFrame) -> pd.DataFrame:
    """Per precision (fp32, fp16, int8): how often each primitive is the fastest over the
    (data, model, target, tuning) groups, and the most frequent winner."""
    best = best_latency(frame[frame["method"].isin(_precision_levels())],
                        ["data", "arch", "target", "tuner", "precision"])
    rows = []
    for precision, group in best.groupby("precision"):
        counts = group["primitive"].value_counts()
        rows.append({"precision": precision, "best": counts.idxmax(), "groups": len(group),
                     "wins": ", ".join(f"{p} {n}" for p, n in counts.items())})
    return pd.DataFrame(rows, columns=["precision", "best", "groups", "wins"])


def quantisation_changes(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (data, model, target, tuning) and quantised level: the best primitive at fp32 and
    at that level, fp32's winner's `loss` there, and whether quantisation changed the best
    primitive (loss beyond MARGIN)."""
    keys = ["data", "arch", "target", "tuner"]
    levels = frame[frame["method"].isin(_precision_levels())]
    out = _winner_losses(levels, keys, "precision", "fp32").rename(
        columns={"best_base": "best_fp32", "best_other": "best_quantised"})
    out["changed"] = _changed(out["loss"])
    return out[keys + ["precision", "best_fp32", "best_quantised", "loss", "changed"]] \
        .reset_index(drop=True)


def importance(trials: pareto.Trials) -> pd.DataFrame:
    """fANOVA importance per layer and parameter, per objective (pareto.layer_importance)."""
    found = pareto.layer_importance(trials)
    return pd.DataFrame([{"layer": layer, "parameter": param, **scores}
                         for (layer, param), scores in found.items()],
                        columns=["layer", "parameter", *trials.objectives])


def compute(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    return {"correlation": correlations(frame), "compression_speedup": compression_speedups(frame),
            "best_primitive": best_primitives(frame), "tuning_changes": tuning_changes(frame),
            "sparse_vs_dense": sparse_vs_dense(frame),
            "quantisation_primitive": quantisation_primitives(frame),
            "quantisation_changes": quantisation_changes(frame)}


# --- writing it -------------------------------------------------------------------------------

def _markdown(table: pd.DataFrame) -> str:
    if table.empty:
        return "_(no data)_\n"
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(map(str, table.columns)) + " |",
             "|" + " --- |" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |"
              for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


SECTIONS = (
    ("correlation", "Correlation (Spearman) of size, MACs, accuracy and latency"),
    ("compression_speedup", "Speedup of each compression technique over the uncompressed model"),
    ("best_primitive", "Best primitive per (model, compression, tuning) cell"),
    ("tuning_changes", "Does tuning change the best primitive?"),
    ("sparse_vs_dense", "Sparse vs dense per sparsity level (ratio > 1: sparse faster)"),
    ("quantisation_primitive", "Best primitive per quantisation level"),
    ("quantisation_changes", "Does quantisation change the best primitive?"),
    ("importance", "Per-layer importance for each objective (fANOVA)"),
    ("interactions", "Interactions between layers"),
)


def build(trials: pareto.Trials, out_dir: str | Path,
          replicates: int | None = None) -> tuple[dict, list, Path]:
    """Compute every table, interaction and verdict of `trials` (each verdict on `replicates`
    bootstrap replicates, observations.BOOTSTRAP by default) and write report.md, one CSV per
    table, verdicts.csv and the plots into `out_dir`."""
    from . import interactions, observations, report_plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frame = runs_frame(trials)
    tables = compute(frame)
    tables["importance"] = importance(trials)
    tables["interactions"] = interactions.interactions(frame, trials.objectives)
    verdicts = [observations.judge(o, frame, replicates or observations.BOOTSTRAP)
                for o in observations.OBSERVATIONS]
    for name, table in tables.items():
        table.to_csv(out / f"{name}.csv", index=False)
    pd.DataFrame([v.row() for v in verdicts]).to_csv(out / "verdicts.csv", index=False)
    plots = report_plots.write(frame, tables, out)
    if interactions.heatmap(tables["interactions"], out / "interactions.png"):
        plots.append("interactions")
    tuning = tables["tuning_changes"].dropna(subset=["changed"])
    accuracy = frame.groupby("arch")["accuracy"].agg(["min", "max"]).join(
        frame[frame["method"] == "none"].groupby("arch")["accuracy"].median()
        .rename("uncompressed"))
    lines = [f"# DLAS perturbation study: {trials.study}", "",
             f"{len(frame)} finished configurations: {frame['arch'].nunique()} model(s), "
             f"{frame['compression'].nunique()} compression level(s), "
             f"{frame['primitive'].nunique()} primitive(s), {frame['tuner'].nunique()} tuning "
             f"setting(s), {frame['target'].nunique()} target(s). Accuracy on the validation "
             "split per model, uncompressed (and over every configuration): " + ", ".join(
                 f"{arch} {r['uncompressed']:.3f} ({r['min']:.3f} to {r['max']:.3f})"
                 for arch, r in accuracy.iterrows()) + ".", ""]
    lines += ["Each claim is about some instance (a cell, a technique, a pair of metrics): the "
              "statistic is computed per instance (`of N`) and shown for the instance that "
              "decides the verdict, with its bootstrap interval (each latency redrawn from its "
              "timing interval; configurations resampled where the statistic aggregates them; "
              "95% over all N instances together). `supported` when some instance's interval "
              "is wholly on the rule's side, `not supported` when every one is wholly on the "
              "other, else `inconclusive here` (docs/paper.md).", ""]
    for source, title in (("paper", "The paper's observations"),
                          ("hypothesis", "This project's hypotheses")):
        lines += [f"## {title}", "", *(v.line() for v in verdicts if v.source == source), ""]
    for name, title in SECTIONS:
        lines += [f"## {title}", ""]
        if name == "tuning_changes" and not tuning.empty:
            lines += [f"Changed in {int(tuning['changed'].astype(bool).sum())} of "
                      f"{len(tuning)} cells.", ""]
        if name == "interactions":
            lines += [INTERACTIONS_NOTE, ""]
            lines += [_markdown(_strongest(tables[name])), f"(`{name}.csv`, all pairs; "
                      "`interactions.png`)", ""]
            continue
        lines += [_markdown(tables[name]), f"(`{name}.csv`)", ""]
    if plots:
        lines += ["## Plots", "", *(f"- `{p}.png`" + ("" if p == "interactions" else
                                                      f", `{p}.html` (interactive)")
                                    for p in plots), ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return tables, verdicts, path


INTERACTIONS_NOTE = (
    "Partial eta squared of each pair of layers, per objective, from a two-way ANOVA over the "
    "grid (latency and size on a log scale): the share of the variation left by every "
    "layer's own effect that the pair explains together. The pairs the grid can estimate, "
    "strongest first; p from the F-test (F inf, p 0: the pair explains what is left exactly, "
    "as for accuracy and size, which the model and compression layers fix; eta 0, p 1: "
    "nothing).")


def _strongest(table: pd.DataFrame) -> pd.DataFrame:
    pairs = table[(table["a"] != table["b"]) & (table["df"] > 0)]
    return pairs.sort_values(["objective", "partial_eta2"], ascending=[True, False])


def study_run_id(tracking_uri: str, experiment: str) -> str:
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], f"tags.`{tracking.ROLE}` = 'study'",
                              max_results=1, order_by=["attributes.start_time ASC"])
    return runs[0].info.run_id


def write_report(tracking_uri: str, experiment: str, out_dir: str | Path):
    """Build the report from MLflow alone and log it to the study's parent run (and to the
    `mlflow run` launcher's run, when there is one) as the artifact folder `report`."""
    import os

    from mlflow.tracking import MlflowClient
    trials = pareto.load_trials(tracking_uri, experiment)
    tables, verdicts, path = build(trials, out_dir)
    MlflowClient(tracking_uri=tracking_uri).log_artifacts(
        study_run_id(tracking_uri, experiment), str(out_dir), "report")
    launcher = os.environ.get("MLFLOW_RUN_ID")
    if launcher:
        MlflowClient(tracking_uri=os.environ.get("MLFLOW_TRACKING_URI")).log_artifacts(
            launcher, str(out_dir), "report")
    return tables, verdicts, path
