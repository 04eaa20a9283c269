"""The Pareto front of a study, read back from MLflow alone: CSV, JSON, an interactive HTML
plot (plotly) and a PNG (matplotlib), both drawn by `plots`, the front's
hypervolume, and which layers' parameters matter for each objective (importance.csv).
Where `dlas confirm` timed a trial again, its confirmed latency and speedup, with their
intervals, stand in for the search's (kept as `latency_search_ms`, ...); front points whose 95% intervals overlap on every
objective are marked `tied_with` each other (confidence.py). A trial outside the study's
thresholds (below its accuracy floor, say) is never on the front: the plots draw it greyed,
trials.csv says why (`feasible`, `violates`).

The CSVs list each trial's name and objectives first, then the parameters that varied in the
stack's order; parameters with one value in every trial go to pareto.json (`constants`), and
parameters another one fully determines (`model.stem` by `model.arch`, say) are left out of
the plots and the importance (`informative`). Importance from fewer than RELIABLE_TRIALS
trials is marked unreliable in importance.csv and pareto.json.

    front = non_dominated(values, ["maximize", "minimize"])   # boolean mask
    export_from_mlflow("sqlite:///tracking/mlflow.db", "quickstart", "out/")
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from mlflow.tracking import MlflowClient

from . import confidence
from .dominance import hypervolume, non_dominated, normalised_hypervolume
from .errors import BadInput
from .glance import MARK  # a front run's name starts with it: not part of the name
from .stack import group_order
from .tracking import ROLE, STUDY, SUPERSEDED, TRIAL

__all__ = ["non_dominated", "hypervolume", "normalised_hypervolume", "Trials",
           "load_trials", "write", "layer_importance", "export_from_mlflow", "varied",
           "constants", "derived", "informative", "confirmed_metrics", "RELIABLE_TRIALS"]

# fANOVA's importance over fewer trials than this is marked unreliable: with a handful of
# trials its forest attributes chance differences to whichever parameter it split on first
RELIABLE_TRIALS = 30


@dataclass
class Trials:
    """Finished trials of one study as rows: trial number, run id, params, metrics."""
    study: str
    objectives: dict[str, str]
    rows: list[dict]
    # metric -> {"min": x, "max": y}: the study's thresholds; rows outside are not on the front
    thresholds: dict[str, dict[str, float]] = field(default_factory=dict)
    # trials whose latency is the confirmed one (dlas confirm), not the search's
    confirmed: int = 0
    # the front's normalised hypervolume (set by `write`)
    hypervolume: float | None = None
    # where they were read from: the experiment, the study's run, the space's description
    experiment_id: str = ""
    parent_id: str = ""
    description: str = ""
    # samples Optuna pruned before any work (repeats, ruled out): trial numbers with no run
    unrun: int = 0

    def values(self) -> np.ndarray:
        return np.array([[row["metrics"][m] for m in self.objectives] for row in self.rows])

    def _outside(self, row: dict) -> list[tuple[str, str, float, float | None]]:
        """(metric, "min" or "max", bound, value) of each threshold `row` is outside."""
        out = []
        for metric, bounds in self.thresholds.items():
            value = row["metrics"].get(metric)
            for kind, bound in bounds.items():
                if value is None or (value < bound if kind == "min" else value > bound):
                    out.append((metric, kind, bound, value))
        return out

    def violates(self, row: dict) -> str:
        """The thresholds `row` is outside, e.g. "accuracy 0.1 < min 0.5"; "" if none."""
        return "; ".join(f"{m} not measured" if value is None else
                         f"{m} {value:.4g} {'<' if kind == 'min' else '>'} {kind} {bound:g}"
                         for m, kind, bound, value in self._outside(row))

    def feasible(self, row: dict) -> bool:
        return not self._outside(row)

    def _reasons(self) -> dict[str, int]:
        """Each reason trials are outside a threshold ("below accuracy floor 0.5", "above
        latency_ms ceiling 20", "macs not measured") -> how many trials."""
        counts: dict[str, int] = {}
        for row in self.rows:
            for metric, kind, bound, value in self._outside(row):
                why = (f"{metric} not measured" if value is None else f"below {metric} floor "
                       f"{bound:g}" if kind == "min" else f"above {metric} ceiling {bound:g}")
                counts[why] = counts.get(why, 0) + 1
        return counts

    def infeasible_label(self) -> str:
        """The legend entry of the infeasible trials: "infeasible (below accuracy floor 0.5)"."""
        return f"infeasible ({', '.join(self._reasons()) or 'outside the thresholds'})"

    def summary(self) -> str:
        """How many trials are infeasible and why, in a line ("" when none is)."""
        count = sum(not self.feasible(r) for r in self.rows)
        if not count:
            return ""
        why = ", ".join(f"{reason}: {n}" for reason, n in self._reasons().items())
        return (f"{count} infeasible ({why}): never on the front, greyed in the plots, "
                "why in trials.csv")

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
            metrics = confirmed_metrics(dict(run.data.metrics))
            if "dlas.stopped_at" in run.data.tags:  # a gate stopped it: not compiled or timed
                continue
            if SUPERSEDED in run.data.tags:  # a later tuning round's run has its final numbers
                continue
            if all(m in metrics and math.isfinite(metrics[m]) for m in objectives):
                rows.append({"trial": int(run.data.tags.get(TRIAL, -1)), "run_id": run.info.run_id,
                             "name": (run.info.run_name or "").removeprefix(MARK),
                             "params": dict(run.data.params),
                             "metrics": dict(metrics)})
        token = page.token
        if not token:
            break
    rows.sort(key=lambda r: r["trial"])
    thresholds = json.loads(parents[0].data.tags.get("dlas.thresholds") or "{}")
    return Trials(parents[0].data.tags.get(STUDY, experiment), objectives, rows, thresholds,
                  sum("latency_search_ms" in row["metrics"] for row in rows),
                  experiment_id=found.experiment_id, parent_id=parents[0].info.run_id,
                  description=parents[0].data.tags.get("dlas.description", ""),
                  unrun=int(parents[0].data.tags.get("dlas.samples_unrun", "0")))


_TIMING = ("_ms", "_std_ms", "_p90_ms", "_ci_low_ms", "_ci_high_ms")
# (the search's name, the confirmed one, where the search's is kept): each number with its
# interval, spread and baseline, so no row pairs a confirmed latency with the search's interval
_CONFIRMED = [*((f"{stem}{s}", f"{stem}_confirmed{s}", f"{stem}_search{s}")
                for stem in ("latency", "torch_latency") for s in _TIMING),
              *((f"speedup_vs_torch{s}", f"speedup_vs_torch_confirmed{s}",
                 f"speedup_vs_torch_search{s}") for s in ("", "_ci_low", "_ci_high"))]


def confirmed_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """A run's metrics with the confirmed latency, speedup and PyTorch baseline (dlas confirm),
    with their intervals, in place of the search's, which stay as `latency_search_ms`,
    `latency_search_ci_low_ms`, `speedup_vs_torch_search`, ..."""
    if "latency_confirmed_ms" not in metrics:
        return metrics
    for name, confirmed, kept in _CONFIRMED:
        if confirmed in metrics and name in metrics:
            metrics[kept], metrics[name] = metrics[name], metrics[confirmed]
    return metrics


def varied(trials: Trials) -> list[str]:
    """The parameters with more than one value among the trials, in the stack's order."""
    names = {k for row in trials.rows for k in row["params"]}
    return sorted((k for k in names if len({r["params"].get(k) for r in trials.rows}) > 1),
                  key=lambda k: (group_order(k), k))


def constants(trials: Trials) -> dict[str, str]:
    """The parameters with one value in every trial (the study's fixed settings)."""
    names = {k for row in trials.rows for k in row["params"]}
    return {k: trials.rows[0]["params"].get(k) for k in sorted(names, key=lambda k: (
        group_order(k), k)) if len({r["params"].get(k) for r in trials.rows}) == 1}


def derived(trials: Trials) -> dict[str, str]:
    """Varied parameter -> the varied parameter that fully determines it among the trials
    (`model.stem` -> `model.arch` where each architecture has its own stem). Evidence is
    required: two trials or more with the same value of the determining parameter and a
    value of the determined one (not `-`, absent); a parameter seen set in one trial only is
    not judged. Of two that determine each other (`compiler.tuner`, `compiler.trials`), the
    one absent in more trials is derived, else the later in the stack's order."""
    names = varied(trials)
    out: dict[str, str] = {}

    def absent(value) -> bool:
        return value in (None, "-", "None")

    def determines(q: str, p: str) -> bool:
        seen: dict = {}
        count: dict = {}
        for row in trials.rows:
            key, value = row["params"].get(q), row["params"].get(p)
            if seen.setdefault(key, value) != value:
                return False
            count[key] = count.get(key, 0) + 1
        return any(n > 1 and not absent(seen[key]) for key, n in count.items())

    def gaps(name: str) -> int:
        return sum(absent(row["params"].get(name)) for row in trials.rows)
    for p in names:
        for q in names:
            if q == p or q in out:
                continue
            if determines(q, p) and not (determines(p, q) and (gaps(p), names.index(p)) <
                                         (gaps(q), names.index(q))):
                out[p] = q
                break
    return out


def informative(trials: Trials) -> list[str]:
    """The parameters the plots and the importance show: varied and not derived."""
    gone = derived(trials)
    return [k for k in varied(trials) if k not in gone]


def _flat(row: dict, trials: Trials, params: list[str]) -> dict:
    first = {"trial": row["trial"], "name": row["name"],
             **{m: row["metrics"][m] for m in trials.objectives},
             "feasible": trials.feasible(row), "violates": trials.violates(row),
             **({"tied_with": row["tied_with"]} if "tied_with" in row else {}),
             "confirmed": "latency_search_ms" in row["metrics"]}
    rest = {k: v for k, v in sorted(row["metrics"].items()) if k not in trials.objectives}
    return {**first, **{k: row["params"].get(k) for k in params}, **rest,
            "run_id": row["run_id"]}


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
    tied = confidence.ties(front, trials.objectives)
    for row in front:  # the front points it cannot be told apart from (95% intervals)
        row["tied_with"] = " ".join(map(str, tied.get(row["trial"], [])))
    shown = varied(trials) if len(trials.rows) > 1 else list(constants(trials))
    for rows, path in ((front, paths["pareto.csv"]), (trials.rows, paths["trials.csv"])):
        flat = [_flat(r, trials, shown) for r in rows]
        columns = list(dict.fromkeys(k for r in flat for k in r))
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(flat)
    directions = list(trials.objectives.values())
    volume = normalised_hypervolume(
        trials.values(), np.array([[r["metrics"][m] for m in trials.objectives] for r in front]),
        directions) if front else 0.0
    trials.hypervolume = volume
    paths["importance.csv"] = out / "importance.csv"
    importance = layer_importance(trials)
    with open(paths["importance.csv"], "w", newline="") as f:
        writer = csv.writer(f)
        reliable = len(trials.rows) >= RELIABLE_TRIALS
        writer.writerow(["layer", "parameter", *trials.objectives, "trials", "reliable"])
        for (layer, param), scores in importance.items():
            writer.writerow([layer, param, *(f"{scores[m]:.4f}" for m in trials.objectives),
                             len(trials.rows), reliable])
    paths["pareto.json"].write_text(json.dumps({
        "study": trials.study, "objectives": trials.objectives,
        "thresholds": trials.thresholds, "trials": len(trials.rows),
        "confirmed": trials.confirmed,
        "feasible": sum(trials.feasible(r) for r in trials.rows),
        "infeasible": [{"trial": r["trial"], "name": r["name"], "violates": trials.violates(r)}
                       for r in trials.rows if not trials.feasible(r)],
        "hypervolume": volume,
        "constants": constants(trials) if len(trials.rows) > 1 else {},
        "derived": derived(trials),
        "importance": {"trials": len(trials.rows),
                       "reliable": len(trials.rows) >= RELIABLE_TRIALS,
                       "note": f"fANOVA over fewer than {RELIABLE_TRIALS} trials is not "
                               "reliable" if len(trials.rows) < RELIABLE_TRIALS else ""},
        "front": front,
        **({"trials_running": running, "note": f"made with {running} trial(s) still running"}
           if running else {})}, indent=2))
    from . import plots  # plotly and matplotlib load only to draw
    plots.html(trials, paths["pareto.html"])
    plots.png(trials, front, paths["pareto.png"])
    return paths


def layer_importance(trials: Trials) -> dict[tuple[str, str], dict[str, float]]:
    """fANOVA importance (Optuna's evaluator, seeded) of each parameter that varied, per
    objective, plus a row per layer (`layer`, "*") summing its parameters; empty with fewer
    than two trials or nothing varied; 0 for an objective that did not vary."""
    import optuna

    study = _optuna_study(trials)
    shown = informative(trials)
    if len(trials.rows) < 2 or not shown:
        return {}
    scores: dict[tuple[str, str], dict[str, float]] = {}
    for i, metric in enumerate(trials.objectives):
        if len({row["metrics"][metric] for row in trials.rows}) < 2:
            continue  # the objective did not vary: nothing to attribute (fANOVA refuses)
        try:
            found = optuna.importance.get_param_importances(
                study, params=shown, target=lambda t, i=i: t.values[i],
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


def export_from_mlflow(tracking_uri: str, experiment: str, out_dir: str | Path,
                       running: int = 0) -> Trials:
    """Read the study from MLflow, write the export, and show the front in MLflow itself
    (glance.py: the runs' `dlas.pareto` tags and names, the study run's description)."""
    from . import glance
    trials = load_trials(tracking_uri, experiment)
    write(trials, out_dir, running)
    glance.show_front(MlflowClient(tracking_uri=tracking_uri), trials)
    return trials
