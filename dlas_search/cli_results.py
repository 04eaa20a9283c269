"""The `dlas` commands that read a finished study back from MLflow (and Optuna): `pareto`,
`confirm`, `export`, `report`, `reconcile`; and the lines that show a front, which `dlas search` prints
too. Part of the command line contract (cli.py)."""
from __future__ import annotations

import sys
from pathlib import Path

from .errors import BadInput

__all__ = ["cache_dir_arg", "cmd_pareto", "cmd_confirm", "cmd_export", "cmd_report", "cmd_reconcile", "print_front",
           "front_lines", "front_line", "export_lines"]


def cache_dir_arg(value: str | None):
    """--cache-dir: None (the default folder), "" for `none` (no stage cache), else the folder."""
    if value is None:
        return None
    return "" if value.lower() == "none" else value


def _store(args) -> str:
    """The tracking URI of a command that reads a study: it must exist already."""
    from . import tracking
    uri = tracking.check_tracking_uri(args.tracking_uri or tracking.default_tracking_uri())
    if uri.startswith("sqlite:"):
        from sqlalchemy.engine import make_url
        if not Path(make_url(uri).database).exists():
            raise BadInput(f"--tracking-uri {uri!r}: no MLflow database there yet; run a "
                           "search first or name the right store")
    return uri


def print_front(experiment: str, trials, out: Path) -> None:
    front = trials.front()
    print(f"{experiment}: {len(front)} of {len(trials.rows)} finished trials on the "
          f"Pareto front ({', '.join(f'{k} {v}' for k, v in trials.objectives.items())}) -> {out}")
    for line in front_lines(trials) + export_lines(trials, out):
        print(line)


def export_lines(trials, out: Path) -> list[str]:
    """The front's hypervolume and the files the export wrote (`out`), for the terminal."""
    lines = []
    if trials.hypervolume is not None:
        lines.append(f"  hypervolume {trials.hypervolume:.4f} (of the trials' normalised "
                     "objective box; higher is better)")
    written = sorted(p.name for p in Path(out).iterdir() if p.is_file()) \
        if Path(out).is_dir() else []
    if written:
        lines.append(f"  wrote {', '.join(written)} in {out}")
    return lines


def front_lines(trials) -> list[str]:
    """What follows a front's headline: where its latencies come from, its points (with their
    statistical ties) and the trials outside the thresholds, with why."""
    lines = []
    if trials.confirmed:
        lines.append(f"  latency: the confirmed numbers of {trials.confirmed} trial(s) "
                     "(dlas confirm), the search's for the others")
    lines += [front_line(row, trials.objectives) for row in trials.front()]
    if trials.summary():  # how many were outside the thresholds, and why
        lines.append(trials.summary())
        outside = [row for row in trials.rows if not trials.feasible(row)]
        lines += [f"  {row['name']}: {trials.violates(row)}" for row in outside[:10]]
        if len(outside) > 10:
            lines.append(f"  ... and {len(outside) - 10} more (trials.csv)")
    return lines


def front_line(row: dict, objectives) -> str:
    """`  name: accuracy 0.93, latency_ms 4.1, size_mb 11 (tied with 3 7)`."""
    shown = ", ".join(f"{m} {row['metrics'][m]:.4g}" for m in objectives)
    tied = f" (statistically tied with trial {row['tied_with']})" if row.get("tied_with") else ""
    return f"  {row['name']}: {shown}{tied}"


def cmd_pareto(args) -> int:
    from . import pareto, tracking
    uri = _store(args)
    out = Path(args.out) if args.out else tracking.TRACKING_DIR / "pareto" / args.experiment
    print_front(args.experiment, pareto.export_from_mlflow(uri, args.experiment, out), out)
    return 0


def cmd_confirm(args) -> int:
    from . import pareto, tracking
    from .confirm import confirm
    uri = _store(args)
    cache_dir = cache_dir_arg(args.cache_dir)
    result = confirm(uri, args.experiment,
                     cache_dir if cache_dir is not None else tracking.TRACKING_DIR / "cache",
                     args.rounds, say=lambda line: print(line, file=sys.stderr))
    print(f"{args.experiment}: {len(result.confirmed)} trial(s) timed again in {args.rounds} "
          f"rounds ({result.seconds:.0f} s); {len(result.skipped)} kept their search numbers")
    out = Path(args.out) if args.out else tracking.TRACKING_DIR / "pareto" / args.experiment
    print_front(args.experiment, pareto.export_from_mlflow(uri, args.experiment, out), out)
    return 0


def cmd_export(args) -> int:
    from . import export, pareto
    uri = _store(args)
    run_id = args.run
    if args.pick is not None:
        if not args.experiment:
            raise BadInput("--pick needs --experiment (the study whose front it picks from)")
        rule = export.parse_pick(args.pick)
        row = export.pick(pareto.load_trials(uri, args.experiment), rule)
        run_id = row["run_id"]
        print(f"picked {row['name']} (run {run_id}) by {rule}")
    done = export.export_run(uri, run_id, Path(args.out), args.register)
    print(f"exported run {run_id} -> {done['folder']}: {', '.join(done['files'])}")
    if done["registered"]:
        print(f"registered in the MLflow Model Registry as {done['registered']}")
    print(f"run it: python {done['folder']}/predict.py   (or: mlflow models serve -m "
          f"{done['folder']}/mlflow_model --env-manager local)")
    return 0


def cmd_report(args) -> int:
    from . import report, tracking
    uri = _store(args)
    out = Path(args.out) if args.out else tracking.TRACKING_DIR / "report" / args.experiment
    _, verdicts, path = report.write_report(uri, args.experiment, out)
    print(f"report -> {path}")
    for verdict in verdicts:
        print(f"  {verdict.short()}")
    return 0


def cmd_reconcile(args) -> int:
    import optuna

    from . import reconcile, tracking
    from .search import check_storage, default_storage
    storage = check_storage(args.storage or default_storage())
    uri = tracking.check_tracking_uri(args.tracking_uri or tracking.default_tracking_uri())
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=args.study, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise BadInput(f"--study {args.study!r}: no such study in {storage}; studies there: "
                       f"{', '.join(names) or 'none'}") from None
    tracker = reconcile.open_tracker(uri, study)
    missing = reconcile.find_missing(study, tracker)
    print(f"study {args.study}: {len(missing)} finished trial(s) missing from MLflow at {uri}")
    for trial, run in missing:
        where = f"run {run.info.run_id} is {run.info.status}" if run else "no run"
        print(f"  trial {trial.number} ({trial.state.name.lower()}): {where}")
    if missing and not args.dry_run:
        runs = reconcile.backfill(study, tracker, missing)
        print(f"back-filled {len(runs)} run(s), tagged dlas.backfilled")
    return 0
