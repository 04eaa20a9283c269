"""Reading a space file (and a target registry file): size, encoding and YAML checks, every
key validated with a message naming the file, the key, the value and what is allowed;
`--set KEY=VALUE` assignments."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from .. import faults, hardware, samplers
from ..errors import BadInput, allowed
from ..gates import parse as parse_gates
from ..rounds import parse as parse_rounds
from .config import (ARTIFACTS, DIRECTIONS, LAYERS, OBJECTIVE_METRICS, TOP_LEVEL, _all_names,
                     _field_info)
from .definition import Space
from .params import Param, _check_target_names, _parse_param, parse_assignment

__all__ = ["MAX_YAML_BYTES", "read_text", "read_yaml", "load_targets", "load_artifacts",
           "load_space", "parse_assignment"]


# A space or registry is a few kilobytes; a bigger file is a mistake (a wrong path, a data file)
MAX_YAML_BYTES = 1_000_000


def read_text(path: Path, where: str) -> str:
    """A YAML file's text: readable, at most MAX_YAML_BYTES, UTF-8 (else BadInput)."""
    try:
        size = path.stat().st_size
        if size > MAX_YAML_BYTES:
            raise BadInput(f"{where}{path}: {size / 1e6:.1f} MB; a space or target file is at "
                           f"most {MAX_YAML_BYTES / 1e6:g} MB (is this the right file?)")
        raw = path.read_bytes()
    except OSError as e:
        raise BadInput(f"{where}{path}: cannot read the file ({e.strerror})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"{where}{path}: not UTF-8 text (byte {raw[e.start]:#04x} at offset "
                       f"{e.start}); save the file as UTF-8") from None


def read_yaml(path: Path, where: str, text: str | None = None) -> Any:
    """Safe-load a YAML file (plain data only: a `!!python/...` tag is refused, never run)."""
    text = read_text(path, where) if text is None else text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        if isinstance(e, yaml.constructor.ConstructorError):
            raise BadInput(f"{where}{path}{at}: {problem}; only plain YAML (mappings, lists, "
                           "numbers, strings) is allowed, no tags that build objects") from None
        context = getattr(e, "context", None)
        raise BadInput(f"{where}{path}{at}: not valid YAML: {problem}"
                       + (f" ({context})" if context else "")) from None


def load_targets(section: Any, path: Path, where: str) -> dict[str, hardware.TargetSpec]:
    """The space's target registry: a mapping of name -> entry, or the path of a YAML file
    holding one (relative to the space file), e.g. `targets: targets.yaml`."""
    if section is None:
        return {}
    if isinstance(section, str):
        file = path.parent / section
        section = read_yaml(file, f"{where}targets: ")
        where = f"{file}: "
        section = (section or {}).get("targets", section) if isinstance(section, dict) \
            else section
    if not isinstance(section, dict):
        raise BadInput(f"{where}targets: a mapping of target name -> entry (device, tvm, "
                       "tracker, key, threads, label), or the path of a YAML file with one")
    return {str(name): hardware.target_spec(str(name), entry, where)
            for name, entry in section.items()}


def load_artifacts(section: Any, where: str) -> dict[str, bool]:
    """`artifacts: {weights: true, library: false}`: which model files each trial's run keeps
    (unset keys: true)."""
    if section is None:
        return dict(ARTIFACTS)
    if not isinstance(section, dict):
        raise BadInput(f"{where}artifacts: a mapping of {' / '.join(ARTIFACTS)} -> true or "
                       "false, e.g. {weights: true, library: false}")
    for key, value in section.items():
        if key not in ARTIFACTS:
            raise allowed(f"{where}artifacts", key, list(ARTIFACTS))
        if not isinstance(value, bool):
            raise BadInput(f"{where}artifacts.{key}: {value!r} must be true or false")
    return {**ARTIFACTS, **section}


def load_space(path: str | Path) -> Space:
    """Read and validate a space file; any problem is a BadInput naming file and key."""
    path = Path(path)
    text = read_text(path, "")
    doc = read_yaml(path, "", text)
    if not isinstance(doc, dict):
        raise BadInput(f"{path}: a space file is a mapping with keys {', '.join(TOP_LEVEL)}")
    where = f"{path}: "
    for key in doc:
        if key not in TOP_LEVEL:
            raise allowed(f"{where}{key}", key, TOP_LEVEL)

    study = doc.get("study", path.stem)
    if not isinstance(study, str) or not study.strip():
        raise BadInput(f"{where}study: must be a non-empty name")
    seed = doc.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise BadInput(f"{where}seed: {seed!r} must be an integer")

    objectives = doc.get("objectives") or {"accuracy": "maximize", "latency_ms": "minimize",
                                           "size_mb": "minimize"}
    if not isinstance(objectives, dict) or not objectives:
        raise BadInput(f"{where}objectives: a mapping of metric -> direction, e.g. "
                       "{accuracy: maximize, latency_ms: minimize}")
    for metric, direction in objectives.items():
        if metric not in OBJECTIVE_METRICS:
            raise allowed(f"{where}objectives", metric, OBJECTIVE_METRICS)
        if direction not in DIRECTIONS:
            raise allowed(f"{where}objectives.{metric}", direction, DIRECTIONS)

    thresholds = doc.get("thresholds") or {}
    if not isinstance(thresholds, dict):
        raise BadInput(f"{where}thresholds: a mapping of metric -> {{min: x}} or {{max: y}}, "
                       "e.g. {accuracy: {min: 0.9}}")
    for metric, bounds in thresholds.items():
        if metric not in OBJECTIVE_METRICS:
            raise allowed(f"{where}thresholds", metric, OBJECTIVE_METRICS)
        if not isinstance(bounds, dict) or not bounds or set(bounds) - {"min", "max"}:
            raise BadInput(f"{where}thresholds.{metric}: {bounds!r}; give min and/or max, "
                           f"e.g. {{min: 0.9}}")
        for kind, bound in bounds.items():
            if not isinstance(bound, (int, float)) or isinstance(bound, bool):
                raise BadInput(f"{where}thresholds.{metric}.{kind}: {bound!r} must be a number")
        if bounds.get("min", float("-inf")) > bounds.get("max", float("inf")):
            raise BadInput(f"{where}thresholds.{metric}: min {bounds['min']} is above max "
                           f"{bounds['max']}")
    thresholds = {m: {k: float(v) for k, v in b.items()} for m, b in thresholds.items()}

    sampler = doc.get("sampler", samplers.DEFAULT)
    sampler = {"name": sampler} if isinstance(sampler, str) else sampler
    name = sampler.get("name") if isinstance(sampler, dict) else sampler
    samplers.SAMPLERS.lookup(name, where)
    if set(sampler) - set(samplers.settings(name)):
        raise allowed(f"{where}sampler", sorted(set(sampler) - set(samplers.settings(name)))[0],
                      list(samplers.settings(name)))

    budget = doc.get("budget") or {}
    budget_keys = ("trials", "hours", "timeout_s", "tuning_trials", "tuning_rounds",
                   "trial_timeout_s", "trial_memory_mb")
    if not isinstance(budget, dict):
        raise BadInput(f"{where}budget: a mapping with {', '.join(budget_keys)}")
    if set(budget) - set(budget_keys):
        raise allowed(f"{where}budget", sorted(set(budget) - set(budget_keys))[0], budget_keys)
    trials = budget.get("trials", 10)
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise BadInput(f"{where}budget.trials: {trials!r} must be a positive integer")
    timeout_s = budget.get("timeout_s")
    if timeout_s is not None and (not isinstance(timeout_s, (int, float)) or timeout_s <= 0):
        raise BadInput(f"{where}budget.timeout_s: {timeout_s!r} must be a positive number")
    hours = budget.get("hours")
    if hours is not None:
        if not isinstance(hours, (int, float)) or isinstance(hours, bool) or hours <= 0:
            raise BadInput(f"{where}budget.hours: {hours!r} must be a positive number (the "
                           "study's wall time, e.g. 1.5)")
        if timeout_s is not None:
            raise BadInput(f"{where}budget: give hours or timeout_s, not both (hours: "
                           f"{hours}, timeout_s: {timeout_s})")
        timeout_s = 3600.0 * hours
    tuning_trials = budget.get("tuning_trials")
    if tuning_trials is not None and (not isinstance(tuning_trials, int) or
                                      isinstance(tuning_trials, bool) or tuning_trials < 0):
        raise BadInput(f"{where}budget.tuning_trials: {tuning_trials!r} must be an integer >= 0 "
                       "(MetaSchedule measurements for the whole study; 0: reuse and transfer "
                       "only)")

    for key in ("trial_timeout_s", "trial_memory_mb"):
        value = budget.get(key)
        if value is not None and (not isinstance(value, (int, float)) or
                                  isinstance(value, bool) or value <= 0):
            raise BadInput(f"{where}budget.{key}: {value!r} must be a positive number")
    limits = faults.Limits(budget.get("trial_timeout_s"), budget.get("trial_memory_mb"))
    rounds = parse_rounds(budget.get("tuning_rounds"), where)

    targets = load_targets(doc.get("targets"), path, where)
    artifacts = load_artifacts(doc.get("artifacts"), where)
    gates = parse_gates(doc.get("gates"), where)
    if gates.get("untuned_build") and "latency_ms" not in objectives:
        raise BadInput(f"{where}gates.untuned_build judges a trial by its latency: it needs "
                       f"latency_ms among the objectives (given: {', '.join(objectives)})")

    layers = doc.get("space") or {}
    if not isinstance(layers, dict):
        raise BadInput(f"{where}space: a mapping of layer -> parameters")
    params: dict[str, Param] = {}
    for layer, entries in layers.items():
        if layer not in LAYERS:
            raise allowed(f"{where}space", layer, list(LAYERS))
        if not isinstance(entries, dict):
            raise BadInput(f"{where}space.{layer}: a mapping of parameter -> value")
        keys = [f.name for f in dataclasses.fields(LAYERS[layer])]
        for key, spec in entries.items():
            if key not in keys:
                raise allowed(f"{where}space.{layer}", key, keys)
            name = f"{layer}.{key}"
            params[name] = _parse_param(name, spec, f"{where}space.", params)
    ordered = {n: params[n] for n in _all_names() if n in params}
    _check_target_names(ordered, targets, f"{where}space.")
    if samplers.SAMPLERS.attr(sampler["name"], "enumerates"):
        continuous = [n for n, p in ordered.items() if p.choices is None and p.step is None]
        if continuous:
            raise BadInput(f"{where}sampler grid enumerates the space: {continuous[0]} is a "
                           "continuous range; give it a step or a list of choices")
    space = Space(str(path), study, seed, dict(objectives), sampler, trials, timeout_s,
                  ordered, text, targets, thresholds, artifacts, limits, gates, tuning_trials,
                  rounds, " ".join(str(doc.get("description") or "").split()))
    _check_conditions(space, where)
    if rounds is not None:  # the first round's budget is compiler.trials
        given = space.params.get("compiler.trials")
        if given is not None and given.values() != [rounds.start]:
            raise BadInput(f"{where}budget.tuning_rounds starts at {rounds.start} trials, "
                           f"compiler.trials gives {given.values()}: give one (with rounds, "
                           "leave compiler.trials out)")
        tuner = space.params.get("compiler.tuner")
        if tuner is None or "metaschedule" not in tuner.values():
            raise BadInput(f"{where}budget.tuning_rounds: compiler.tuner never is metaschedule "
                           "in this space, so nothing would be tuned in rounds")
        space = space.pin({"compiler.trials": rounds.start})
    return space


def _check_conditions(space: Space, where: str) -> None:
    """Stack order must put a condition's parent first; a range on a conditional param is ok."""
    names = list(space.params)
    for name, param in space.params.items():
        for parent, _ in param.when:
            if names.index(parent) > names.index(name):
                raise BadInput(f"{where}space.{name}.when: {parent} comes later in the stack; "
                               "a condition can only refer to an earlier parameter")
    # a parameter that exists only for some values of another (compress.amount for
    # unstructured, compress.ratio for channel) must be given wherever those can be chosen
    for name in _all_names():
        meta = _field_info(name).metadata
        if "unset" in meta:  # optional: the method has its own default
            continue
        for parent, values in meta.get("when", {}).items():
            default = _field_info(parent).default
            possible = space.params[parent].values() if parent in space.params else [default]
            if name not in space.params and any(v in values for v in possible):
                raise BadInput(f"{where}space.{name}: required when {parent} can be "
                               f"{' or '.join(values)} (give a value or a low/high range)")
