"""A confirmed front: the trials that could be on it, timed again side by side.

During a search each trial is timed once, on its own, when its turn comes. Two configurations
timed minutes apart are not compared fairly: the machine's state drifts. At the end of a study
(and with `dlas confirm --experiment NAME`) every feasible trial that a re-measurement could
put on the front (`confidence.candidates`: no other trial beats it at every bound of the 95%
intervals) is timed again:

- from its compiled library as the run kept it (its MLflow Model, or `model/model.so`) and its PyTorch model from
  the stage cache: nothing is trained or compiled again (a trial missing either keeps its
  search numbers, and is named);
- all candidates in one process, under the device's timing lock, interleaved in `rounds`
  rounds (the order rotated every round), each with its PyTorch eager baseline in the same
  round, so drift hits every candidate alike;
- the samples of all rounds give `latency_confirmed_ms` with its 95% interval
  (`latency_confirmed_ci_low_ms` / `_high_ms`), the same for `torch_latency_confirmed_ms` and
  `speedup_vs_torch_confirmed`, logged to the trial's own run (tag `dlas.confirmed`);
- the confirmed numbers can let a trial the search numbers showed certainly dominated onto the
  front (its dominator turned out slower): it joins, and all candidates are timed again
  together, up to `PASSES` passes, so every front point ends confirmed (or is named).

`pareto.load_trials` then uses the confirmed latency where a run has one and says so, and the
export marks front points that are statistically tied (confidence.ties). Only trials timed on
this machine's CPU (device kind `local`) can be confirmed here; the others keep their numbers
and are named.
"""
from __future__ import annotations

import dataclasses
import datetime
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mlflow.tracking import MlflowClient

from . import confidence, pareto
from .errors import BadInput
from .tracking import add_to_run

__all__ = ["ROUNDS", "Candidate", "Confirmation", "confirm", "config_of"]

ROUNDS = 5
PASSES = 3  # timing all candidates again when confirmed numbers let another onto the front


@dataclass
class Candidate:
    """One trial to time again: what it runs, and the samples gathered so far."""
    row: dict
    executable: object = None
    module: object = None
    example: object = None
    hw: object = None
    threads: int = 1
    tvm_ms: list[float] = field(default_factory=list)
    torch_ms: list[float] = field(default_factory=list)


@dataclass
class Confirmation:
    experiment: str
    confirmed: dict[int, dict[str, float]] = field(default_factory=dict)  # trial -> metrics
    skipped: dict[int, str] = field(default_factory=dict)                 # trial -> why
    candidates: int = 0
    seconds: float = 0.0


def config_of(client: MlflowClient, trials: pareto.Trials, row: dict, scratch: Path):
    """The trial's configuration (space.TrialConfig), from the study's space file and the
    run's parameters (read as `--set` reads them); a space file downloaded goes in `scratch`."""
    from .space import load_space

    parent = client.get_run(client.get_run(row["run_id"]).data.tags["mlflow.parentRunId"])
    path = Path(parent.data.tags.get("dlas.space", ""))
    if not path.is_file():  # moved since: the copy the study's run kept
        folder = Path(tempfile.mkdtemp(prefix="space-", dir=scratch))
        path = Path(client.download_artifacts(parent.info.run_id, "space.yaml", str(folder)))
    return load_space(path).logged(row["params"])


def _prepare(client: MlflowClient, trials: pareto.Trials, row: dict, cache,
             scratch: Path) -> Candidate:
    """Load what the candidate runs: its config, its library (the run's `model/model.so`) and
    its PyTorch model (the stage cache). Raises with a reason, before any work, when one is
    missing: nothing is trained or compiled again."""
    from tvm import relax
    import tvm

    from .stages import Stages

    cfg = config_of(client, trials, row, scratch)
    stages = Stages(cfg, cache)
    device = stages.target()
    if device.remote or device.spec.device != "local":
        raise BadInput(f"timed on {device.spec.device} target {device.name!r}; only trials "
                       "timed on this machine's CPU (local) are confirmed here")
    executable = None
    if cfg.compiler.backend != "torch":
        from .mlmodel import library_of
        folder = Path(tempfile.mkdtemp(prefix="library-", dir=scratch))
        library = library_of(client, client.get_run(row["run_id"]), folder)
        if library is None:
            raise BadInput("its run kept no compiled library (artifacts.library: false)")
        executable = relax.VMExecutable(tvm.runtime.load_module(str(library)))
    compressed = stages.cached_compressed()
    if compressed is None:
        raise BadInput(f"its model is not in the stage cache {cache.root or '(none)'}; give "
                       "the study's --cache-dir")
    dataset = stages.data()
    return Candidate(row, executable, compressed.module, dataset.example(), cfg.hw,
                     device.threads)


def _round(candidates: list[Candidate], start: int) -> None:
    """One round: every candidate (rotated by `start`) timed with TVM, then PyTorch eager."""
    from . import hardware

    for candidate in candidates[start:] + candidates[:start]:
        hardware.resolve(dataclasses.replace(candidate.hw, threads=candidate.threads))
        if candidate.executable is not None:
            candidate.tvm_ms += hardware.time_tvm(candidate.executable, candidate.example,
                                                  candidate.hw, candidate.threads).repeats
        candidate.torch_ms += hardware.time_torch(candidate.module, candidate.example,
                                                  candidate.hw, candidate.threads).repeats


def _metrics_of(candidate: Candidate) -> dict[str, float]:
    """`latency_confirmed_ms` and the rest, from the samples of every round."""
    from . import hardware
    from .stages import latency_metrics, speedup_metrics

    torch_time = hardware.Timing.of(candidate.torch_ms)
    tvm_time = hardware.Timing.of(candidate.tvm_ms) if candidate.tvm_ms else torch_time
    return {**latency_metrics("", tvm_time, "latency_confirmed"),
            **latency_metrics("torch_", torch_time, "latency_confirmed"),
            **speedup_metrics(torch_time, tvm_time, "speedup_vs_torch_confirmed")}


def _moved_onto_the_front(feasible: list[dict], ready: list[Candidate], out: Confirmation,
                          objectives: dict[str, str]) -> list[dict]:
    """The feasible rows not timed yet that the confirmed numbers of `ready` make candidates:
    a trial the search numbers showed certainly dominated can escape once its dominator's
    confirmed latency is worse."""
    timed = {candidate.row["trial"]: candidate for candidate in ready}
    rows = [dict(row, metrics=pareto.confirmed_metrics(
                {**row["metrics"], **_metrics_of(timed[row["trial"]])}))
            if row["trial"] in timed else row for row in feasible]
    return [row for row in confidence.candidates(rows, objectives)
            if row["trial"] not in timed and row["trial"] not in out.skipped]


def confirm(tracking_uri: str, experiment: str, cache_dir: str | Path | None = None,
            rounds: int = ROUNDS, say: Callable[[str], None] = print) -> Confirmation:
    """Time the study's front candidates again, side by side (see the module), and log the
    confirmed numbers to their runs."""
    from .cache import StageCache

    if rounds < 1:
        raise BadInput(f"--rounds {rounds}: the number of interleaved rounds, at least 1")
    start = time.perf_counter()
    trials = pareto.load_trials(tracking_uri, experiment)
    out = Confirmation(experiment)
    if "latency_ms" not in trials.objectives:
        say(f"confirm {experiment}: latency_ms is not an objective; nothing to time again")
        return out
    with tempfile.TemporaryDirectory(prefix="dlas-confirm-") as scratch:  # libraries, spaces
        _passes(trials, out, MlflowClient(tracking_uri), StageCache(cache_dir), rounds, say,
                Path(scratch))
    out.seconds = time.perf_counter() - start
    return out


def _passes(trials: pareto.Trials, out: Confirmation, client: MlflowClient, cache,
            rounds: int, say: Callable[[str], None], scratch: Path) -> None:
    """confirm's passes, recorded in `out`; the candidates' libraries and space files are
    downloaded into `scratch`."""
    from . import hardware

    experiment = out.experiment
    feasible = [row for row in trials.rows if trials.feasible(row)]
    chosen = confidence.candidates(feasible, trials.objectives)
    ready: list[Candidate] = []
    waited = 0.0
    for attempt in range(PASSES):
        for row in chosen:
            try:
                ready.append(_prepare(client, trials, row, cache, scratch))
            except Exception as e:  # this candidate only: the others are still confirmed
                out.skipped[row["trial"]] = str(e).splitlines()[0][:300] if str(e) else repr(e)
                say(f"confirm {experiment}: trial {row['trial']} kept its search numbers: "
                    f"{out.skipped[row['trial']]}")
        out.candidates += len(chosen)
        say(f"confirm {experiment}: timing {len(ready)} of {len(trials.rows)} trials again "
            f"({out.candidates} could be on the front), {rounds} interleaved rounds, "
            "each beside its PyTorch baseline")
        if not ready:
            break
        for candidate in ready:  # every pass times all of them anew, side by side
            candidate.tvm_ms, candidate.torch_ms = [], []
        with hardware.timing_lock("local") as waited_now:
            for r in range(rounds):
                _round(ready, r % len(ready))
        waited += waited_now
        chosen = _moved_onto_the_front(feasible, ready, out, trials.objectives)
        if not chosen:
            break
        say(f"confirm {experiment}: the confirmed numbers let trial(s) "
            f"{', '.join(str(row['trial']) for row in chosen)} onto the front; "
            "timing them with the others")
    else:
        say(f"confirm {experiment}: after {PASSES} passes trial(s) "
            f"{', '.join(str(row['trial']) for row in chosen)} could still be on the front "
            "and keep their search numbers")
    if ready:
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        for candidate in ready:
            metrics = {**_metrics_of(candidate), "confirm_rounds": float(rounds),
                       "confirm_wait_s": waited}
            add_to_run(client, candidate.row["run_id"], metrics, {"dlas.confirmed": stamp})
            out.confirmed[candidate.row["trial"]] = metrics
