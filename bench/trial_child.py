"""What a per-trial limit costs: one trial in-process against the same trial in a spawned child
process (budget.trial_timeout_s / trial_memory_mb), side by side in interleaved rounds (each
round runs both), with a warm stage cache so a trial is compile + measure. Reports medians of
the wall time per trial and the min-max spread over rounds, and the child's overhead.

    python bench/trial_child.py --space spaces/quickstart.yaml --rounds 5
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from dlas_search import faults, pipeline
from dlas_search.cache import StageCache
from dlas_search.space import load_space


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} s (min {min(values):.2f}, max {max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="spaces/quickstart.yaml")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cache-dir", default=None, help="stage cache (default: a temp dir)")
    args = parser.parse_args()
    config = load_space(args.space).defaults()
    root = args.cache_dir or tempfile.mkdtemp(prefix="dlas-bench-cache-")
    cache = StageCache(root)
    pipeline.run(config, cache).discard_artifacts()  # warm the cache (and this process)
    limits = faults.Limits(timeout_s=3600)
    times: dict[str, list[float]] = {"in-process": [], "child": []}
    for round_ in range(args.rounds):
        for name in times:
            start = time.perf_counter()
            if name == "child":
                result = faults.run_limited(pipeline.run, config, root, limits)
            else:
                result = pipeline.run(config, cache)
            times[name].append(time.perf_counter() - start)
            result.discard_artifacts()
        print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in
                                                  times.items()), flush=True)
    print(f"config: {config.summary()}")
    for name, values in times.items():
        print(f"{name:>10}: {spread(values)} over {len(values)} rounds")
    overhead = [c - i for c, i in zip(times["child"], times["in-process"])]
    print(f"  overhead: {spread(overhead)} per trial (child - in-process, same round)")


if __name__ == "__main__":
    main()
