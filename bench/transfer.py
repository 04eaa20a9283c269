"""Transfer-tuning: how much of tuning's speed-up a model gets from another model's records,
with no tuning trials of its own.

    python bench/transfer.py                    # 128 trials, resnet18 at 32x32 on digits
    python bench/transfer.py --trials 1000      # the issue's budget (about 20 min per model)

A database is tuned on the unpruned resnet18 only (`--trials` MetaSchedule trials). Then each
variant, resnet18 channel-pruned at 0.25 / 0.5 / 0.75 and resnet34 (new conv shapes all), is
built three ways, in one process, one after the other:

- untuned: TVM's default lowering;
- transferred: `compiler.tuner: metaschedule` on a copy of the resnet18-only database with
  zero new trials (gates.Gates(tuning_left=0)): its tasks have no record of their own, so each
  gets the best schedule transfer-tuning finds among resnet18's records, or the default;
- tuned from scratch: `--trials` trials into a fresh database.

Each build is timed by the pipeline's protocol (medians with 95% intervals, beside PyTorch
eager). The table gives, per variant, the share of tuning's gain that transfer keeps,
(untuned - transferred) / (untuned - tuned), and the tuning time it saves. Results go to
bench/results/transfer.json; docs/benchmarks.md keeps the current table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPACE = """\
study: transfer
seed: 0
space:
  data: {name: digits, image_size: 32, val_fraction: 0.25}
  model: {arch: resnet18, epochs: 1}
  compress: {method: none, ratio: 0.5}
  finetune: {epochs: 0}
  algo: {conv: direct_nhwc}
  compiler: {tuner: none}
  hw: {target: local, threads: 1, repeat: 30, min_repeat_ms: 20}
"""
VARIANTS = [("resnet18 channel 0.25", {"compress.method": "channel", "compress.ratio": 0.25}),
            ("resnet18 channel 0.5", {"compress.method": "channel", "compress.ratio": 0.5}),
            ("resnet18 channel 0.75", {"compress.method": "channel", "compress.ratio": 0.75}),
            ("resnet34", {"model.arch": "resnet34"})]


def build(space, pins: dict, cache, gates=None) -> dict:
    from dlas_search import pipeline
    start = time.perf_counter()
    result = pipeline.run(space.pin(pins).defaults(), cache, gates)
    result.discard_artifacts()  # the model folder a trial's run would have kept
    m = result.metrics
    return {"latency_ms": m["latency_ms"], "ci": [m["latency_ci_low_ms"], m["latency_ci_high_ms"]],
            "torch_ms": m.get("torch_latency_ms"), "tune_s": m.get("tune_s", 0.0),
            "new_trials": m.get("tuning_new_trials", 0.0), "wall_s": time.perf_counter() - start,
            **{k: m[k] for k in ("tuning_tasks", "tuning_tasks_transferred", "tuning_tasks_own",
                                 "tuning_tasks_default") if k in m}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=128)
    args = parser.parse_args()
    from dlas_search.cache import StageCache
    from dlas_search.gates import Gates
    from dlas_search.hardware import cpu_model
    from dlas_search.space import load_space
    with tempfile.TemporaryDirectory(prefix="dlas-transfer-") as tmp:
        tmp = Path(tmp)
        (tmp / "space.yaml").write_text(SPACE)
        space, cache = load_space(tmp / "space.yaml"), StageCache(tmp / "cache")
        tuned = {"compiler.tuner": "metaschedule", "compiler.trials": args.trials}
        base = build(space, {**tuned, "compiler.database": str(tmp / "base")}, cache)
        print(f"resnet18 tuned with {args.trials} trials: {base['latency_ms']:.3f} ms "
              f"({base['tune_s']:.0f} s of tuning)", file=sys.stderr)
        rows = []
        for name, pins in VARIANTS:
            row = {"variant": name, "untuned": build(space, pins, cache)}
            shutil.copytree(tmp / "base", tmp / f"copy-{len(rows)}")
            row["transferred"] = build(space, {**pins, **tuned, "compiler.database": str(
                tmp / f"copy-{len(rows)}")}, cache, Gates({}, tuning_left=0))
            row["scratch"] = build(space, {**pins, **tuned, "compiler.database": str(
                tmp / f"scratch-{len(rows)}")}, cache)
            u, t, s = (row[k]["latency_ms"] for k in ("untuned", "transferred", "scratch"))
            row["kept_share"] = (u - t) / (u - s) if u != s else float("nan")
            rows.append(row)
            print(f"  {name}: untuned {u:.3f}, transferred {t:.3f}, scratch {s:.3f} ms: "
                  f"{row['kept_share']:.2f} of the gain", file=sys.stderr)
    machine = f"{cpu_model()}, {os.cpu_count()} CPUs, 1 thread"
    print(f"\n# bench/transfer.py --trials {args.trials} ({machine}, "
          f"{datetime.date.today()})\n")
    print(f"Database tuned on unpruned resnet18 only: {base['latency_ms']:.3f} ms, "
          f"{base['tune_s']:.0f} s of tuning. Latency in ms (95% interval).\n")
    print("| variant | untuned | transferred (0 trials) | tasks own / transferred / default "
          "| from scratch | share of the gain kept | tuning s: transfer / scratch |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        u, t, s = row["untuned"], row["transferred"], row["scratch"]
        tasks = "/".join(f"{t.get(k, 0):.0f}" for k in ("tuning_tasks_own",
                                                        "tuning_tasks_transferred",
                                                        "tuning_tasks_default"))
        print(f"| {row['variant']} | {u['latency_ms']:.3f} | {t['latency_ms']:.3f} "
              f"[{t['ci'][0]:.3f}, {t['ci'][1]:.3f}] | {tasks} | {s['latency_ms']:.3f} | "
              f"{row['kept_share']:.2f} | {t['tune_s']:.0f} / {s['tune_s']:.0f} |")
    out = ROOT / "bench" / "results" / "transfer.json"
    out.write_text(json.dumps({"trials": args.trials, "machine": machine,
                               "date": str(datetime.date.today()), "base": base,
                               "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
