"""Search spaces: `spaces/*.yaml` in, validated and typed trial configurations out.

A space file names, per layer, each parameter's value: a scalar (fixed), a list (a categorical
choice) or a mapping (`choices:` or a `low:`/`high:` range, optional `step:`, `log:`,
`default:`, and `when:` to make it exist only for given values of an earlier parameter). The
dotted names (`compress.amount`) are the same in YAML, Optuna, MLflow and `--set`.

    space = load_space("spaces/quickstart.yaml")
    config = space.suggest(optuna_trial)     # or space.defaults(), space.configure({...})
"""
from .config import (ARTIFACTS, DIRECTIONS, LAYERS, OBJECTIVE_METRICS, TOP_LEVEL, TrialConfig,
                     check_value, infeasible)
from .definition import Space
from .files import (MAX_YAML_BYTES, load_artifacts, load_space, load_targets, parse_assignment,
                    read_text, read_yaml)
from .params import Param

__all__ = ["ARTIFACTS", "DIRECTIONS", "LAYERS", "OBJECTIVE_METRICS", "TOP_LEVEL", "TrialConfig",
           "check_value", "infeasible", "Space", "Param", "MAX_YAML_BYTES", "load_space",
           "load_targets", "load_artifacts", "parse_assignment", "read_text", "read_yaml"]
