"""The front at a glance in MLflow: what the experiment page shows once a study's front is
exported, so that a user deciding what to deploy sees it without opening the export.

    show_front(client, trials)      # trials: pareto.Trials, as the export read and wrote it

- Every trial run is tagged `dlas.pareto` (`true` on the front, `false` otherwise, stopped,
  failed and superseded runs included) and `dlas.feasible`; a front run's name starts with
  `MARK`, and a run that left the front (a continued study) loses it.
- optuna-dashboard's note on the study (`dashboard_note`): the front, the hypervolume, and
  how far to trust the importance it draws.
- The experiment gets a shared view, `view_link`: every trial run in one flat table, its
  objectives and the parameters that varied as columns (the runs page otherwise shows only
  the collapsed study run, and no metric columns).
- The study's run gets a description (MLflow's `mlflow.note.content`, shown on its page): the
  space's `description:`, the key figures, and the front as a table linking to its runs; and
  the metrics `hypervolume` and `best_<objective>` (over the feasible trials).

The front is `pareto.Trials.front()`, the one the export writes: one rule.
"""
from __future__ import annotations

import json
import time

from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient

from .tracking import ROLE, STUDY

__all__ = ["MARK", "PARETO", "FEASIBLE", "NOTE", "UNRUN", "VIEW", "show_front", "describe",
           "best", "dashboard_note", "trials_view", "view_link"]

MARK = "\u2605 "  # a star: sorts and reads apart from "#"
PARETO, FEASIBLE, NOTE = "dlas.pareto", "dlas.feasible", "mlflow.note.content"
UNRUN = "dlas.samples_unrun"  # the study run's tag: samples pruned before any work (no run)
# the experiment's shared view (MLflow's `mlflow.sharedViewState.<key>` experiment tag): the
# trials as a flat table with their objectives and parameters as columns, best first
VIEW = "dlas-trials"


def _link(experiment_id: str, row: dict) -> str:
    return f"[{row['name']}](#/experiments/{experiment_id}/runs/{row['run_id']})"


def best(trials) -> dict[str, tuple[float, dict]]:
    """objective -> (its best value over the feasible trials, the row with it). A tie goes to
    the row best on the other objectives in order (so the row named is on the front: two int8
    builds of one model share their size, and the slower one was named)."""
    rows = [r for r in trials.rows if trials.feasible(r)]
    sign = {m: -1.0 if d == "maximize" else 1.0 for m, d in trials.objectives.items()}
    out = {}
    for metric in trials.objectives:
        order = [metric] + [m for m in trials.objectives if m != metric]
        if rows:
            pick = min(rows, key=lambda r: tuple(sign[m] * r["metrics"][m] for m in order))
            out[metric] = (pick["metrics"][metric], pick)
    return out


def view_link(experiment_id: str) -> str:
    """The experiment's runs page opened on the trials' shared view (a link inside the UI)."""
    return f"#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW}&workflowType=" \
        "machine_learning"


def trials_view(trials) -> str:
    """The shared view's state (JSON, as MLflow's UI reads it): trial runs only, sorted by the
    first objective, with the objectives, speedup_vs_torch and the informative parameters."""
    from .pareto import informative
    first, direction = next(iter(trials.objectives.items()))
    columns = [f"metrics.`{m}`" for m in [*trials.objectives, "speedup_vs_torch"]]
    columns += [f"params.`{p}`" for p in informative(trials)]
    return json.dumps({"searchFilter": f"tags.`{ROLE}` = 'trial'",
                       "orderByKey": f"metrics.`{first}`", "orderByAsc": direction != "maximize",
                       "selectedColumns": columns})


def describe(trials, experiment_id: str, description: str = "") -> str:
    """The study run's description (Markdown), what matters first (MLflow shows its first
    lines): the key figures and a link to all trials, the front as a table of links to its
    runs, then the space's description."""
    front = trials.front()
    feasible = sum(trials.feasible(r) for r in trials.rows)
    volume = "" if trials.hypervolume is None else f", hypervolume {trials.hypervolume:.4f}"
    lines = [f"**Front: {len(front)} of {feasible} feasible trials** "
             f"({len(trials.rows)} finished{volume}); [all trials, with their objectives and "
             f"parameters as columns]({view_link(experiment_id)})."]
    tops = best(trials)
    if tops:
        lines.append("Best " + "; ".join(
            f"{m} {v:.4g} ({_link(experiment_id, row)})" for m, (v, row) in tops.items()) + ".")
    if front:
        names = list(trials.objectives)
        lines += ["", "| run | " + " | ".join(names) + " |",
                  "| --- |" + " --- |" * len(names)]
        for row in sorted(front, key=lambda r: r["metrics"][names[0]],
                          reverse=trials.objectives[names[0]] == "maximize"):
            lines.append(f"| {_link(experiment_id, row)} | " + " | ".join(
                f"{row['metrics'][m]:.4g}" for m in names) + " |")
    if description:
        lines += ["", description]
    if trials.unrun:
        lines += ["", f"Trial numbers are Optuna's: {trials.unrun} sampled configuration(s) "
                  "were pruned before any work (a repeat of one that ran, or ruled out by "
                  "the space's constraints) and have no run here; optuna-dashboard lists "
                  "them with the reason (`pruned`)."]
    lines += ["", f"Every trial run is tagged `{PARETO}` (`true` on the front; search "
              f"``tags.`{PARETO}` = 'true'``). The export (CSV, JSON, plots) is this run's "
              "`pareto/` artifact folder."]
    return "\n".join(lines)


def show_front(client: MlflowClient, trials) -> None:
    """Tag, name and describe the study's runs after its front was exported (`trials`: the
    export's `pareto.Trials`, with its hypervolume, experiment, study run and description)."""
    experiment_id, parent_id = trials.experiment_id, trials.parent_id
    on_front = {row["run_id"] for row in trials.front()}
    feasible = {row["run_id"]: trials.feasible(row) for row in trials.rows}
    token = None
    while True:
        page = client.search_runs([experiment_id], f"tags.`{ROLE}` = 'trial' and "
                                  f"tags.`{STUDY}` = '{trials.study}'",
                                  max_results=1000, page_token=token)
        for run in page:
            run_id, name = run.info.run_id, run.info.run_name or ""
            tags = {PARETO: str(run_id in on_front).lower()}
            if run_id in feasible:
                tags[FEASIBLE] = str(feasible[run_id]).lower()
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()
                                           if run.data.tags.get(k) != v])
            plain = name[len(MARK):] if name.startswith(MARK) else name
            wanted = MARK + plain if run_id in on_front else plain
            if wanted != name:
                client.update_run(run_id, name=wanted)
        token = page.token
        if not token:
            break
    metrics = {f"best_{m}": v for m, (v, _) in best(trials).items()}
    if trials.hypervolume is not None:
        metrics["hypervolume"] = trials.hypervolume
    now = int(time.time() * 1000)
    client.set_experiment_tag(experiment_id, f"mlflow.sharedViewState.{VIEW}",
                              trials_view(trials))
    client.log_batch(parent_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                     tags=[RunTag(NOTE, describe(trials, experiment_id, trials.description))])


def dashboard_note(trials) -> str:
    """The study's note in optuna-dashboard (Markdown): the front by name (the dashboard
    shows numbers), its hypervolume, and how far to trust the importance the dashboard draws."""
    from .pareto import RELIABLE_TRIALS, derived
    names = list(trials.objectives)
    lines = [f"## {trials.study}: {len(trials.front())} trial(s) on the front", ""]
    if trials.hypervolume is not None:
        lines += [f"Hypervolume {trials.hypervolume:.4f} (dlas pareto; the MLflow run "
                  "`study " + trials.study + "` has the export).", ""]
    lines += ["| trial | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    lines += [f"| {row['name']} | " + " | ".join(
        f"{row['metrics'][m]:.4g}" for m in names) + " |" for row in trials.front()]
    lines.append("")
    if len(trials.rows) < RELIABLE_TRIALS:
        lines.append(f"**Importance**: {len(trials.rows)} finished trials; below "
                     f"{RELIABLE_TRIALS}, neither this dashboard's importance nor "
                     "importance.csv is reliable.")
    gone = derived(trials)
    if gone:
        lines.append("Determined by another parameter (the dashboard still ranks them; "
                     "importance.csv leaves them out): " + ", ".join(
                         f"{p} by {q}" for p, q in gone.items()) + ".")
    return "\n".join(lines)
