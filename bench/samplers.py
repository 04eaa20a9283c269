"""Search efficiency of the samplers: how much of the full grid's hypervolume each sampler finds
after 10%, 25% and 50% of the grid's trials.

The small real space bench/samplers.yaml (32 configurations) is run once, in full, through the
real tool (`run_search` with the `grid` sampler; Optuna study, MLflow experiment and stage cache
under bench/results/samplers-stores/). Its per-configuration results are kept in
bench/results/samplers-grid.json, so later runs replay without running a trial.

Replay: for each sampler (search.make_sampler on the space, so our real sampler settings) and
seed, an in-memory Optuna study whose objective suggests through Space.suggest, prunes what the
real search prunes (infeasible configurations, repeats of a finished one: not counted) and
returns the cached values. After k counted trials, the hypervolume of what was found over the
full grid's hypervolume, both normalised once over the full grid (best 0, worst 1, reference
point 1.1 in every objective; pareto.hypervolume).

    python bench/samplers.py                       # grid once (cached), then the replay
    python bench/samplers.py --seeds 10 --populations 4,8
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import optuna

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dlas_search import pareto, search  # noqa: E402
from dlas_search.objective import config_of  # noqa: E402
from dlas_search.space import Space, load_space  # noqa: E402

HERE = Path(__file__).resolve().parent
SPACE = HERE / "samplers.yaml"
RESULTS = HERE / "results"
STORES = RESULTS / "samplers-stores"   # git-ignored: Optuna/MLflow databases, stage cache
GRID = RESULTS / "samplers-grid.json"
SAMPLERS = ("tpe", "nsga2", "random", "qmc", "grid")
BUDGETS = (0.10, 0.25, 0.50, 1.00)


config_key = search.config_key  # the key the real search uses to spot repeats


# --- the full grid, once ---------------------------------------------------------------------

def grid_stores() -> dict:
    return {"storage": f"sqlite:///{STORES / 'optuna.db'}",
            "tracking_uri": f"sqlite:///{STORES / 'mlflow.db'}",
            "out_dir": STORES / "pareto", "cache_dir": STORES / "cache"}


def run_grid(space: Space, worker_only: bool = False) -> dict | None:
    """Every configuration of the space through the real tool; saves and returns the results.
    More processes may run it at once on the same study (`worker_only`: run, save nothing)."""
    STORES.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    search.run_search(space, **grid_stores())
    if worker_only:
        return None
    return collect(space, time.perf_counter() - start)


def collect(space: Space, wall_s: float | None = None) -> dict:
    """The grid study's trials that ran (not those pruned unrun), saved as GRID."""
    study = optuna.load_study(study_name=space.study, storage=grid_stores()["storage"])
    rows = []
    for t in study.trials:
        if config_of(t) is None:  # pruned before any work (infeasible or a repeat)
            continue
        row = {"trial": t.number, "config": config_of(t), "state": t.state.name,
               "trial_s": (t.datetime_complete - t.datetime_start).total_seconds()
               if t.datetime_complete else None}
        if t.state == optuna.trial.TrialState.COMPLETE:
            row["values"] = dict(zip(space.objectives, t.values))
        else:
            row["error"] = t.user_attrs.get("error", "")
        rows.append(row)
    if wall_s is None:
        wall_s = (max(t.datetime_complete for t in study.trials if t.datetime_complete) -
                  min(t.datetime_start for t in study.trials)).total_seconds()
    grid = {"space": str(SPACE.relative_to(ROOT)), "space_text": space.text,
            "objectives": space.objectives, "size": space.size(),
            "wall_s": round(wall_s, 1), "rows": rows}
    GRID.write_text(json.dumps(grid, indent=1))
    return grid


def load_grid(space: Space, rerun: bool = False) -> dict:
    if GRID.exists() and not rerun:
        grid = json.loads(GRID.read_text())
        if grid["space_text"] != space.text:
            sys.exit(f"{GRID} was made from another version of {SPACE.name}; "
                     "run with --rerun-grid to run the grid again")
        return grid
    return run_grid(space)


# --- the replay ------------------------------------------------------------------------------

class Normaliser:
    """Costs (all minimised) scaled over the full grid: best 0, worst 1; reference 1.1."""

    def __init__(self, values: np.ndarray, directions: list[str]):
        self.signs = np.array([-1.0 if d == "maximize" else 1.0 for d in directions])
        costs = values * self.signs
        self.low, high = costs.min(axis=0), costs.max(axis=0)
        self.span = np.where(high > self.low, high - self.low, 1.0)
        self.reference = np.full(len(directions), 1.1)

    def hypervolume(self, values) -> float:
        if len(values) == 0:
            return 0.0
        costs = (np.asarray(values, dtype=float) * self.signs - self.low) / self.span
        return pareto.hypervolume(costs, self.reference)


class _Replay:
    """The real search's objective (objective.Objective) with the pipeline replaced by the
    cached grid: same suggest, same pruning of infeasible configurations and repeats."""

    def __init__(self, space: Space, cached: dict[str, list[float] | None]):
        self.space, self.cached = space, cached

    def __call__(self, trial: optuna.Trial) -> list[float]:
        key = config_key(search.suggest_new(self.space, trial))  # the search's own pruning
        if key not in self.cached:
            raise KeyError(f"configuration not in the grid's results: {key}")
        values = self.cached[key]
        if values is None:  # it failed in the grid run: it fails here too (and counts)
            raise RuntimeError("failed in the grid run")
        return values


class _Counted:
    """search._Budget without its progress bar: stop after `trials` counted trials (complete
    or failed; pruned ones do not count) or `max_skipped` pruned samples in a row."""

    def __init__(self, trials: int, max_skipped: int = 30):
        self.trials, self.max_skipped = trials, max_skipped
        self.ran = self.skipped = 0

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if {"duplicate_of", "infeasible"} & set(trial.user_attrs):
            self.skipped += 1
        else:
            self.ran += 1
            self.skipped = 0
        if self.ran >= self.trials or self.skipped >= self.max_skipped:
            study.stop()


def replay(space: Space, cached: dict[str, list[float] | None], sampler: str, seed: int,
           trials: int, population: int) -> list[list[float] | None]:
    """One sampler, one seed: the values of the counted trials in order (None: failed)."""
    settings = {"name": sampler}
    if sampler == "nsga2":
        settings["population_size"] = population
    seeded = dataclasses.replace(space, seed=seed, sampler=settings)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(directions=space.directions,
                                sampler=search.make_sampler(seeded, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study.optimize(_Replay(seeded, cached), catch=(RuntimeError,),
                       callbacks=[_Counted(trials)])
    counted = [t for t in study.trials if config_of(t) is not None]
    return [list(t.values) if t.state == optuna.trial.TrialState.COMPLETE else None
            for t in counted]


def fractions(found: list[list[float] | None], budgets: list[int], norm: Normaliser,
              full: float) -> list[float]:
    """Hypervolume of the first k counted trials over the full grid's, for each k."""
    out = []
    for k in budgets:
        values = [v for v in found[:k] if v is not None]
        out.append(norm.hypervolume(values) / full)
    return out


def evaluate(space: Space, grid: dict, samplers, seeds: int, populations=(4,),
             budgets=BUDGETS) -> dict:
    """Row label -> budget fraction -> hypervolume fractions, one per seed (nsga2: a row per
    population size); also how many runs stopped short of the largest budget."""
    cached = {row["config"]: ([row["values"][m] for m in space.objectives]
                              if row["state"] == "COMPLETE" else None)
              for row in grid["rows"]}
    if len(cached) != space.size():
        sys.exit(f"the grid's results hold {len(cached)} distinct configurations; the space has "
                 f"{space.size()}: run the missing ones (--grid-worker), then --collect")
    done = np.array([v for v in cached.values() if v is not None])
    norm = Normaliser(done, space.directions)
    full = norm.hypervolume(done)
    counts = [max(1, round(b * len(cached))) for b in budgets]
    table, short = {}, {}
    for name in samplers:
        for population in (populations if name == "nsga2" else (None,)):
            label = f"nsga2 (population {population})" if population else name
            per_seed = []
            for seed in range(seeds):
                found = replay(space, cached, name, seed, max(counts), population)
                short[label] = short.get(label, 0) + (len(found) < max(counts))
                per_seed.append(fractions(found, counts, norm, full))
            table[label] = {b: [s[i] for s in per_seed] for i, b in enumerate(budgets)}
    return {"table": table, "counts": dict(zip(budgets, counts)), "grid": len(cached),
            "stopped_short": short}


# --- report ----------------------------------------------------------------------------------

def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def write_report(result: dict, seeds: int) -> str:
    budgets, table = list(result["counts"]), result["table"]
    header = ["sampler", *(f"{b:.0%} ({result['counts'][b]} trials)" for b in budgets)]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name, row in table.items():
        lines.append("| " + " | ".join([name, *(summary(row[b]) for b in budgets)]) + " |")
    text = "\n".join(lines)
    with open(RESULTS / "samplers.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sampler", "budget_fraction", "trials", "seeds", "median", "min",
                         "max"])
        for name, row in table.items():
            for b in budgets:
                writer.writerow([name, b, result["counts"][b], seeds,
                                 f"{statistics.median(row[b]):.4f}", f"{min(row[b]):.4f}",
                                 f"{max(row[b]):.4f}"])
    plot(result, seeds, RESULTS / "samplers.png")
    return text


def plot(result: dict, seeds: int, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = list(result["counts"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, row in result["table"].items():
        med = [statistics.median(row[b]) for b in budgets]
        ax.errorbar([100 * b for b in budgets], med, capsize=3, marker="o", label=name,
                    yerr=[[m - min(row[b]) for m, b in zip(med, budgets)],
                          [max(row[b]) - m for m, b in zip(med, budgets)]])
    ax.axhline(0.95, color="grey", linestyle=":", label="target 0.95")
    ax.set_xlabel(f"budget (% of the {result['grid']}-configuration grid)")
    ax.set_ylabel("hypervolume / full grid's")
    ax.set_title(f"Search efficiency: median, min-max over {seeds} seeds")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--populations", default="4,8",
                        help="NSGA-II population sizes to replay (a row each)")
    parser.add_argument("--samplers", default=",".join(SAMPLERS))
    parser.add_argument("--rerun-grid", action="store_true",
                        help="run the full grid again (otherwise its saved results are used)")
    parser.add_argument("--grid-only", action="store_true")
    parser.add_argument("--grid-worker", action="store_true",
                        help="one more process on the grid study (saves nothing)")
    parser.add_argument("--collect", action="store_true",
                        help="save the grid study's results as they are (after workers)")
    args = parser.parse_args(argv)
    space = load_space(SPACE)
    if args.grid_worker:
        run_grid(space, worker_only=True)
        return
    grid = collect(space) if args.collect else load_grid(space, args.rerun_grid)
    failed = sum(row["state"] != "COMPLETE" for row in grid["rows"])
    print(f"grid: {len(grid['rows'])} configurations ({failed} failed), run once in "
          f"{grid['wall_s']:.0f} s; results in {GRID.relative_to(ROOT)}")
    if args.grid_only:
        return
    result = evaluate(space, grid, args.samplers.split(","), args.seeds,
                      [int(p) for p in args.populations.split(",")])
    print(write_report(result, args.seeds))
    for label, n in result["stopped_short"].items():
        if n:
            print(f"{label}: {n} of {args.seeds} runs stopped before "
                  f"{max(result['counts'].values())} trials (30 pruned samples in a row: the "
                  "real search's rule for an exhausted space)")
    print(f"hypervolume fraction: median (min-max) over {args.seeds} seeds; written to "
          f"{(RESULTS / 'samplers.csv').relative_to(ROOT)} and samplers.png")


if __name__ == "__main__":
    main()
