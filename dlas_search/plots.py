"""The Pareto export's plots: an interactive HTML page (plotly) and a PNG (matplotlib).

Every pair of objectives gets a scatter: feasible trials in light blue, the study's front
(non-dominated on all its objectives: `Trials.front()`) in colour and named in every panel,
the pair's own 2-D front as a dashed line, and the trials outside the study's thresholds as
grey crosses under a legend entry that names the threshold ("infeasible (below accuracy floor
0.5)"): shown, never on a front. The parallel-coordinates view shows the parameters that vary
and are not determined by another (`pareto.informative`), its colour bar labelled with the
categories of the parameter it colours by.

    plots.html(trials, Path("pareto.html"))
    plots.png(trials, trials.front(), Path("pareto.png"))
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .dominance import non_dominated
from .stack import group_order

if TYPE_CHECKING:  # the export hands its Trials to the plots; nothing imported at run time
    from .pareto import Trials

__all__ = ["html", "png", "pairs_figure", "parallel_figure", "FEASIBLE", "INFEASIBLE", "FRONT",
           "PAIR_FRONT", "FRONT_LEGEND", "PAIR_LEGEND"]

FEASIBLE = "#9ecae1"    # light blue: a feasible trial off the front
INFEASIBLE = "#8c8c8c"  # grey crosses: outside a threshold (greyed, never on the front)
FRONT = "crimson"       # the study's front, on all its objectives
PAIR_FRONT = "#555555"  # the pair's own 2-D front: a dashed line, no markers
FRONT_LEGEND, PAIR_LEGEND = "Pareto front (all objectives)", "front of this pair only"


def _split(trials: Trials) -> tuple[list[dict], list[dict]]:
    """(feasible rows, infeasible rows)."""
    return ([r for r in trials.rows if trials.feasible(r)],
            [r for r in trials.rows if not trials.feasible(r)])


def _bounds(trials: Trials, x: str, y: str) -> list[tuple[str, float]]:
    """(metric, bound) of each threshold on the axes x or y, drawn as a dashed line."""
    return [(m, b) for m in dict.fromkeys((x, y)) for b in trials.thresholds.get(m, {}).values()]


def html(trials: Trials, path: Path) -> None:
    """One page: the 2-D front of every pair of objectives (feasible trials in light blue,
    infeasible ones greyed, the pair's front in colour), then a parallel-coordinates view of
    every trial across the parameters that varied and the objectives, coloured by the
    parameter picked in its menu (grouped by layer), to see which layer's choice puts a trial
    where it is."""
    if not trials.rows:
        path.write_text("<html><body>No finished trials yet.</body></html>")
        return
    figures = [pairs_figure(trials), parallel_figure(trials)]
    body = "".join(fig.to_html(full_html=False, include_plotlyjs=(i == 0))
                   for i, fig in enumerate(figures))
    path.write_text(f"<html><head><meta charset='utf-8'><title>{trials.study}: Pareto front"
                    f"</title></head><body>{body}</body></html>")


def pairs_figure(trials: Trials):
    """A plotly figure: a subplot per pair of objectives (a table of the front for one)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    names = list(trials.objectives)
    pairs = list(itertools.combinations(names, 2))
    feasible, infeasible = _split(trials)
    title = f"Pareto front of {trials.study} ({len(trials.front())} of {len(trials.rows)} " \
        "trials" + (f", {len(infeasible)} infeasible)" if infeasible else ")")
    if not pairs:  # one objective: a table of the front
        front = trials.front()
        fig = go.Figure(go.Table(header={"values": ["trial", *names]}, cells={"values": [
            [r["trial"] for r in front], *[[r["metrics"][m] for r in front] for m in names]]}))
        return fig.update_layout(title=title)
    front = trials.front()
    fig = make_subplots(rows=1, cols=len(pairs), horizontal_spacing=0.08,
                        subplot_titles=[f"{x} vs {y}" for x, y in pairs])
    for col, (x, y) in enumerate(pairs, start=1):
        fig.add_trace(go.Scatter(
            x=[r["metrics"][x] for r in feasible], y=[r["metrics"][y] for r in feasible],
            mode="markers", marker={"color": FEASIBLE, "size": 7}, name="dominated trials",
            text=[r["name"] for r in feasible], showlegend=col == 1), row=1, col=col)
        if infeasible:
            fig.add_trace(go.Scatter(
                x=[r["metrics"][x] for r in infeasible],
                y=[r["metrics"][y] for r in infeasible], mode="markers",
                marker={"color": INFEASIBLE, "size": 8, "symbol": "x"},
                name=trials.infeasible_label(),
                text=[f"{r['name']}: {trials.violates(r)}" for r in infeasible],
                showlegend=col == 1), row=1, col=col)
        if feasible:  # the pair's own front: a dashed step line, drawn under the real front
            values = np.array([[r["metrics"][x], r["metrics"][y]] for r in feasible])
            mask = non_dominated(values, [trials.objectives[x], trials.objectives[y]])
            pair = sorted((r for r, keep in zip(feasible, mask) if keep),
                          key=lambda r: r["metrics"][x])
            fig.add_trace(go.Scatter(
                x=[r["metrics"][x] for r in pair], y=[r["metrics"][y] for r in pair],
                mode="lines", line={"shape": "hv", "dash": "dash", "color": PAIR_FRONT,
                                    "width": 1}, name=PAIR_LEGEND, hoverinfo="skip",
                showlegend=col == 1), row=1, col=col)
        fig.add_trace(go.Scatter(
            x=[r["metrics"][x] for r in front], y=[r["metrics"][y] for r in front],
            mode="markers", marker={"color": FRONT, "size": 10}, name=FRONT_LEGEND,
            text=[r["name"] for r in front], showlegend=col == 1), row=1, col=col)
        for metric, bound in _bounds(trials, x, y):  # the floor (or ceiling) as a dashed line
            line = {"line_dash": "dash", "line_color": INFEASIBLE, "line_width": 1,
                    "row": 1, "col": col}
            (fig.add_vline(x=bound, **line) if metric == x else fig.add_hline(y=bound, **line))
        fig.update_xaxes(title_text=f"{x} ({trials.objectives[x][:3]})", row=1, col=col)
        fig.update_yaxes(title_text=f"{y} ({trials.objectives[y][:3]})", row=1, col=col)
    return fig.update_layout(title=title, height=450)


def parallel_figure(trials: Trials):
    """A plotly parallel-coordinates figure of every trial: the parameters that varied (in the
    stack's order), `feasible` when the study has thresholds, then the objectives."""
    import plotly.graph_objects as go

    from .pareto import informative
    shown = informative(trials)
    dimensions, colours, scales = [], {}, {}
    for key in shown:
        values = [row["params"].get(key, "-") for row in trials.rows]
        try:
            numbers = [float(v) for v in values]
            dimensions.append({"label": key, "values": numbers})
            colours[key], scales[key] = numbers, {"title": {"text": key}}
        except ValueError:  # categorical (or absent '-' in some trials): coded 0..n-1
            labels = sorted(set(values))
            codes = [labels.index(v) for v in values]
            dimensions.append({"label": key, "values": codes, "tickvals": list(range(len(labels))),
                               "ticktext": labels})
            colours[key] = codes
            scales[key] = {"title": {"text": key}, "tickvals": list(range(len(labels))),
                           "ticktext": labels}
    if trials.thresholds:  # brush it to hide the infeasible trials
        codes = [int(trials.feasible(r)) for r in trials.rows]
        dimensions.append({"label": "feasible", "values": codes, "tickvals": [0, 1],
                           "ticktext": ["no", "yes"], "range": [0, 1]})
        colours["feasible"] = codes
        scales["feasible"] = {"title": {"text": "feasible"}, "tickvals": [0, 1],
                              "ticktext": ["no", "yes"]}
    for name in trials.objectives:
        dimensions.append({"label": name, "values": [r["metrics"][name] for r in trials.rows]})
        colours[name] = dimensions[-1]["values"]
        scales[name] = {"title": {"text": name}}
    first = shown[0] if shown else list(trials.objectives)[-1]
    fig = go.Figure(go.Parcoords(dimensions=dimensions, line={
        "color": colours[first], "colorscale": "Turbo", "showscale": True,
        "colorbar": scales[first]}))
    buttons = [{"label": f"colour by {key}", "method": "restyle",
                "args": [{"line.color": [colours[key]], "line.colorbar": [scales[key]]}]}
               for key in colours]
    # the menu sits in the title's row, right-aligned: clear of the axis labels below it
    fig.update_layout(updatemenus=[{"buttons": buttons, "x": 1.0, "y": 1.0, "xanchor": "right",
                                    "yanchor": "bottom", "direction": "down",
                                    "pad": {"b": 60}}])
    return fig.update_layout(
        title=f"All {len(trials.rows)} trials: the parameters that varied (by layer) and the "
              "objectives", height=520, margin={"t": 150})


def png(trials: Trials, front: list[dict], path: Path) -> None:
    """Every pair of objectives: feasible trials in light blue, infeasible ones as grey crosses
    (named by the threshold they violate), the study's front in colour with the trials'
    names."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(trials.objectives)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]] or [(names[0], names[0])]
    feasible, infeasible = _split(trials)
    fig, axes = plt.subplots(1, len(pairs), figsize=(6 * len(pairs), 5), squeeze=False)
    for ax, (x, y) in zip(axes[0], pairs):
        ax.scatter([r["metrics"][x] for r in feasible], [r["metrics"][y] for r in feasible],
                   c=FEASIBLE, label="feasible trials")
        if infeasible:
            ax.scatter([r["metrics"][x] for r in infeasible],
                       [r["metrics"][y] for r in infeasible], c=INFEASIBLE, marker="x",
                       label=trials.infeasible_label())
        ax.scatter([r["metrics"][x] for r in front], [r["metrics"][y] for r in front],
                   c=FRONT, label=FRONT_LEGEND)
        for metric, bound in _bounds(trials, x, y):
            (ax.axvline if metric == x else ax.axhline)(bound, color=INFEASIBLE, ls="--", lw=1)
        # names, stacked by height so that neighbours do not print over each other, and
        # written towards the middle of the panel so that they stay inside it
        middle = sum(ax.get_xlim()) / 2
        for i, r in enumerate(sorted(front, key=lambda r: (r["metrics"][y], r["metrics"][x]))):
            right = r["metrics"][x] > middle
            ax.annotate(r["name"], (r["metrics"][x], r["metrics"][y]), fontsize=7,
                        xytext=(-6 if right else 6, 10 * (i % 3) - 10),
                        textcoords="offset points", ha="right" if right else "left",
                        arrowprops={"arrowstyle": "-", "color": "#999999", "lw": 0.5})
        ax.set_xlabel(f"{x} ({trials.objectives[x]})")
        ax.set_ylabel(f"{y} ({trials.objectives[y]})")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    outside = f", {len(infeasible)} infeasible" if infeasible else ""
    fig.suptitle(f"{trials.study}: {len(front)} of {len(trials.rows)} trials on the front"
                 f"{outside}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
