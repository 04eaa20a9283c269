"""What spending the budget by promise buys: the same study run twice, side by side in one
invocation, with and without a mechanism of docs/budget.md, and compared.

    python bench/spend.py gates                        # the fine-tune gate, on the quick start
    python bench/spend.py fidelity                     # tuning in rounds vs full fidelity
    python bench/spend.py fidelity --space S --arms A.yaml B.yaml

Each arm is a `dlas search` in a folder of its own (its own Optuna and MLflow stores, its own
stage cache and tuning database: nothing is shared), one after the other, with
`--confirm-rounds 0`. For each arm: wall time, trials that ran, the seconds its trials spent
compiling, tuning and timing, and the hypervolume of its feasible front against wall time
(every objective scaled over the union of both arms' trials, so the two are comparable).

`gates`: the space as it is (the fine-tune gate on) against the same space with
`gates: {finetune: false}`. The gate's saving is also read from the ungated arm alone: the
compile, tune and measure seconds of its trials whose accuracy broke a threshold after
fine-tuning are exactly what the gate would not have spent on them.

`fidelity`: `--arms` gives the two spaces (default: bench/fidelity.yaml with its
`budget.tuning_rounds`, and the same space with every tuned configuration at the rounds'
`max` trials).

The result goes to bench/results/spend-<what>.json and the table to stdout (docs/benchmarks.md
keeps the current one).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
STAGES = ("compile_s", "tune_s", "measure_s")


def run_arm(name: str, doc: dict, folder: Path, extra: list[str]) -> dict:
    """One `dlas search` of the space `doc` in `folder`; its wall time and trial runs."""
    from mlflow.tracking import MlflowClient
    folder.mkdir(parents=True)
    space = folder / "space.yaml"
    space.write_text(yaml.safe_dump(doc, sort_keys=False))
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "dlas_search", "search", "--space", str(space),
                           "--cache-dir", str(folder / "cache"), "--confirm-rounds", "0",
                           *extra], cwd=folder, capture_output=True, text=True)
    wall = time.monotonic() - start
    if done.returncode:
        raise SystemExit(f"arm {name} failed:\n{done.stderr[-3000:]}")
    client = MlflowClient(f"sqlite:///{folder / 'tracking' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(doc["study"])
    runs = client.search_runs([experiment.experiment_id], "tags.`dlas.role` = 'trial'",
                              max_results=10000)
    parent = client.search_runs([experiment.experiment_id], "tags.`dlas.role` = 'study'")[0]
    origin = parent.info.start_time / 1000
    trials = [{"name": r.info.run_name, "status": r.info.status, "run_id": r.info.run_id,
               "end_s": (r.info.end_time or r.info.start_time) / 1000 - origin,
               "metrics": dict(r.data.metrics), "stopped": "dlas.stopped_at" in r.data.tags,
               "superseded_by": r.data.tags.get("dlas.superseded_by"),
               "feasible": r.data.tags.get("dlas.feasible", "true") == "true"}
              for r in runs]
    print(f"  arm {name}: {wall:.0f} s, {len(trials)} trial runs", file=sys.stderr)
    return {"name": name, "wall_s": wall, "trials": trials, "log": done.stderr[-4000:]}


def hypervolume_curve(arm: dict, objectives: dict, low: np.ndarray, span: np.ndarray) -> list:
    """(seconds since the study started, hypervolume of the feasible front so far), a point
    per finished trial; a superseded round's numbers count until the extension replaces them."""
    from dlas_search.dominance import hypervolume, non_dominated
    signs = np.array([-1.0 if d == "maximize" else 1.0 for d in objectives.values()])
    timed = sorted((t for t in arm["trials"] if t["status"] == "FINISHED"),
                   key=lambda t: t["end_s"])
    curve = []
    for i, trial in enumerate(timed):
        now = timed[: i + 1]
        finished = {t["run_id"] for t in now}
        rows = [t for t in now if t["feasible"] and not t["stopped"] and
                all(m in t["metrics"] for m in objectives) and
                t["superseded_by"] not in finished]  # replaced once its extension is done
        if not rows:
            curve.append((trial["end_s"], 0.0))
            continue
        values = np.array([[t["metrics"][m] for m in objectives] for t in rows])
        front = values[non_dominated(values, list(objectives.values()))]
        costs = (front * signs - low) / span
        curve.append((trial["end_s"], hypervolume(costs, np.full(len(objectives), 1.1))))
    return curve


def scale(arms: list[dict], objectives: dict) -> tuple[np.ndarray, np.ndarray]:
    signs = np.array([-1.0 if d == "maximize" else 1.0 for d in objectives.values()])
    values = np.array([[t["metrics"][m] for m in objectives] for arm in arms
                       for t in arm["trials"] if all(m in t["metrics"] for m in objectives)])
    costs = values * signs
    low, high = costs.min(axis=0), costs.max(axis=0)
    return low, np.where(high > low, high - low, 1.0)


def spent(arm: dict) -> dict:
    return {stage: sum(t["metrics"].get(stage, 0.0) for t in arm["trials"]) for stage in STAGES}


def gate_counterfactual(arm: dict, thresholds: dict) -> float:
    """Seconds of compiling, tuning and timing the ungated arm spent on trials the gate would
    have stopped (a threshold on a metric known after fine-tuning broken)."""
    from dlas_search.gates import Gates
    gates = Gates(thresholds)
    return sum(sum(t["metrics"].get(s, 0.0) for s in STAGES) for t in arm["trials"]
               if gates.after_finetune(t["metrics"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("gates", "fidelity"))
    parser.add_argument("--space", default=None)
    parser.add_argument("--arms", nargs=2, default=None, metavar="SPACE")
    parser.add_argument("--trials", type=int, default=None)
    args = parser.parse_args()
    from dlas_search.hardware import cpu_model
    extra = ["--trials", str(args.trials)] if args.trials else []
    if args.what == "gates":
        doc = yaml.safe_load(Path(args.space or ROOT / "spaces" / "quickstart.yaml").read_text())
        doc.pop("targets", None)
        docs = {"gate on": doc, "gate off": {**doc, "gates": {"finetune": False}}}
    else:
        path = Path(args.arms[0] if args.arms else args.space or ROOT / "bench" / "fidelity.yaml")
        doc = yaml.safe_load(path.read_text())
        if args.arms:
            other = yaml.safe_load(Path(args.arms[1]).read_text())
        else:
            rounds = doc["budget"]["tuning_rounds"]
            other = json.loads(json.dumps(doc))
            del other["budget"]["tuning_rounds"]
            other["space"]["compiler"]["trials"] = rounds["max"]
        docs = {"rounds": doc, "full fidelity": other}
    with tempfile.TemporaryDirectory(prefix="dlas-spend-") as tmp:
        arms = [run_arm(name, d, Path(tmp) / name.replace(" ", "_"), extra)
                for name, d in docs.items()]
    objectives = doc.get("objectives") or {"accuracy": "maximize", "latency_ms": "minimize",
                                           "size_mb": "minimize"}
    low, span = scale(arms, objectives)
    result = {"what": args.what, "date": datetime.date.today().isoformat(),
              "machine": f"{cpu_model()}, {os.cpu_count()} CPUs", "arms": []}
    print(f"\n# bench/spend.py {args.what} ({result['machine']}, {result['date']})\n")
    print("| arm | wall | trial runs | stopped | compile s | tune s | measure s | "
          "final hypervolume |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
    for arm in arms:
        curve = hypervolume_curve(arm, objectives, low, span)
        stages = spent(arm)
        entry = {"name": arm["name"], "wall_s": arm["wall_s"], "runs": len(arm["trials"]),
                 "stopped": sum(t["stopped"] for t in arm["trials"]), **stages,
                 "hypervolume": curve[-1][1] if curve else 0.0, "curve": curve,
                 "trials": [{**{k: t[k] for k in ("name", "status", "end_s", "stopped",
                                                   "superseded_by", "feasible", "run_id")},
                             "metrics": {m: v for m, v in t["metrics"].items() if m in (
                                 *objectives, *STAGES, "tuning_new_trials", "trial_s",
                                 "tuning_tasks_own", "tuning_tasks_transferred",
                                 "tuning_tasks_default", "untuned_latency_ms")}}
                            for t in arm["trials"]]}
        result["arms"].append(entry)
        print(f"| {arm['name']} | {arm['wall_s']:.0f} s | {entry['runs']} | {entry['stopped']} "
              f"| {stages['compile_s']:.0f} | {stages['tune_s']:.0f} | "
              f"{stages['measure_s']:.0f} | {entry['hypervolume']:.4f} |")
    a, b = result["arms"]
    print(f"\nwall time {a['name']} / {b['name']}: {a['wall_s'] / b['wall_s']:.2f}; "
          f"hypervolume ratio {a['hypervolume'] / max(b['hypervolume'], 1e-12):.3f}")
    if args.what == "gates":
        saved = gate_counterfactual(arms[1], doc.get("thresholds") or {})
        total = sum(spent(arms[1]).values())
        result["gate_saves_s"], result["ungated_stage_s"] = saved, total
        print(f"in the ungated arm, {saved:.0f} s of its {total:.0f} s of compiling, tuning "
              f"and timing went to trials the gate stops ({saved / max(total, 1e-9):.0%})")
    else:  # the rounds arm's hypervolume at the moment the full arm ended, and vice versa
        cut = min(a["wall_s"], b["wall_s"])
        at = {e["name"]: max([h for s, h in e["curve"] if s <= cut] or [0.0])
              for e in result["arms"]}
        result["hypervolume_at_shorter_wall"] = {"seconds": cut, **at}
        print(f"at {cut:.0f} s (the shorter arm's wall time): " +
              ", ".join(f"{k} {v:.4f}" for k, v in at.items()))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"spend-{args.what}.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
