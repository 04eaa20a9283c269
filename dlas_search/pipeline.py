"""One trial: the stack walked top to bottom, one line a layer.

    result = run(config)          # config: space.TrialConfig
    result.metrics["latency_ms"]

Caching, stage timings and fault attribution belong to the stages (stages.py), not to this
function: read it as the stack.
"""
from __future__ import annotations

from .cache import StageCache
from .errors import BadInput
from .gates import Gates
from .result import TrialResult
from .stages import Stages

__all__ = ["run", "TrialResult"]


def run(cfg, cache: StageCache | None = None, gates: Gates | None = None) -> TrialResult:
    """Run one configuration (a space.TrialConfig) through the six layers and measure it;
    `gates` (a study's) may stop it after fine-tuning or, for a tuned trial, after an
    untuned build (`result.stopped` says where and why)."""
    if cfg.ruled_out:  # decided by the space; a search prunes these before calling run
        raise BadInput(cfg.ruled_out)
    stack = Stages(cfg, cache, gates)
    stack.target()                                      # 6: the target, resolved first
    stack.data()                                        # 1: datasets
    compressed = stack.compressed()                     # 2-3: model, compression, fine-tuning
    if gates and (why := gates.after_finetune(compressed.metrics)):
        return stack.stopped("finetune", why, compressed)  # cannot reach the front
    plan = stack.algorithms()                           # 4: conv algorithms and data formats
    if gates and gates.untuned_build and stack.tunes():  # worth tuning? (untuned, timed)
        if why := stack.untuned_gate(compressed, plan):
            return stack.stopped("untuned_build", why, compressed)
    built = stack.compiled(compressed, plan)            # 5: compiler and tuning
    return stack.measured(compressed, built)            # 6: checked and timed on the target
