"""The performance ledger: a fixed matrix of small builds, timed beside PyTorch eager, compared
with the committed table and, side by side in the same run, with another git revision.

A change measured on one path can slow another (the HWIO weights made the tuned 224x224 builds
faster and the untuned NHWC ones 2-8x slower, and nothing noticed). The ledger times every
path a trial can take at a small size, in a few minutes:

- the matrix is bench/ledger.yaml (resnet18 at 32x32, untrained, one thread): every conv
  primitive x fp32 / int8 / fp16 dense, and x sparse (90% unstructured pruning), untuned; and
  a short tuned row (MetaSchedule, `--trials` trials, a fresh database) for fp32 and int8 in
  `direct_nhwc`;
- each revision builds the matrix through its own `dlas search` (a grid study; the command
  line is the contract every revision keeps), in its own process, both at once, except the
  tuned rows, which one revision tunes after the other (tuning times candidates); the
  libraries come from the runs' MLflow Models (or, from older revisions, their `model/model.so`
  artifacts);
- then one process times every library of every revision and each row's PyTorch eager
  baseline, interleaved in `--rounds` rounds under the timing lock, so drift hits all alike;
- each row's ratio TVM / PyTorch is compared with bench/results/ledger.md (committed, with
  the CPU it ran on): rows more than 15% worse are printed first. Since the CPU changes
  between sessions, `--against REV` (a git worktree of REV) is the comparison to trust: the
  same matrix at REV, timed in the same rounds; rows where this tree is more than 15% slower
  than REV (and the intervals do not overlap) are printed first.

    python bench/ledger.py                          # this tree against the committed table
    python bench/ledger.py --against fd04f10~1      # and side by side with a revision
    python bench/ledger.py --write                  # make the result the committed table
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPACE = ROOT / "bench" / "ledger.yaml"
TABLE = ROOT / "bench" / "results" / "ledger.md"
DATA = ROOT / "bench" / "results" / "ledger.json"
WORSE = 1.15  # a row 15% worse than its reference is a regression
TUNING = threading.Lock()  # the revisions build at once, but tune one after the other
TUNED = ["--set", "compiler.tuner=metaschedule", "--set", "algo.conv=direct_nhwc",
         "--set", "compress.method=[none, int8]"]


def row_key(params: dict) -> str:
    """`int8 direct_nhwc dense untuned`: what a row is, from its run's parameters."""
    method = params.get("compress.method", "none")
    precision = {"none": "fp32", "unstructured": "fp32"}.get(method, method)
    fmt = params.get("algo.format", "dense")
    fmt = "dense" if fmt in ("-", "dense") else fmt
    tuned = "tuned" if params.get("compiler.tuner") == "metaschedule" else "untuned"
    return f"{precision} {params.get('algo.conv')} {fmt} {tuned}"


def build(label: str, tree: Path, out: Path, trials: int, convs: list[str] | None,
          which: tuple[bool, bool], log) -> dict[str, dict]:
    """Build the matrix with the revision in `tree`; {row: {"library": path} or {"error":}}."""
    folder = out / label
    folder.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONUNBUFFERED": "1"}
    common = ["--space", str(SPACE), "--tracking-uri", uri, "--storage",
              f"sqlite:///{folder / 'optuna.db'}", "--cache-dir", str(folder / "cache"),
              "--out", str(folder / "pareto")]
    helptext = subprocess.run([sys.executable, "-m", "dlas_search", "search", "--help"],
                              cwd=tree, env=env, capture_output=True, text=True).stdout
    if "--confirm-rounds" in helptext:
        common += ["--confirm-rounds", "0"]
    only = ["--set", f"algo.conv=[{', '.join(convs)}]"] if convs else []
    runs = [("ledger", only), ("ledger-tuned",
                             TUNED + ["--set", f"compiler.trials={trials}", "--set",
                                      f"compiler.database={folder / 'tuning'}"])]
    for (study, extra), wanted in zip(runs, which):  # (untuned, tuned)
        if not wanted:
            continue
        # tuning measures candidates: one revision tunes at a time, never beside the other
        with TUNING if study == "ledger-tuned" else contextlib.nullcontext():
            log(f"[{label}] building {study} at {tree}")
            with open(folder / f"{study}.log", "w") as f:
                subprocess.run([sys.executable, "-m", "dlas_search", "search", *common,
                                "--study", study, *extra], cwd=tree, env=env, stdout=f,
                               stderr=subprocess.STDOUT, check=False)
    return libraries(uri, folder)


def libraries(uri: str, folder: Path) -> dict[str, dict]:
    from mlflow.tracking import MlflowClient

    from dlas_search.mlmodel import library_of

    client, found = MlflowClient(uri), {}
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id],
                                      "tags.`dlas.role` = 'trial'", max_results=1000):
            key = row_key(run.data.params)
            if run.info.status != "FINISHED":
                found[key] = {"error": (run.data.tags.get("dlas.error") or run.info.status)[:200]}
                continue
            target = folder / "libraries" / key.replace(" ", "-")
            target.mkdir(parents=True, exist_ok=True)
            path = library_of(client, run, target)
            found[key] = {"library": str(path), "params": dict(run.data.params)}
    return found


def worktree(rev: str, out: Path) -> Path:
    tree = out / f"tree-{rev.replace('/', '_').replace('~', '-')}"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(tree), rev],
                   check=True, capture_output=True)
    return tree


def time_all(built: dict[str, dict[str, dict]], rounds: int, repeat: int, log) -> dict:
    """Time every library and each row's PyTorch baseline, interleaved in rounds; ms samples
    per (row, label) and (row, "torch")."""
    import dataclasses

    import tvm
    from tvm import relax

    from dlas_search import hardware
    from dlas_search.cache import StageCache
    from dlas_search.space import load_space
    from dlas_search.stages import Stages

    here = built["this tree"]
    cells = {}
    for key, entry in sorted(here.items()):
        if "library" not in entry:
            continue
        cfg = load_space(SPACE).logged(entry["params"])
        stages = Stages(cfg, StageCache(Path(entry["library"]).parents[3] / "cache"))
        device = stages.target()
        example = stages.data().example()
        module = stages.compressed().module  # a hit: the search built it
        cells[(key, "torch")] = ("torch", module, example)
        for label, rows in built.items():
            if "library" in rows.get(key, {}):
                executable = relax.VMExecutable(tvm.runtime.load_module(rows[key]["library"]))
                cells[(key, label)] = ("tvm", executable, example)
    hw = dataclasses.replace(load_space(SPACE).defaults().hw, warmup=2, repeat=repeat,
                             min_repeat_ms=20)
    hardware.resolve(hw)
    samples = {cell: [] for cell in cells}
    order = list(cells)
    with hardware.timing_lock(device.name):
        for r in range(rounds):
            log(f"round {r + 1} of {rounds}: {len(order)} timings")
            for cell in order[r % len(order):] + order[:r % len(order)]:
                kind, thing, example = cells[cell]
                timer = hardware.time_tvm if kind == "tvm" else hardware.time_torch
                samples[cell] += timer(thing, example, hw, 1).repeats
    return samples


def summarise(built, samples) -> list[dict]:
    from dlas_search.hardware import median_ci, ratio_ci

    rows = []
    for key in sorted({k for rows in built.values() for k in rows}):
        row = {"row": key}
        torch_ms = samples.get((key, "torch"))
        for label in built:
            cell = samples.get((key, label))
            if cell:
                row[label] = statistics.median(cell)
                row[f"{label} ci"] = median_ci(cell)
            else:
                row[label] = None
                row[f"{label} error"] = built[label].get(key, {}).get("error", "not built")
        if torch_ms:
            row["torch"] = statistics.median(torch_ms)
            mine = samples.get((key, "this tree"))
            if mine:
                row["ratio"] = row["this tree"] / row["torch"]
        for label in built:
            if label != "this tree" and row.get(label) and row.get("this tree"):
                low, high = ratio_ci(samples[(key, "this tree")], samples[(key, label)])
                row["vs"] = (row["this tree"] / row[label], low, high)
        rows.append(row)
    return rows


def committed() -> dict[str, float]:
    return json.loads(DATA.read_text())["ratios"] if DATA.exists() else {}


def verdict(rows: list[dict], against: str | None) -> tuple[list[str], list[str]]:
    """(lines of rows that got worse, all printed first; the summary line)."""
    before, worse = committed(), []
    for row in rows:
        old = before.get(row["row"])
        if row.get("ratio") and old and row["ratio"] > old * WORSE:
            worse.append(f"WORSE than the committed table: {row['row']}: TVM/PyTorch "
                         f"{row['ratio']:.3f}, committed {old:.3f} "
                         f"({row['ratio'] / old - 1:+.0%})")
        if against and row.get("vs") and row["vs"][1] > WORSE:
            ratio, low, high = row["vs"]
            worse.append(f"SLOWER than {against}: {row['row']}: {row['this tree']:.3f} ms vs "
                         f"{row[against]:.3f} ms, x{ratio:.2f} [{low:.2f}, {high:.2f}]")
    summary = (f"ledger: {len(rows)} rows; {sum(w.startswith('WORSE') for w in worse)} worse "
               f"than the committed table by >15%")
    if against:
        summary += (f"; {sum(w.startswith('SLOWER') for w in worse)} slower than {against} by "
                    ">15% side by side (95% interval of the ratio above 1.15)")
    return worse, summary


def markdown(rows, against: str | None, machine: str, command: str) -> str:
    head = ["row", "this tree ms [95% CI]", "PyTorch ms", "TVM / PyTorch"]
    if against:
        head += [f"{against} ms", f"this / {against} [95% CI]"]
    lines = [f"Machine: {machine}. {datetime.date.today()}. Command: `{command}`.", "",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in rows:
        mine = row.get("this tree")
        cells = [row["row"],
                 f"{mine:.3f} [{row['this tree ci'][0]:.3f}, {row['this tree ci'][1]:.3f}]"
                 if mine else f"n/a: {row.get('this tree error', '')}",
                 f"{row['torch']:.3f}" if row.get("torch") else "",
                 f"{row['ratio']:.3f}" if row.get("ratio") else ""]
        if against:
            theirs = row.get(against)
            cells += [f"{theirs:.3f}" if theirs else f"n/a: {row.get(f'{against} error', '')}",
                      "x{:.2f} [{:.2f}, {:.2f}]".format(*row["vs"]) if row.get("vs") else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--against", metavar="REV", help="also build and time this git revision")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeat", type=int, default=10, help="timed repeats per cell per round")
    p.add_argument("--trials", type=int, default=16, help="MetaSchedule trials of a tuned row")
    p.add_argument("--conv", default=None, metavar="A,B",
                   help="only these primitives' untuned rows (a quick look; not for --write)")
    p.add_argument("--no-tuned", action="store_true", help="leave out the tuned rows")
    p.add_argument("--no-untuned", action="store_true", help="only the tuned rows")
    p.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    p.add_argument("--write", action="store_true", help=f"make this run {TABLE.name}")
    args = p.parse_args(argv)
    from dlas_search.hardware import cpu_model, local_target

    def log(line):
        print(line, file=sys.stderr, flush=True)

    out = Path(args.out or tempfile.mkdtemp(prefix="dlas-ledger-"))
    convs = args.conv.split(",") if args.conv else None
    if args.write and (convs or args.no_tuned or args.no_untuned):
        p.error("--write needs the whole matrix (no --conv, --no-tuned or --no-untuned)")
    trees = {"this tree": ROOT}
    if args.against:
        trees[args.against] = worktree(args.against, out)
    try:
        with concurrent.futures.ThreadPoolExecutor(len(trees)) as pool:
            futures = {label: pool.submit(build, label.replace(" ", "-"), tree, out,
                                          args.trials, convs,
                                          (not args.no_untuned, not args.no_tuned), log)
                       for label, tree in trees.items()}
            built = {label: f.result() for label, f in futures.items()}
        samples = time_all(built, args.rounds, args.repeat, log)
    finally:
        for label, tree in trees.items():
            if tree != ROOT:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                                str(tree)], capture_output=True)
        if not args.out:  # the builds' stores and libraries (5 GB for a run with --against)
            shutil.rmtree(out, ignore_errors=True)
    rows = summarise(built, samples)
    machine = f"{cpu_model()}, LLVM target {local_target(1)}, {os.cpu_count()} CPUs, 1 thread"
    command = "python bench/ledger.py" + (f" --against {args.against}" if args.against else "")
    worse, summary = verdict(rows, args.against)
    for line in worse:
        print(line)
    table = markdown(rows, args.against, machine, command)
    print(table)
    print(summary)
    if args.out:  # a temporary work folder is gone by now
        (out / "ledger.md").write_text(table)
    if args.write:
        TABLE.write_text("# Performance ledger\n\n" + (
            "Each row: resnet18 at 32x32 (bench/ledger.yaml), batch 1, one thread; medians of "
            f"{args.rounds} interleaved rounds x {args.repeat} repeats, 95% intervals by order "
            "statistics. Compare only within one run; `--against REV` is the comparison to "
            "trust across sessions.\n\n") + table + f"\n{summary}\n")
        DATA.write_text(json.dumps({"machine": machine, "date": str(datetime.date.today()),
                                    "ratios": {r["row"]: r["ratio"] for r in rows
                                               if r.get("ratio")}}, indent=1))
    return 1 if worse else 0


if __name__ == "__main__":
    sys.exit(main())
