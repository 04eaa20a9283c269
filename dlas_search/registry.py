"""One registry for every choice a space file names.

A YAML value such as `compress.method: unstructured` or `algo.conv: winograd` is a name; the
thing behind it (a compression technique, a conv primitive, a dataset loader, a sampler, a
device kind) registers itself under that name where it is defined, and everything else asks
the registry: the space for the allowed values, `space show` and the docs for the list, the
run names and the report for labels, the space's gate for constraints.

    PRIMITIVES = Registry("algo.conv", "conv primitive", instantiate=True)

    @PRIMITIVES.register("direct")
    class Direct(Primitive): ...

    PRIMITIVES.lookup("direkt")
    # BadInput: algo.conv: 'direkt' is not allowed (did you mean 'direct'?); allowed: direct, ...

A choice declares what it knows about itself as attributes (for a class) or as keyword
metadata at registration: `label` (a few words for run names and reports), `settings` (the
parameters of its layer that apply only to it), `precision`, and `infeasible(config)` (a
constraint on the rest of the trial's configuration: the reason it cannot run, or None).
`registry.infeasible(params, config)` asks the chosen entry of every registry, so a
constraint is written once, beside its choice (with `reads`: the other parameters it reads).
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Callable, Iterable, Iterator, Mapping

from .errors import allowed

__all__ = ["Registry", "REGISTRIES", "infeasible", "constrained", "discover"]

# key (the dotted parameter, or the space's section for `sampler`) -> its registry
REGISTRIES: dict[str, "Registry"] = {}


class Registry(Mapping):
    """Names -> choices of one kind. `key` is the dotted parameter the YAML uses (it prefixes
    every error); `what` names the kind in messages and docs. With `instantiate=True` a
    registered class is stored as an instance and given a `name` attribute."""

    def __init__(self, key: str, what: str, *, instantiate: bool = False):
        self.key, self.what, self.instantiate = key, what, instantiate
        self._items: dict[str, Any] = {}
        self._meta: dict[str, dict[str, Any]] = {}
        REGISTRIES[key] = self

    # --- registering ----------------------------------------------------------------------------

    def register(self, name: str, obj: Any = None, /, **meta: Any):
        """`REG.register("name")` as a decorator, or `REG.register("name", obj)`; keyword
        metadata (label, settings, check, ...) is kept beside the entry (`meta(name)`)."""
        def add(thing):
            if name in self._items:
                raise ValueError(f"{self.what} {name!r} is registered twice")
            entry = thing
            if self.instantiate and isinstance(thing, type):
                thing.name = name
                entry = thing()
            self._items[name] = entry
            self._meta[name] = dict(meta)
            return thing
        return add if obj is None else add(obj)

    # --- asking ---------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Every name a space may use, in registration order."""
        return list(self._items)

    def lookup(self, name: str, where: str = "") -> Any:
        """The entry for `name`; BadInput naming the key, the value, the closest allowed name
        and all the allowed ones otherwise."""
        if name not in self.names():  # a list, not a dict: a YAML value may be unhashable
            raise allowed(f"{where}{self.key}", name, self.names())
        return self[name]

    def meta(self, name: str) -> dict[str, Any]:
        """The keyword metadata `name` was registered with (empty if none)."""
        return self._meta.get(name, {})

    def attr(self, name: str, attribute: str, default: Any = None) -> Any:
        """What the choice `name` declares about itself: registration metadata first, then an
        attribute of the entry."""
        meta = self.meta(name)
        if attribute in meta:
            return meta[attribute]
        return getattr(self._items.get(name), attribute, default)

    def label(self, name: str) -> str:
        return str(self.attr(name, "label") or name)

    def infeasible(self, name: str, config: Any) -> str | None:
        """The reason the chosen entry `name` cannot run in `config`, or None."""
        rule: Callable[[Any], str | None] | None = self.attr(name, "infeasible")
        return rule(config) if callable(rule) else None

    def describe(self) -> list[tuple[str, str]]:
        """(name, first line of its docstring or label) for listings and docs."""
        rows = []
        for name in self.names():
            doc = self.attr(name, "doc") or (getattr(self._items[name], "__doc__", "") or "")
            rows.append((name, doc.strip().splitlines()[0] if doc.strip() else self.label(name)))
        return rows

    # --- a Mapping, so `choices` metadata and `in` work on the live set of names ----------------

    def __getitem__(self, name: str) -> Any:
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __contains__(self, name: object) -> bool:
        return name in self.names()

    def __repr__(self) -> str:
        return f"Registry({self.key!r}: {', '.join(self.names())})"


def infeasible(params: Mapping[str, Any], config: Any) -> str | None:
    """The first reason any chosen entry gives why `config` cannot run (its registries asked
    in the order of `params`, the trial's dotted parameters), or None."""
    for key, value in params.items():
        registry = REGISTRIES.get(key)
        if registry is not None and isinstance(value, str) and value in registry:
            reason = registry.infeasible(value, config)
            if reason:
                return reason
    return None


def constrained() -> tuple[str, ...]:
    """The parameters the registered constraints read (each rule's `reads`, with its own
    registry's key), for enumerating a space's choices that could rule configurations out."""
    names: list[str] = []
    for key, registry in REGISTRIES.items():
        for name in registry.names():
            if callable(registry.attr(name, "infeasible")):
                for read in (key, *registry.attr(name, "reads", ())):
                    if read not in names:
                        names.append(read)
    return tuple(names)


def discover(package: str, path: Iterable[str]) -> None:
    """Import every module of a package (its `__name__` and `__path__`), so a choice added as
    a new module registers itself without an import line elsewhere: a package's `__init__`
    calls this after importing its own modules in the order it wants them listed."""
    for module in sorted(m.name for m in pkgutil.iter_modules(list(path))):
        importlib.import_module(f"{package}.{module}")
