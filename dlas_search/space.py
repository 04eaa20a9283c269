"""Search spaces: `spaces/*.yaml` in, validated and typed trial configurations out.

A space file names, per layer, each parameter's value: a scalar (fixed), a list (a categorical
choice) or a mapping (`choices:` or a `low:`/`high:` range, optional `step:`, `log:`,
`default:`, and `when:` to make it exist only for given values of an earlier parameter). The
dotted names (`compress.amount`) are the same in YAML, Optuna, MLflow and `--set`.

    space = load_space("spaces/quickstart.yaml")
    config = space.suggest(optuna_trial)     # or space.defaults(), space.configure({...})
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import optuna
import yaml

from . import algorithms, compiler, compression, data, faults, hardware, models, registry, samplers, stack
from .errors import BadInput, allowed

# parameter group -> its configuration class, in stack order (stack.GROUPS)
LAYERS: dict[str, type] = dict(zip(stack.GROUPS, (
    data.DataConfig, models.ModelConfig, compression.CompressConfig,
    compression.FinetuneConfig, algorithms.AlgoConfig, compiler.CompilerConfig,
    hardware.HardwareConfig)))
OBJECTIVE_METRICS = ("accuracy", "latency_ms", "size_mb", "macs", "params", "sparsity",
                     "speedup_vs_torch")
DIRECTIONS = ("maximize", "minimize")
TOP_LEVEL = ("study", "description", "seed", "objectives", "thresholds", "sampler", "budget",
             "targets", "artifacts", "space")
# what each finished trial's run keeps under `model/` (tens of MB each: can be switched off)
ARTIFACTS = {"weights": True, "library": True}


@dataclass(frozen=True)
class TrialConfig:
    """One point of the stack: a frozen group per layer, and the seed."""
    data: data.DataConfig
    model: models.ModelConfig
    compress: compression.CompressConfig
    finetune: compression.FinetuneConfig
    algo: algorithms.AlgoConfig
    compiler: compiler.CompilerConfig
    hw: hardware.HardwareConfig
    seed: int = 0
    # the space's target registry (name -> entry), for the names `hw.target` may use
    targets: Mapping[str, hardware.TargetSpec] = field(default_factory=dict, compare=False)
    # the run artifacts to keep (ARTIFACTS): not a setting of the stack
    artifacts: Mapping[str, bool] = field(default_factory=lambda: dict(ARTIFACTS),
                                          compare=False)
    # why the space rules this configuration out (None: it can run), decided once, here
    ruled_out: str | None = field(default=None, init=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "ruled_out", infeasible(self))

    def target(self) -> hardware.TargetSpec:
        return hardware.lookup(self.hw.target, self.targets)

    def params(self) -> dict[str, Any]:
        """Flat dotted names -> values (None where a parameter does not apply)."""
        return {f"{layer}.{k}": v for layer in LAYERS
                for k, v in dataclasses.asdict(getattr(self, layer)).items()}

    def key(self, *layers: str) -> str:
        """A stable text of the given layers' settings and the seed (for cache keys)."""
        chosen = {k: v for k, v in self.params().items() if k.split(".")[0] in layers}
        return json.dumps({"seed": self.seed, **chosen}, sort_keys=True)

    def resolved(self, group: str):
        """The settings of parameter group `group` as its layer uses them: a setting that
        applies but was left unset takes the default its field declares (`unset`), so a layer
        never sees None for a setting it uses. `params()` and `key()` keep the values as
        given (they name the run and key the stage cache)."""
        settings, params, fill = getattr(self, group), self.params(), {}
        for f in dataclasses.fields(settings):
            applies = all(params.get(parent) in values
                          for parent, values in f.metadata.get("when", {}).items())
            if getattr(settings, f.name) is None and "unset" in f.metadata and \
                    "when" in f.metadata and applies:
                fill[f.name] = f.metadata["unset"]
        return dataclasses.replace(settings, **fill) if fill else settings

    def summary(self) -> str:
        """A few words for run names and progress lines."""
        return " ".join([self.model.arch, compression.summary(self.compress), self.algo.conv,
                         self.algo.format, self.compiler.tuner, self.hw.target])


def _field_info(name: str) -> dataclasses.Field:
    layer, _, key = name.partition(".")
    return {f.name: f for f in dataclasses.fields(LAYERS[layer])}[key]


def _base_type(f: dataclasses.Field) -> type:
    """int, float, str or bool from the field's annotation (`float | None` -> float)."""
    hint = typing.get_type_hints(_owner(f))[f.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _owner(f: dataclasses.Field) -> type:
    return next(cls for cls in LAYERS.values() if f in dataclasses.fields(cls))


def check_value(name: str, value: Any, where: str = "") -> Any:
    """Validate one value of parameter `name` against its type, choices and bounds."""
    f = _field_info(name)
    kind = _base_type(f)
    label = f"{where}{name}"
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BadInput(f"{label}: {value!r} is a {type(value).__name__}; expected {kind.__name__}")
    choices = f.metadata.get("choices")
    if choices is not None and value not in choices:
        raise allowed(label, value, list(choices))
    low, high = f.metadata.get("min"), f.metadata.get("max")
    if low is not None and value < low or high is not None and value > high:
        raise BadInput(f"{label}: {value!r} is out of range; allowed: {low} to {high}")
    return value


@dataclass(frozen=True)
class Param:
    """One parameter of a space: fixed, categorical, or an int/float range."""
    name: str
    choices: tuple | None = None      # fixed = one choice
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    default: Any = None
    when: tuple[tuple[str, tuple], ...] = ()   # (parent name, allowed parent values)

    @property
    def fixed(self) -> bool:
        return self.choices is not None and len(self.choices) == 1

    def applies(self, chosen: dict[str, Any]) -> bool:
        return all(chosen.get(parent) in values for parent, values in self.when)

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.fixed:
            return self.choices[0]
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if isinstance(self.low, int) and isinstance(self.high, int):
            return trial.suggest_int(self.name, self.low, self.high, step=int(self.step or 1),
                                     log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def values(self) -> list:
        """Every value (grid enumeration); ranges need a step."""
        if self.choices is not None:
            return list(self.choices)
        if self.step is None:
            return [self.low, self.high]
        count = int(round((self.high - self.low) / self.step)) + 1
        return [type(self.low)(round(self.low + i * self.step, 10)) for i in range(count)]

    def describe(self, possible: dict[str, list] | None = None) -> str:
        """One line; `possible` (parent -> values the space can take) trims the conditions
        to values that can occur."""
        if self.fixed:
            text = repr(self.choices[0])
        elif self.choices is not None:
            text = "one of " + ", ".join(map(repr, self.choices))
        else:
            text = f"{self.low} to {self.high}" + (f" step {self.step}" if self.step else "") + \
                   (" (log)" if self.log else "")
        possible = possible or {}
        conditions = [(p, [x for x in v if p not in possible or x in possible[p]] or list(v))
                      for p, v in self.when]
        if conditions:
            text += " when " + ", ".join(f"{p} in {v}" for p, v in conditions)
        return text


def _parse_param(name: str, spec: Any, where: str, known: dict[str, Param]) -> Param:
    label = f"{where}{name}"
    if not isinstance(spec, dict):
        spec = {"choices": spec if isinstance(spec, list) else [spec]}
    keys = set(spec) - {"choices", "low", "high", "step", "log", "default", "when"}
    if keys:
        raise allowed(f"{label}", sorted(keys)[0],
                      ["choices", "low", "high", "step", "log", "default", "when"])
    when = []
    implied = _field_info(name).metadata.get("when", {})  # e.g. an amount only for pruning
    for parent, values in (spec.get("when") or implied).items():
        if parent not in known:
            if parent not in spec.get("when", {}):
                continue  # the implied parent is fixed at its default: nothing to condition on
            raise allowed(f"{label}.when", parent, list(known) or ["(an earlier parameter)"])
        values = tuple(values) if isinstance(values, (list, tuple)) else (values,)
        for v in values:
            check_value(parent, v, f"{label}.when.")
        when.append((parent, values))
    if "choices" in spec:
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise BadInput(f"{label}: the choice list is empty; give at least one value")
        choices = tuple(check_value(name, c, where) for c in choices)
        default = check_value(name, spec.get("default", choices[0]), where)
        if default not in choices:
            raise allowed(f"{label}.default", default, list(choices))
        return Param(name, choices=choices, default=default, when=tuple(when))
    if "low" not in spec or "high" not in spec:
        raise BadInput(f"{label}: a range needs both low and high (or give choices)")
    low, high = check_value(name, spec["low"], where), check_value(name, spec["high"], where)
    if low > high:
        raise BadInput(f"{label}: low {low!r} is greater than high {high!r}")
    step = spec.get("step")
    if step is not None and (not isinstance(step, (int, float)) or step <= 0):
        raise BadInput(f"{label}.step: {step!r} must be a positive number")
    log = spec.get("log", False)
    if log and (low <= 0 or step is not None):
        raise BadInput(f"{label}.log: a log range needs low > 0 and no step")
    default = check_value(name, spec.get("default", low), where)
    if not low <= default <= high:
        raise BadInput(f"{label}.default: {default!r} is outside {low} to {high}")
    return Param(name, low=low, high=high, step=step, log=bool(log), default=default,
                 when=tuple(when))


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


# --- constraints: combinations of valid values that cannot run together ----------------------

def infeasible(config: TrialConfig) -> str | None:
    """Why the space rules this configuration out (naming the problem and what is allowed),
    or None. Each choice declares its own constraints in the registry (the sparse format
    needs unstructured fp32 weights; PyTorch eager runs on the local CPU)."""
    return registry.infeasible(config.params(), config)


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


def _check_target_names(params: dict[str, Param], targets: Mapping, where: str) -> None:
    """Every `hw.target` choice names a known target (or is a well-formed rpc:// URL)."""
    param = params.get("hw.target")
    for name in (param.values() if param is not None and param.choices is not None else []):
        try:
            hardware.lookup(name, targets)
        except BadInput as e:
            raise BadInput(f"{where}{e}") from None


def _all_names() -> list[str]:
    return [f"{layer}.{f.name}" for layer, cls in LAYERS.items() for f in dataclasses.fields(cls)]


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
    budget_keys = ("trials", "timeout_s", "trial_timeout_s", "trial_memory_mb")
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

    for key in ("trial_timeout_s", "trial_memory_mb"):
        value = budget.get(key)
        if value is not None and (not isinstance(value, (int, float)) or
                                  isinstance(value, bool) or value <= 0):
            raise BadInput(f"{where}budget.{key}: {value!r} must be a positive number")
    limits = faults.Limits(budget.get("trial_timeout_s"), budget.get("trial_memory_mb"))

    targets = load_targets(doc.get("targets"), path, where)
    artifacts = load_artifacts(doc.get("artifacts"), where)

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
                  ordered, text, targets, thresholds, artifacts, limits)
    _check_conditions(space, where)
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


def parse_assignment(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` from --set, with VALUE read as YAML (so 0.5 is a float, [a, b] a list)."""
    if "=" not in text:
        raise BadInput(f"--set {text!r}: expected KEY=VALUE, e.g. --set model.arch=resnet18")
    name, _, raw = text.partition("=")
    name = name.strip()
    if name not in _all_names():
        raise allowed("--set", name, _all_names())
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return name, value
