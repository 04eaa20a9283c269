"""One parameter of a space: fixed, a categorical choice, or an int/float range, with the
condition (`when:`) under which it exists; parsed from its YAML form."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import optuna
import yaml

from .. import hardware
from ..errors import BadInput, allowed
from .config import _all_names, _field_info, check_value

__all__ = ["Param", "parse_assignment"]


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


def _check_target_names(params: dict[str, Param], targets: Mapping, where: str) -> None:
    """Every `hw.target` choice names a known target (or is a well-formed rpc:// URL)."""
    param = params.get("hw.target")
    for name in (param.values() if param is not None and param.choices is not None else []):
        try:
            hardware.lookup(name, targets)
        except BadInput as e:
            raise BadInput(f"{where}{e}") from None


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
