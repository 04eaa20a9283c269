"""The Pareto front of a study, read back from MLflow alone: CSV, JSON, an interactive HTML
plot (plotly, through Optuna's `plot_pareto_front`) and a PNG (matplotlib), the front's
hypervolume, and which layers' parameters matter for each objective (importance.csv).

    front = non_dominated(values, ["maximize", "minimize"])   # boolean mask
    export_from_mlflow("sqlite:///tracking/mlflow.db", "quickstart", "out/")
"""
from __future__ import annotations

import itertools
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from mlflow.tracking import MlflowClient

from .errors import BadInput
from .stack import group_order
from .tracking import ROLE, STUDY, TRIAL

__all__ = ["non_dominated", "hypervolume", "normalised_hypervolume", "Trials",
           "load_trials", "write", "layer_importance", "export_from_mlflow"]


def non_dominated(values, directions: list[str]) -> np.ndarray:
    """Mask of the points no other point dominates (at least as good in every objective and
    better in one). Ties and duplicates are all kept, as in Optuna's `best_trials`."""
    points = np.asarray(values, dtype=float).reshape(len(values), len(directions))
    signs = np.array([-1.0 if d == "maximize" else 1.0 for d in directions])
    costs = points * signs  # minimise everything
    better_or_equal = (costs[:, None, :] <= costs[None, :, :]).all(axis=2)
    strictly_better = (costs[:, None, :] < costs[None, :, :]).any(axis=2)
    dominated = (better_or_equal & strictly_better).any(axis=0)  # [i, j]: i dominates j
    return ~dominated


def hypervolume(costs: np.ndarray, reference: np.ndarray) -> float:
    """Volume dominated by `costs` (all minimised) up to `reference`, exactly: slice along
    the first objective and recurse on the rest (fine for the few objectives and the fronts of
    a study)."""
    costs = np.asarray(costs, dtype=float)
    costs = costs[(costs < reference).all(axis=1)]
    if len(costs) == 0:
        return 0.0
    if costs.shape[1] == 1:
        return float(reference[0] - costs[:, 0].min())
    order = np.argsort(costs[:, 0])
    costs = costs[order]
    volume = 0.0
    for i in range(len(costs)):
        upper = costs[i + 1, 0] if i + 1 < len(costs) else reference[0]
        if upper > costs[i, 0]:
            volume += (upper - costs[i, 0]) * hypervolume(costs[: i + 1, 1:], reference[1:])
    return volume


def normalised_hypervolume(values: np.ndarray, front: np.ndarray,
                           directions: list[str]) -> float:
    """The front's hypervolume with every objective scaled to [0, 1] over all the trials
    (best 0, worst 1) and the reference point at 1.1: comparable across studies of the same
    objectives, 1.21 ** (objectives / 2) would be a perfect corner."""
    signs = np.array([-1.0 if d == "maximize" else 1.0 for d in directions])
    costs, front_costs = values * signs, front * signs
    low, high = costs.min(axis=0), costs.max(axis=0)
    span = np.where(high > low, high - low, 1.0)
    return hypervolume((front_costs - low) / span, np.full(len(directions), 1.1))


@dataclass
class Trials:
    """Finished trials of one study as rows: trial number, run id, params, metrics."""
    study: str
    objectives: dict[str, str]
    rows: list[dict]
    # metric -> {"min": x, "max": y}: the study's thresholds; rows outside are not on the front
    thresholds: dict[str, dict[str, float]] = field(default_factory=dict)

    def values(self) -> np.ndarray:
        return np.array([[row["metrics"][m] for m in self.objectives] for row in self.rows])

    def feasible(self, row: dict) -> bool:
        metrics = row["metrics"]
        return all(metric in metrics and bounds.get("min", -math.inf) <= metrics[metric]
                   <= bounds.get("max", math.inf) for metric, bounds in self.thresholds.items())

    def front(self) -> list[dict]:
        rows = [row for row in self.rows if self.feasible(row)]
        if not rows:
            return []
        values = np.array([[row["metrics"][m] for m in self.objectives] for row in rows])
        mask = non_dominated(values, list(self.objectives.values()))
        return [row for row, keep in zip(rows, mask) if keep]


def load_trials(tracking_uri: str, experiment: str) -> Trials:
    """The study's finished child runs, from MLflow."""
    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = [e.name for e in client.search_experiments()]
        raise BadInput(f"--experiment {experiment!r}: no such experiment at {tracking_uri}; "
                       f"allowed: {', '.join(names) or '(none yet: run a search first)'}")
    parents = client.search_runs([found.experiment_id], f"tags.`{ROLE}` = 'study'",
                                 max_results=1)
    if not parents or "dlas.objectives" not in parents[0].data.tags:
        raise BadInput(f"--experiment {experiment!r}: not a dlas-search study (no study run "
                       "with objectives)")
    objectives = json.loads(parents[0].data.tags["dlas.objectives"])
    rows, token = [], None
    while True:
        page = client.search_runs([found.experiment_id],
                                  f"tags.`{ROLE}` = 'trial' and attributes.status = 'FINISHED'",
                                  max_results=1000, page_token=token)
        for run in page:
            metrics = run.data.metrics
            if all(m in metrics and math.isfinite(metrics[m]) for m in objectives):
                rows.append({"trial": int(run.data.tags.get(TRIAL, -1)), "run_id": run.info.run_id,
                             "name": run.info.run_name, "params": dict(run.data.params),
                             "metrics": dict(metrics)})
        token = page.token
        if not token:
            break
    rows.sort(key=lambda r: r["trial"])
    thresholds = json.loads(parents[0].data.tags.get("dlas.thresholds") or "{}")
    return Trials(parents[0].data.tags.get(STUDY, experiment), objectives, rows, thresholds)


def _flat(row: dict, objectives: dict[str, str]) -> dict:
    first = {"trial": row["trial"], **{m: row["metrics"][m] for m in objectives}}
    rest = {k: v for k, v in sorted(row["metrics"].items()) if k not in objectives}
    return {**first, **dict(sorted(row["params"].items())), **rest, "run_id": row["run_id"]}


def _optuna_study(trials: Trials):
    """An in-memory Optuna study holding the trials, so Optuna's own plot draws the front."""
    import optuna
    from optuna.distributions import CategoricalDistribution

    study = optuna.create_study(directions=list(trials.objectives.values()))
    names = sorted({k for row in trials.rows for k in row["params"]})
    choices = {k: sorted({row["params"].get(k, "-") for row in trials.rows}) for k in names}
    for row in trials.rows:
        params = {k: row["params"].get(k, "-") for k in names}
        study.add_trial(optuna.trial.create_trial(
            values=[row["metrics"][m] for m in trials.objectives], params=params,
            distributions={k: CategoricalDistribution(choices[k]) for k in names},
            user_attrs={"trial": row["trial"], "run_id": row["run_id"]}))
    return study


def write(trials: Trials, out_dir: str | Path, running: int = 0) -> dict[str, Path]:
    """Write pareto.csv, pareto.json, trials.csv, pareto.html and pareto.png into `out_dir`;
    `running`: trials of the study still running, not in the export (pareto.json says so)."""
    import csv

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    front = trials.front()
    paths = {name: out / name for name in ("pareto.csv", "pareto.json", "trials.csv",
                                           "pareto.html", "pareto.png")}
    for rows, path in ((front, paths["pareto.csv"]), (trials.rows, paths["trials.csv"])):
        flat = [_flat(r, trials.objectives) for r in rows]
        columns = list(dict.fromkeys(k for r in flat for k in r))
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(flat)
    directions = list(trials.objectives.values())
    volume = normalised_hypervolume(
        trials.values(), np.array([[r["metrics"][m] for m in trials.objectives] for r in front]),
        directions) if front else 0.0
    paths["importance.csv"] = out / "importance.csv"
    importance = layer_importance(trials)
    with open(paths["importance.csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["layer", "parameter", *trials.objectives])
        for (layer, param), scores in importance.items():
            writer.writerow([layer, param, *(f"{scores[m]:.4f}" for m in trials.objectives)])
    paths["pareto.json"].write_text(json.dumps({
        "study": trials.study, "objectives": trials.objectives,
        "thresholds": trials.thresholds, "trials": len(trials.rows),
        "feasible": sum(trials.feasible(r) for r in trials.rows),
        "hypervolume": volume, "front": front,
        **({"trials_running": running, "note": f"made with {running} trial(s) still running"}
           if running else {})}, indent=2))
    _plot_html(trials, paths["pareto.html"])
    _plot_png(trials, front, paths["pareto.png"])
    return paths


def layer_importance(trials: Trials) -> dict[tuple[str, str], dict[str, float]]:
    """fANOVA importance (Optuna's evaluator, seeded) of each parameter that varied, per
    objective, plus a row per layer (`layer`, "*") summing its parameters; empty with fewer
    than two trials or nothing varied; 0 for an objective that did not vary."""
    import optuna

    study = _optuna_study(trials)
    varied = [k for k in sorted({k for r in trials.rows for k in r["params"]})
              if len({r["params"].get(k, "-") for r in trials.rows}) > 1]
    if len(trials.rows) < 2 or not varied:
        return {}
    scores: dict[tuple[str, str], dict[str, float]] = {}
    for i, metric in enumerate(trials.objectives):
        if len({row["metrics"][metric] for row in trials.rows}) < 2:
            continue  # the objective did not vary: nothing to attribute (fANOVA refuses)
        try:
            found = optuna.importance.get_param_importances(
                study, params=varied, target=lambda t, i=i: t.values[i],
                evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0), normalize=True)
        except (RuntimeError, ValueError) as e:  # e.g. no variance left in any tree
            print(f"warning: no importance for {metric}: {e}", file=sys.stderr)
            continue
        for param, value in found.items():
            layer = param.split(".")[0]
            scores.setdefault((layer, param), {m: 0.0 for m in trials.objectives})[metric] = value
            total = scores.setdefault((layer, "*"), {m: 0.0 for m in trials.objectives})
            total[metric] += value
    return dict(sorted(scores.items(), key=lambda kv: (kv[0][0], kv[0][1] != "*", kv[0][1])))


def _plot_html(trials: Trials, path: Path) -> None:
    """One page: the 2-D front of every pair of objectives (all trials in grey, the pair's
    front in colour), then a parallel-coordinates view of every trial across the parameters
    that varied and the objectives, coloured by the parameter picked in its menu (grouped by
    layer), to see which layer's choice puts a trial where it is."""
    if not trials.rows:
        path.write_text("<html><body>No finished trials yet.</body></html>")
        return
    figures = [_pairs_figure(trials), _parallel_figure(trials)]
    body = "".join(fig.to_html(full_html=False, include_plotlyjs=(i == 0))
                   for i, fig in enumerate(figures))
    path.write_text(f"<html><head><meta charset='utf-8'><title>{trials.study}: Pareto front"
                    f"</title></head><body>{body}</body></html>")


def _pairs_figure(trials: Trials):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    names = list(trials.objectives)
    pairs = list(itertools.combinations(names, 2))
    title = f"Pareto front of {trials.study} ({len(trials.rows)} trials)"
    if not pairs:  # one objective: a table of the front
        front = trials.front()
        fig = go.Figure(go.Table(header={"values": ["trial", *names]}, cells={"values": [
            [r["trial"] for r in front], *[[r["metrics"][m] for r in front] for m in names]]}))
        return fig.update_layout(title=title)
    fig = make_subplots(rows=1, cols=len(pairs), horizontal_spacing=0.08,
                        subplot_titles=[f"{x} vs {y}" for x, y in pairs])
    feasible = [row for row in trials.rows if trials.feasible(row)]
    for col, (x, y) in enumerate(pairs, start=1):
        fig.add_trace(go.Scatter(
            x=[r["metrics"][x] for r in trials.rows], y=[r["metrics"][y] for r in trials.rows],
            mode="markers", marker={"color": "lightgrey", "size": 7}, name="trials",
            text=[r["name"] for r in trials.rows], showlegend=col == 1), row=1, col=col)
        if feasible:
            values = np.array([[r["metrics"][x], r["metrics"][y]] for r in feasible])
            mask = non_dominated(values, [trials.objectives[x], trials.objectives[y]])
            front = sorted((r for r, keep in zip(feasible, mask) if keep),
                           key=lambda r: r["metrics"][x])
            fig.add_trace(go.Scatter(
                x=[r["metrics"][x] for r in front], y=[r["metrics"][y] for r in front],
                mode="lines+markers", line={"shape": "hv"}, marker={"color": "crimson",
                                                                     "size": 9},
                name="front of the pair", text=[r["name"] for r in front],
                showlegend=col == 1), row=1, col=col)
        fig.update_xaxes(title_text=f"{x} ({trials.objectives[x][:3]})", row=1, col=col)
        fig.update_yaxes(title_text=f"{y} ({trials.objectives[y][:3]})", row=1, col=col)
    return fig.update_layout(title=title, height=450)


def _parallel_figure(trials: Trials):
    import plotly.graph_objects as go

    varied = sorted({k for row in trials.rows for k in row["params"]
                     if len({r["params"].get(k) for r in trials.rows}) > 1},
                    key=lambda k: (group_order(k), k))
    dimensions, colours = [], {}
    for key in varied:
        values = [row["params"].get(key, "-") for row in trials.rows]
        try:
            numbers = [float(v) for v in values]
            dimensions.append({"label": key, "values": numbers})
            colours[key] = numbers
        except ValueError:  # categorical (or absent '-' in some trials): coded 0..n-1
            labels = sorted(set(values))
            codes = [labels.index(v) for v in values]
            dimensions.append({"label": key, "values": codes, "tickvals": list(range(len(labels))),
                               "ticktext": labels})
            colours[key] = codes
    for name in trials.objectives:
        dimensions.append({"label": name, "values": [r["metrics"][name] for r in trials.rows]})
    first = varied[0] if varied else None
    colour = colours[first] if first else dimensions[-1]["values"]
    fig = go.Figure(go.Parcoords(dimensions=dimensions, line={
        "color": colour, "colorscale": "Turbo", "showscale": True}))
    buttons = [{"label": f"colour by {key}", "method": "restyle",
                "args": [{"line.color": [colours[key]]}]} for key in varied]
    if buttons:
        fig.update_layout(updatemenus=[{"buttons": buttons, "x": 0, "y": 1.18,
                                        "xanchor": "left", "direction": "down"}])
    return fig.update_layout(
        title=f"All {len(trials.rows)} trials: parameters that varied (by layer) and objectives",
        height=500, margin={"t": 120})


def _plot_png(trials: Trials, front: list[dict], path: Path) -> None:
    """Every pair of objectives, all trials in grey, the front in colour with trial numbers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(trials.objectives)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]] or [(names[0], names[0])]
    fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 4), squeeze=False)
    for ax, (x, y) in zip(axes[0], pairs):
        ax.scatter([r["metrics"][x] for r in trials.rows], [r["metrics"][y] for r in trials.rows],
                   c="lightgrey", label="trials")
        ax.scatter([r["metrics"][x] for r in front], [r["metrics"][y] for r in front],
                   c="tab:red", label="Pareto front")
        for r in front:
            ax.annotate(f"#{r['trial']}", (r["metrics"][x], r["metrics"][y]), fontsize=8)
        ax.set_xlabel(f"{x} ({trials.objectives[x]})")
        ax.set_ylabel(f"{y} ({trials.objectives[y]})")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.suptitle(f"{trials.study}: {len(front)} of {len(trials.rows)} trials on the front")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def export_from_mlflow(tracking_uri: str, experiment: str, out_dir: str | Path,
                       running: int = 0) -> Trials:
    trials = load_trials(tracking_uri, experiment)
    write(trials, out_dir, running)
    return trials
