"""How far a busy neighbour moves the front, with and without confirmation.

The same study runs twice: once on a quiet machine, once beside `--burners` processes that
each keep a CPU busy (started before the study, stopped after its confirmation). The second
run evaluates exactly the configurations of the first (enqueued in the same order) and shares
its stage cache, so only the timings differ. For both runs the front is taken twice: from the
search's own latencies, and after `confirm` (the candidates timed again side by side). Reported:

- membership: the configurations on both fronts / on either (Jaccard), and which differ;
- ordering: of the pairs of configurations on both fronts, the share whose latencies are in
  the same order in both runs; and among the pairs whose 95% intervals do not overlap in
  either run (the pairs the tool claims to order), how many disagree (target: none);
- the widths of the intervals of the quiet run's front (relative to the median).

A second table measures what the timing lock cannot remove: one model timed alone, then beside
a neighbour that trains a network on another CPU (memory bandwidth and last-level cache).

    python bench/neighbour.py                      # spaces/quickstart.yaml, 2 burners
    python bench/neighbour.py --burners 1 --trials 8
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BURN = "while True: pass"
TRAIN = """
import os, torch, torchvision
os.sched_setaffinity(0, {cpus})
torch.set_num_threads(1)
model = torchvision.models.resnet18(num_classes=10)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
x, y = torch.randn(16, 3, 64, 64), torch.randint(0, 10, (16,))
while True:
    opt.zero_grad(); torch.nn.functional.cross_entropy(model(x), y).backward(); opt.step()
"""


def start(code: str, count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(count)]


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
        p.wait()


def run_study(space_path: Path, folder: Path, cache: Path, trials: int, rounds: int,
              enqueue: list[dict] | None) -> dict:
    """One study in `folder`'s stores; returns its fronts before and after confirmation."""
    import optuna

    from dlas_search import pareto
    from dlas_search.confirm import confirm
    from dlas_search.search import run_search
    from dlas_search.space import load_space

    storage, uri = f"sqlite:///{folder / 'optuna.db'}", f"sqlite:///{folder / 'mlflow.db'}"
    space = load_space(space_path)
    if enqueue:  # the quiet run's configurations, in its order
        study = optuna.create_study(study_name=space.study, storage=storage,
                                    directions=space.directions)
        for params in enqueue:
            study.enqueue_trial(params)
    run_search(space, trials=trials, storage=storage, tracking_uri=uri, cache_dir=cache,
               out_dir=folder / "pareto-search", confirm_rounds=0)
    before = pareto.load_trials(uri, space.study)
    result = confirm(uri, space.study, cache, rounds, say=lambda line: None)
    after = pareto.load_trials(uri, space.study)
    study = optuna.load_study(study_name=space.study, storage=storage)
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    return {"params": [t.params for t in sorted(done, key=lambda t: t.number)],
            "search": fronts(before), "confirmed": fronts(after),
            "confirm_s": result.seconds, "other_cpu": [
                r["metrics"].get("timing_other_cpu", 0.0) for r in before.rows],
            "attempts": [r["metrics"].get("timing_attempts", 1.0) for r in before.rows]}


def key(row: dict) -> str:
    return row["name"].split(" ", 1)[1]  # the configuration label, without "#<trial>"


def fronts(trials) -> dict:
    from dlas_search.confidence import interval

    return {key(row): {"latency": row["metrics"]["latency_ms"],
                       "ci": interval(row["metrics"], "latency_ms")}
            for row in trials.front()}


def compare(a: dict, b: dict) -> dict:
    """Membership and ordering agreement of two fronts {config: {latency, ci}}."""
    both, either = set(a) & set(b), set(a) | set(b)
    pairs = list(itertools.combinations(sorted(both), 2))
    same = [p for p in pairs if (a[p[0]]["latency"] < a[p[1]]["latency"])
            == (b[p[0]]["latency"] < b[p[1]]["latency"])]
    separated = [p for p in pairs if all(
        x[p[0]]["ci"][1] < x[p[1]]["ci"][0] or x[p[1]]["ci"][1] < x[p[0]]["ci"][0]
        for x in (a, b))]
    return {"jaccard": len(both) / max(len(either), 1), "on_both": len(both),
            "on_either": len(either), "only_quiet": sorted(set(a) - set(b)),
            "only_noisy": sorted(set(b) - set(a)),
            "order_agree": f"{len(same)}/{len(pairs)}",
            "separated_disagree": f"{sum(p not in same for p in separated)}/{len(separated)}"}


def training_neighbour(repeats: int) -> dict:
    """resnet18 32x32 untuned direct, timed alone / beside a training neighbour on another CPU
    (the timing on the first CPU, pinned), interleaved; medians of the protocol's medians."""
    import torch
    import torchvision

    from dlas_search import algorithms, compiler, hardware

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return {"skipped": "one CPU: no other CPU for the neighbour"}
    model = torchvision.models.resnet18(num_classes=10).eval()
    example = torch.randn(1, 3, 32, 32)
    built = compiler.compile(model, example, algorithms.plan(algorithms.AlgoConfig()),
                             compiler.CompilerConfig(), hardware.resolve(
                                 hardware.HardwareConfig(threads=1)).target)
    cfg = hardware.HardwareConfig(threads=1, repeat=20, min_repeat_ms=20)
    out = {"alone": [], "beside a training neighbour": []}
    for _ in range(repeats):
        out["alone"].append(hardware.time_tvm(built.executable, example, cfg, 1).median_ms)
        neighbour = start(TRAIN.format(cpus=set(cpus[1:])), 1)
        time.sleep(3)  # past its start-up
        try:
            out["beside a training neighbour"].append(
                hardware.time_tvm(built.executable, example, cfg, 1).median_ms)
        finally:
            stop(neighbour)
    return {k: (statistics.median(v), min(v), max(v)) for k, v in out.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--space", default=str(ROOT / "spaces" / "quickstart.yaml"))
    p.add_argument("--trials", type=int, default=None)
    p.add_argument("--burners", type=int, default=os.cpu_count() or 2)
    p.add_argument("--rounds", type=int, default=5, help="confirmation rounds")
    p.add_argument("--repeats", type=int, default=5, help="of the training-neighbour table")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from dlas_search.hardware import cpu_model
    from dlas_search.space import load_space

    out = Path(args.out or tempfile.mkdtemp(prefix="dlas-neighbour-"))
    cache = out / "cache"
    trials = args.trials or load_space(args.space).trials
    (out / "quiet").mkdir(parents=True, exist_ok=True)
    (out / "noisy").mkdir(parents=True, exist_ok=True)
    start_s = time.perf_counter()
    quiet = run_study(Path(args.space), out / "quiet", cache, trials, args.rounds, None)
    burners = start(BURN, args.burners)
    try:
        noisy = run_study(Path(args.space), out / "noisy", cache, len(quiet["params"]),
                          args.rounds, quiet["params"])
    finally:
        stop(burners)
    report = {
        "machine": f"{cpu_model()}, {os.cpu_count()} CPUs", "space": args.space,
        "burners": args.burners, "trials": len(quiet["params"]),
        "without confirmation": compare(quiet["search"], noisy["search"]),
        "with confirmation": compare(quiet["confirmed"], noisy["confirmed"]),
        "quiet front CI width (% of median)": {
            k: round(100 * (v["ci"][1] - v["ci"][0]) / v["latency"], 1)
            for k, v in quiet["confirmed"].items()},
        "noisy other_cpu (median)": statistics.median(noisy["other_cpu"]),
        "noisy timing attempts (median)": statistics.median(noisy["attempts"]),
        "fronts": {"quiet": quiet, "noisy": noisy},
        "training neighbour (ms: median, min, max)": training_neighbour(args.repeats),
        "wall_s": time.perf_counter() - start_s}
    (out / "neighbour.json").write_text(json.dumps(report, indent=1, default=str))
    shown = {k: v for k, v in report.items() if k != "fronts"}
    print(json.dumps(shown, indent=1, default=str))
    print(f"-> {out / 'neighbour.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
