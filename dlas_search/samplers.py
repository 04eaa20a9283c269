"""The study's samplers, registered by the name a space's `sampler:` uses.

Each entry is a factory `make(space, seed, constraints) -> optuna.samplers.BaseSampler`, with
the sampler settings a space may give it (`settings`). All are Optuna's own, seeded:

| name | what |
| --- | --- |
| `tpe` | multivariate, grouped TPE; steers away from infeasible trials |
| `nsga2` (default) | NSGA-II, `population_size` (unset: 50); steers away from infeasible trials |
| `random` | uniform random |
| `grid` | every configuration of the space exactly once, then the study stops |
| `qmc` | a scrambled Sobol sequence over the numeric ranges (choices drawn at random) |

    make = SAMPLERS.lookup("nsga2")
    sampler = make(space, seed=0, constraints=None)
"""
from __future__ import annotations

import warnings

import optuna

from .registry import Registry

__all__ = ["SAMPLERS", "DEFAULT", "settings"]

SAMPLERS = Registry("sampler", "sampler")
DEFAULT = "nsga2"


def settings(name: str) -> tuple[str, ...]:
    """The keys a space's `sampler:` mapping may hold for sampler `name` (`name` itself too)."""
    return ("name", *SAMPLERS.attr(name, "settings", ()))


@SAMPLERS.register("tpe")
def _tpe(space, seed: int, constraints):
    """Multivariate, grouped TPE (Optuna); steers away from infeasible trials."""
    with warnings.catch_warnings():  # constraints_func is experimental in Optuna
        warnings.simplefilter("ignore")
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                          constraints_func=constraints)


@SAMPLERS.register("nsga2", settings=("population_size",))
def _nsga2(space, seed: int, constraints):
    """NSGA-II (Optuna), `population_size` (unset: 50); steers away from infeasible trials."""
    return optuna.samplers.NSGAIISampler(
        population_size=space.sampler.get("population_size", 50), seed=seed,
        constraints_func=constraints)


@SAMPLERS.register("random")
def _random(space, seed: int, constraints):
    """Uniform random sampling (Optuna)."""
    return optuna.samplers.RandomSampler(seed=seed)


@SAMPLERS.register("grid", enumerates=True)
def _grid(space, seed: int, constraints):
    """Every configuration of the space exactly once, then the study stops."""
    return optuna.samplers.GridSampler(space.grid(), seed=seed)


@SAMPLERS.register("qmc")
def _qmc(space, seed: int, constraints):
    """A scrambled Sobol sequence over the numeric ranges (choices drawn at random)."""
    with warnings.catch_warnings():  # experimental in Optuna
        warnings.simplefilter("ignore")
        return optuna.samplers.QMCSampler(qmc_type="sobol", scramble=True, seed=seed,
                                          warn_independent_sampling=False)
