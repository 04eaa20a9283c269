"""The `dlas` command (a contract: docs/architecture.md). Exit status: 0 done, 2 bad input (nothing
written), 1 anything else. The MLproject entry points are thin calls into this. The commands
that read a finished study back from MLflow (pareto, confirm, report, reconcile) are in
cli_results.py."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from .cli_results import (cache_dir_arg, cmd_confirm, cmd_export, cmd_pareto, cmd_reconcile,
                          cmd_report, front_lines, export_lines)
from .errors import BadInput

__all__ = ["DEFAULT_SPACE", "PAPER_SPACE", "REDUCED_SPACE", "build_parser",
           "cmd_search", "cmd_trial", "cmd_pareto", "cmd_confirm", "cmd_export", "cmd_perturb",
           "cmd_report",
           "cmd_reconcile", "cmd_targets", "cmd_space", "main"]


DEFAULT_SPACE = "spaces/quickstart.yaml"
PAPER_SPACE, REDUCED_SPACE = "spaces/dlas_paper.yaml", "spaces/dlas_paper_reduced.yaml"


def _space_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--space", default=DEFAULT_SPACE,
                   help=f"search space YAML (default: {DEFAULT_SPACE})")
    p.add_argument("--set", dest="pins", action="append", default=[], metavar="KEY=VALUE",
                   help="pin a parameter by its dotted name, e.g. --set model.arch=resnet18 "
                        "(repeatable; the value is read as YAML)")


def _tracking_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow backend: a database URL or a tracking server "
                        "(default: sqlite:///tracking/mlflow.db)")


def _study_args(p: argparse.ArgumentParser, trials_default: str, out: str) -> None:
    """The options of a command that runs a study: which, how many trials, where it is
    stored and logged, where its result and the stage cache go."""
    p.add_argument("--study", default=None, help="study name (default: the space's `study`)")
    p.add_argument("--trials", type=int, default=None,
                   help=f"trials to run now (default: {trials_default})")
    p.add_argument("--storage", default=None, help="Optuna storage, any SQLAlchemy URL "
                   "(default: sqlite:///tracking/optuna.db)")
    _tracking_arg(p)
    p.add_argument("--out", default=None, help=f"folder for {out}")
    p.add_argument("--cache-dir", default=None,
                   help="stage cache folder (default: tracking/cache; 'none' disables)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dlas", description="Search the Deep Learning Acceleration Stack: data, model, "
        "compression, conv algorithm, compiler (Apache TVM) and hardware, jointly.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("search", help="run or continue a study",
                       description="Run (or continue) a multi-objective Optuna study over the "
                       "space; every trial is logged to MLflow; the Pareto front is exported.")
    _space_arg(p)
    _study_args(p, "the space's budget.trials", "the Pareto export (default: "
                "tracking/pareto/<study>)")
    p.add_argument("--timeout", type=float, default=None, help="stop after this many seconds")
    p.add_argument("--heartbeat", type=float, default=None, metavar="S",
                   help="seconds between a running trial's heartbeats (default: 60; 0: off); "
                   "a trial silent for 3 beats, its worker killed, is failed in Optuna and "
                   "MLflow by the next worker and run again once")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="worker processes on this machine running the study together "
                   "(default: 1); the --trials budget is split among them exactly")
    p.add_argument("--confirm-rounds", type=int, default=5, metavar="N",
                   help="at the end, time every trial that could be on the front again, side "
                   "by side in N interleaved rounds, before exporting it (default: 5; 0: off)")

    p = sub.add_parser("trial", help="run one configuration",
                       description="Run one configuration (unset parameters take the space's "
                       "defaults), log it to MLflow and print its metrics.")
    _space_arg(p)
    _tracking_arg(p)
    p.add_argument("--experiment", default="dlas-trials",
                   help="MLflow experiment for the run (default: dlas-trials)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (params, metrics, status, run_id) on stdout")
    p.add_argument("--cache-dir", default=None, help="stage cache folder ('none' disables)")

    p = sub.add_parser("pareto", help="export a study's Pareto front from MLflow",
                       description="Recompute the Pareto front of a study from its MLflow "
                       "runs alone; write CSV, JSON, HTML and PNG.")
    p.add_argument("--experiment", required=True, help="MLflow experiment (= study name)")
    _tracking_arg(p)
    p.add_argument("--out", default=None, help="folder (default: tracking/pareto/<experiment>)")

    p = sub.add_parser("confirm", help="time a study's front candidates again, side by side",
                       description="Time every trial that could be on the study's Pareto "
                       "front again, from its kept library (nothing is compiled), all in one "
                       "process, interleaved in rounds beside their PyTorch baselines; log "
                       "latency_confirmed_ms with its 95%% interval to each trial's run, then "
                       "export the front from the confirmed numbers.")
    p.add_argument("--experiment", required=True, help="MLflow experiment (= study name)")
    _tracking_arg(p)
    p.add_argument("--rounds", type=int, default=5, metavar="N",
                   help="interleaved rounds (default: 5)")
    p.add_argument("--cache-dir", default=None,
                   help="stage cache folder with the trials' models (default: tracking/cache)")
    p.add_argument("--out", default=None, help="folder (default: tracking/pareto/<experiment>)")

    p = sub.add_parser("export", help="a trial's deployable folder (library, weights, config, "
                       "tuning records, predict script)",
                       description="Write one trial's deployable folder: the compiled library, "
                       "its MLflow Model, the PyTorch weights, the configuration, the tuning "
                       "records and a runnable predict.py. Name the run, or pick from an "
                       "experiment's Pareto front with rules.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", default=None, metavar="RUN_ID", help="the trial's MLflow run id")
    which.add_argument("--pick", default=None, metavar="RULES",
                       help="rules applied to --experiment's front, e.g. "
                            "'accuracy>=0.9, min latency_ms'")
    p.add_argument("--experiment", default=None, help="MLflow experiment (= study name), "
                   "for --pick")
    _tracking_arg(p)
    p.add_argument("--out", required=True, help="the folder to write (new or empty)")
    p.add_argument("--register", default=None, metavar="NAME",
                   help="also register the model in the MLflow Model Registry under NAME")

    p = sub.add_parser("perturb", help="run the DLAS perturbation study's grid, then its report",
                       description="Run (or continue) every configuration of the study's grid "
                       "(Optuna's grid sampler), then write the report: correlations, "
                       "compression speedups, best primitives, sparse vs dense, importance, the "
                       "interactions between layers, and a verdict with a bootstrap interval "
                       "on the paper's observations and this project's hypotheses. Logged to "
                       "the study's "
                       "parent run as the artifact folder `report`.")
    p.add_argument("--space", default=None,
                   help=f"the study's grid (default: {PAPER_SPACE}; the ImageNet half: "
                        "spaces/dlas_paper_imagenet.yaml)")
    p.add_argument("--reduced", action="store_true",
                   help=f"the laptop-sized grid, {REDUCED_SPACE} (108 configurations)")
    p.add_argument("--set", dest="pins", action="append", default=[], metavar="KEY=VALUE",
                   help="pin a parameter by its dotted name (repeatable)")
    _study_args(p, "until the grid is done", "the report (default: tracking/report/<study>)")

    p = sub.add_parser("report", help="rebuild a perturbation study's report from MLflow",
                       description="Recompute the perturbation study's report from the "
                       "experiment's MLflow runs alone (any study works) and log it to the "
                       "study's parent run.")
    p.add_argument("--experiment", required=True, help="MLflow experiment (= study name)")
    _tracking_arg(p)
    p.add_argument("--out", default=None, help="folder (default: tracking/report/<experiment>)")

    p = sub.add_parser("reconcile", help="back-fill MLflow with trials only Optuna has",
                       description="List the study's finished Optuna trials that MLflow does "
                       "not have (MLflow went away mid-study) and log them from what Optuna "
                       "kept: parameters, objective values and metrics, tagged "
                       "dlas.backfilled.")
    p.add_argument("--study", required=True, help="study name (= MLflow experiment)")
    p.add_argument("--storage", default=None, help="Optuna storage URL "
                   "(default: sqlite:///tracking/optuna.db)")
    _tracking_arg(p)
    p.add_argument("--dry-run", action="store_true", help="only list the missing trials")

    p = sub.add_parser("targets", help="list the hardware targets and whether they can run",
                       description="List the built-in targets and the space's registry with "
                       "each one's reachability (rpc: is the key registered at the tracker, "
                       "how many devices are free).")
    p.add_argument("--space", default=DEFAULT_SPACE,
                   help=f"space whose targets: registry to list (default: {DEFAULT_SPACE})")
    p.add_argument("--json", action="store_true", help="print one JSON list")

    p = sub.add_parser("space", help="inspect a search space")
    ssub = p.add_subparsers(dest="space_command", required=True, metavar="ACTION")
    show = ssub.add_parser("show", help="print the space as a tree with its size")
    show.add_argument("file", help="search space YAML")
    return parser


def _load(args):
    from .space import load_space, parse_assignment
    space = load_space(args.space)
    pins = dict(parse_assignment(text) for text in args.pins)
    return space.pin(pins) if pins else space


@contextlib.contextmanager
def _stdout_to_stderr():
    """Send everything (Python and C libraries) printed to stdout to stderr meanwhile, so
    `--json` output is exactly one JSON object."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def cmd_search(args) -> int:
    from .search import run_search
    space = _load(args)
    outcome = run_search(space, study_name=args.study or None, trials=args.trials,
                         storage=args.storage or None, tracking_uri=args.tracking_uri or None,
                         out_dir=args.out or None, cache_dir=cache_dir_arg(args.cache_dir),
                         timeout_s=args.timeout, workers=args.workers,
                         confirm_rounds=args.confirm_rounds,
                         **({} if args.heartbeat is None else {"heartbeat_s": args.heartbeat}))
    study = outcome.study
    complete = sum(t.state.name == "COMPLETE" for t in study.trials)
    failed = sum(t.state.name == "FAIL" for t in study.trials)
    running = len(outcome.running)
    print(f"study {study.study_name}: {len(study.trials)} trials ({complete} complete, "
          f"{failed} failed" + (f", {running} still running" if running else "") +
          f"); Pareto front: {len(outcome.front)} trials -> {outcome.pareto_dir}" +
          (f" (made with {running} trial(s) still running)" if running else ""))
    for line in (front_lines(outcome.trials) + export_lines(outcome.trials, outcome.pareto_dir)
                 if outcome.trials else ()):
        print(line)
    for line in outcome.running:
        print(f"  {line}")
    for line in outcome.dead_workers:
        print(f"error: {line}", file=sys.stderr)
    if outcome.tracking_lost:
        print(f"dlas search: error: {outcome.tracking_lost}", file=sys.stderr)
    return 1 if outcome.dead_workers or outcome.tracking_lost else 0


def cmd_trial(args) -> int:
    from . import pipeline, tracking
    from .cache import StageCache
    from .search import check_config
    from .trial import run_and_log
    space = _load(args)
    config = space.defaults()
    check_config(config)
    uri = tracking.check_tracking_uri(args.tracking_uri or tracking.default_tracking_uri())
    cache_dir = cache_dir_arg(args.cache_dir)
    with _stdout_to_stderr():
        tracker = tracking.Tracker(uri, args.experiment)
        tracker.open_study(space.objectives, space.path, space.text, {})
        runs = tracker.client.search_runs([tracker.experiment_id],
                                          f"tags.`{tracking.ROLE}` = 'trial'", max_results=50000)
        run_id = tracker.start_trial(len(runs), config.summary(), config.params())
        cache = StageCache(cache_dir if cache_dir is not None else tracking.TRACKING_DIR / "cache")
        try:
            result = run_and_log(config, tracker, run_id, lambda c: pipeline.run(c, cache), space,
                                 require_objectives=False)
        except Exception as e:
            tracker.close_study("FINISHED")
            outcome = {"params": config.params(), "metrics": {}, "status": "FAILED",
                       "run_id": run_id, "error": f"{type(e).__name__}: {e}"}
            code = 1
        else:
            tracker.close_study("FINISHED")
            outcome = {"params": config.params(), "metrics": result.metrics,
                       "status": "FINISHED", "run_id": run_id}
            code = 0
    if args.json:
        print(json.dumps(outcome))
    else:
        print(f"{config.summary()}: {outcome['status']} (run {run_id})")
        for key, value in sorted(outcome["metrics"].items()):
            print(f"  {key}: {value:.6g}")
        if "error" in outcome:
            print(f"  error: {outcome['error']}")
    return code


def cmd_perturb(args) -> int:
    import dataclasses

    from . import report, tracking
    from .search import run_search
    if args.reduced and args.space:
        raise BadInput("--reduced and --space: give one (--reduced is "
                       f"--space {REDUCED_SPACE})")
    args.space = REDUCED_SPACE if args.reduced else args.space or PAPER_SPACE
    space = _load(args)
    if space.sampler["name"] != "grid":  # the study is the whole grid, whatever the file says
        space = dataclasses.replace(space, sampler={"name": "grid"})
    uri = tracking.check_tracking_uri(args.tracking_uri or tracking.default_tracking_uri())
    outcome = run_search(space, study_name=args.study or None, trials=args.trials,
                         storage=args.storage or None, tracking_uri=uri,
                         cache_dir=cache_dir_arg(args.cache_dir))
    study = outcome.study
    name = study.study_name
    complete = sum(t.state.name == "COMPLETE" for t in study.trials)
    failed = sum(t.state.name == "FAIL" for t in study.trials)
    size = space.size()
    print(f"study {name}: {complete} complete, {failed} failed"
          + (f" of a grid of {size}" if size is not None else ""))
    for line in outcome.running:
        print(f"  {line}")
    out = Path(args.out) if args.out else tracking.TRACKING_DIR / "report" / name
    _, verdicts, path = report.write_report(uri, name, out)
    print(f"report -> {path}")
    for verdict in verdicts:
        print(f"  {verdict.short()}")
    return 0


def cmd_targets(args) -> int:
    from . import hardware
    from .space import load_space
    registry = load_space(args.space).targets
    rows, where = [], []
    for name, spec in {**hardware.BUILTIN_TARGETS, **registry}.items():
        kind = hardware.DEVICES.lookup(spec.device)  # each kind says what it shows
        rows.append({"name": name, "device": spec.device, "label": spec.label,
                     "threads": spec.threads or 1, **kind.listing(spec, registry)})
        where.append(kind.where(spec))
    if args.json:
        print(json.dumps(rows))
        return 0
    for row, at in zip(rows, where):
        print(f"{row['name']:<16} {row['device']:<5}{at}  {row['status']}")
        print(f"{'':<16} {row['label']}; {row['threads']} thread(s); TVM target {row['tvm']}")
    return 0


def cmd_space(args) -> int:
    from .space import load_space
    print(load_space(args.file).show())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"search": cmd_search, "trial": cmd_trial, "pareto": cmd_pareto,
               "confirm": cmd_confirm, "export": cmd_export,
               "perturb": cmd_perturb, "report": cmd_report, "reconcile": cmd_reconcile,
               "targets": cmd_targets, "space": cmd_space}[args.command]
    try:
        return handler(args)
    except BadInput as e:
        print(f"dlas {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
