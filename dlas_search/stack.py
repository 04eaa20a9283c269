"""The six layers of the Deep Learning Acceleration Stack, named once.

Each layer has a number, a name, the parameter groups a space gives it (the prefix of its
dotted names: `compress.amount`) and the stages a trial runs in it (what a failure is
attributed to: `dlas.failed_layer`). Everything that lists layers asks here: the space (its
groups, in stack order), the fault attribution, the Pareto export and the report.

| # | layer | parameters | stages |
| --- | --- | --- | --- |
| 1 | datasets and problem spaces | `data.*` | data |
| 2 | models and architectures | `model.*` | model |
| 3 | model optimisations | `compress.*`, `finetune.*` | compression, fine-tune |
| 4 | algorithms and data formats | `algo.*` | (part of compile) |
| 5 | systems software | `compiler.*` | compile, tune |
| 6 | hardware | `hw.*` | hardware, measure |
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Layer", "LAYERS", "GROUPS", "STAGES", "group_order"]


@dataclass(frozen=True)
class Layer:
    number: int
    name: str
    groups: tuple[str, ...]   # parameter prefixes
    stages: tuple[str, ...]   # where a trial's work (and its failures) happen


LAYERS = (
    Layer(1, "datasets and problem spaces", ("data",), ("data",)),
    Layer(2, "models and architectures", ("model",), ("model",)),
    Layer(3, "model optimisations", ("compress", "finetune"), ("compression", "fine-tune")),
    Layer(4, "algorithms and data formats", ("algo",), ()),
    Layer(5, "systems software", ("compiler",), ("compile", "tune")),
    Layer(6, "hardware", ("hw",), ("hardware", "measure")),
)
# parameter groups in stack order: data, model, compress, finetune, algo, compiler, hw
GROUPS = tuple(group for layer in LAYERS for group in layer.groups)
# stages in the order a trial runs them (the target is resolved first, so a study fails fast)
STAGES = ("hardware", "data", "model", "compression", "fine-tune", "compile", "tune", "measure")


def group_order(name: str) -> int:
    """Sort key of a dotted parameter name by its layer group (unknown groups last)."""
    group = name.split(".")[0]
    return GROUPS.index(group) if group in GROUPS else len(GROUPS)
