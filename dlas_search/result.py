"""What one trial gives back: its metrics, which stages came from the cache, provenance tags,
and the folders its MLflow run keeps as artifacts.

    result = pipeline.run(config)
    result.metrics["latency_ms"], result.tags()["cache.finetune"]

Kept apart from the pipeline so that code which only reads results (a child process's
parent, the search's bookkeeping) imports nothing of torch or TVM.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["TrialResult"]


@dataclass
class TrialResult:
    metrics: dict[str, float]
    cache: dict[str, str] = field(default_factory=dict)   # stage -> hit / miss / unused
    info: dict[str, str] = field(default_factory=dict)    # device, target, ...
    # what the trial built (compression.Compressed, compiler.Compiled, data.Data), for callers
    # that look further (benchmarks, tests); never logged, never sent between processes
    compressed: Any = None
    built: Any = None
    dataset: Any = None
    # folders the trial's run keeps as artifacts (name -> folder), e.g. the tuning records
    artifacts: dict[str, Path] = field(default_factory=dict)
    # the space's thresholds as Optuna constraints (<= 0: met), when the space has any
    constraints: list[float] = field(default_factory=list)
    # a gate stopped the trial (gates.py): {"at": stage, "reason": why}; its metrics are the
    # stages' before it
    stopped: dict[str, str] = field(default_factory=dict)
    # what logging its MLflow Model needs (mlmodel.py), for a library built for the local CPU:
    # input_shape, classes, precision, target, preprocessing, example, dataset (plain data)
    deploy: dict = field(default_factory=dict)

    def discard_artifacts(self) -> None:
        """Remove the artifact folders once they are logged (they live in temporary space)."""
        for folder in self.artifacts.values():
            shutil.rmtree(folder.parent if folder.parent.name.startswith("dlas-") else folder,
                          ignore_errors=True)
        self.artifacts.clear()

    def tags(self) -> dict[str, str]:
        """MLflow tags of the trial: `cache.<stage>` hit/miss and `dlas.<info>`."""
        return {**{f"cache.{k}": v for k, v in self.cache.items()},
                **{f"dlas.{k}": v for k, v in self.info.items()}}

    def to_message(self) -> dict[str, Any]:
        """What a child process sends its parent (plain data: no torch or TVM objects)."""
        return {"metrics": self.metrics, "cache": self.cache, "info": self.info,
                "artifacts": {k: str(v) for k, v in self.artifacts.items()},
                "stopped": self.stopped}

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> "TrialResult":
        return cls(message["metrics"], message["cache"], message["info"],
                   artifacts={k: Path(v) for k, v in message["artifacts"].items()},
                   stopped=message.get("stopped") or {})
