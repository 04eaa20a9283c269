"""A validated search space: its parameters in stack order, objectives, thresholds, sampler
and budget; it samples, enumerates and describes configurations."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

import optuna

from .. import faults, hardware, registry
from .config import ARTIFACTS, LAYERS, TrialConfig, _all_names
from .params import Param, _check_target_names, _parse_param, parse_assignment

__all__ = ["Space"]


@dataclass(frozen=True)
class Space:
    """A validated search space: parameters in stack order, objectives, sampler and budget."""
    path: str
    study: str
    seed: int
    objectives: dict[str, str]
    sampler: dict[str, Any]
    trials: int
    timeout_s: float | None
    params: dict[str, Param]
    text: str
    targets: Mapping[str, hardware.TargetSpec] = field(default_factory=dict)
    # metric -> {"min": x} and/or {"max": y}: a trial outside is infeasible (never on the front)
    thresholds: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    artifacts: Mapping[str, bool] = field(default_factory=lambda: dict(ARTIFACTS))
    # budget.trial_timeout_s / trial_memory_mb: a trial past either is stopped and fails alone
    limits: faults.Limits = field(default_factory=faults.Limits)
    # the `gates:` section (gates.GATES -> on/off; unset: gates.DEFAULTS)
    gates: Mapping[str, bool] = field(default_factory=dict)
    # budget.tuning_trials: MetaSchedule measurements the whole study may spend (None: no cap)
    tuning_trials: int | None = None
    # budget.tuning_rounds (rounds.Rounds): tuned configurations start small, the promising
    # ones are tuned further
    rounds: Any = None
    # the space's `description:` (the study run's description in MLflow opens with it)
    description: str = ""

    def violations(self, metrics: Mapping[str, float]) -> list[float]:
        """One number per threshold, <= 0 when met (Optuna's constraint convention); a metric
        the trial did not measure violates it."""
        out = []
        for metric, bounds in self.thresholds.items():
            value = metrics.get(metric)
            for kind, bound in bounds.items():
                if value is None:
                    out.append(float("inf"))
                else:
                    out.append(bound - value if kind == "min" else value - bound)
        return out

    @property
    def directions(self) -> list[str]:
        return list(self.objectives.values())

    def pin(self, pins: dict[str, Any]) -> "Space":
        """The space with some parameters fixed (`--set`), validated like the YAML."""
        params = dict(self.params)
        for name, value in pins.items():
            if name not in params:
                params[name] = _parse_param(name, value, "--set ", params)
            else:
                old = params[name]
                params[name] = dataclasses.replace(
                    _parse_param(name, value, "--set ", params), when=old.when)
        ordered = {n: params[n] for n in _all_names() if n in params}
        _check_target_names(ordered, self.targets, "--set ")
        return dataclasses.replace(self, params=ordered)

    def configure(self, chosen: dict[str, Any]) -> TrialConfig:
        """A TrialConfig from chosen values; parameters that are unset or do not apply take
        their layer's default (None for those that only exist under a condition)."""
        groups: dict[str, dict] = {layer: {} for layer in LAYERS}
        for name, param in self.params.items():
            layer, _, key = name.partition(".")
            if param.applies(chosen) and name in chosen:
                groups[layer][key] = chosen[name]
        return TrialConfig(**{layer: LAYERS[layer](**groups[layer]) for layer in LAYERS},
                           seed=self.seed, targets=self.targets, artifacts=self.artifacts)

    def logged(self, params: Mapping[str, str]) -> TrialConfig:
        """The configuration a run logged: its parameters as MLflow keeps them (strings, `-`
        where one does not apply), each read as `--set` reads it, over this space."""
        pins = dict(parse_assignment(f"{name}={value}") for name, value in params.items()
                    if name in _all_names() and value != "-")
        return self.pin(pins).defaults()

    def suggest(self, trial: optuna.Trial) -> TrialConfig:
        """Sample a configuration; conditional parameters are asked only where they apply."""
        chosen: dict[str, Any] = {}
        for name, param in self.params.items():
            if param.applies(chosen):
                chosen[name] = param.suggest(trial)
        return self.configure(chosen)

    def defaults(self) -> TrialConfig:
        chosen: dict[str, Any] = {}
        for name, param in self.params.items():
            if param.applies(chosen):
                chosen[name] = param.default
        return self.configure(chosen)

    def layer_variants(self, *layers: str) -> list[TrialConfig]:
        """Every combination of the categorical choices of `layers` (other parameters at their
        defaults): what a pre-flight check of those layers must see."""
        return self.variants(*(n for n in self.params if n.split(".")[0] in layers))

    def variants(self, *names: str) -> list[TrialConfig]:
        """Every combination of the categorical choices of the parameters `names` (others at
        their defaults), one per distinct setting of their layers."""
        import itertools
        layers = {n.split(".")[0] for n in names}
        names = [n for n in names
                 if n in self.params and self.params[n].choices is not None
                 and not self.params[n].fixed]
        configs = []
        for combo in itertools.product(*(self.params[n].choices for n in names)):
            chosen: dict[str, Any] = {}
            for name, param in self.params.items():
                if param.applies(chosen):
                    chosen[name] = dict(zip(names, combo)).get(name, param.default)
            configs.append(self.configure(chosen))
        return list({c.key(*layers): c for c in configs}.values())

    def ruled_out(self) -> str | None:
        """Why no configuration of the space can run, when the constraints rule out every one
        (e.g. `algo.format: sparse` with `compress.method: none`); None when some can."""
        reasons = [c.ruled_out for c in self.variants(*registry.constrained())]
        if reasons and all(reasons):
            return (f"{self.path}: the space's constraints rule out every configuration: "
                    f"{reasons[0]}")
        return None

    def grid(self) -> dict[str, list]:
        """Every sampled parameter's values, for Optuna's GridSampler (conditional ones too:
        a grid point that differs only in a parameter that does not apply repeats a
        configuration, and the search skips it without counting it)."""
        return {name: param.values() for name, param in self.params.items() if not param.fixed}

    def size(self) -> int | None:
        """Number of distinct configurations the constraints allow, or None when a continuous
        range makes it infinite (conditional parameters counted where they apply)."""
        configs = [{}]
        for name, param in self.params.items():
            if param.choices is None and param.step is None:
                return None
            nxt = []
            for chosen in configs:
                if param.applies(chosen):
                    nxt.extend({**chosen, name: v} for v in param.values())
                else:
                    nxt.append(chosen)
            configs = nxt
        return sum(self.configure(chosen).ruled_out is None for chosen in configs)

    def show(self) -> str:
        """The space as a tree, by layer."""
        lines = [f"{self.study} ({self.path})",
                 "  objectives: " + ", ".join(f"{k} {v}" for k, v in self.objectives.items()),
                 f"  sampler: {self.sampler['name']} seed {self.seed}; budget {self.trials} trials"]
        for layer in LAYERS:
            names = [n for n in self.params if n.startswith(layer + ".")]
            if names:
                lines.append(f"  {layer}")
                possible = {p: param.values() for p, param in self.params.items()
                            if param.choices is not None}
                lines += [f"    {n.split('.', 1)[1]}: {self.params[n].describe(possible)}"
                          for n in names]
        size = self.size()
        lines.append(f"  size: {size if size is not None else 'infinite (continuous ranges)'}")
        return "\n".join(lines)
