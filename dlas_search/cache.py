"""The stage cache: what a stage produces depends only on the layers above it, so a trial that
repeats the upper layers of an earlier one loads their result instead of recomputing it.

Entries are content-addressed: the key hashes the settings of the layers involved, the seed and
the versions of the libraries that produced it.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import torchvision

# Bump when what a stage stores changes shape (new metrics, new fields): old entries then miss.
FORMAT = 3


class StageCache:
    """A directory of `<stage>/<hash>.pt` files; `None` disables caching."""

    def __init__(self, root: str | Path | None):
        self.root = Path(root) if root else None

    def _path(self, stage: str, key: str) -> Path:
        salt = f"{FORMAT}|{torch.__version__}|{torchvision.__version__}|{key}"
        return self.root / stage / (hashlib.sha256(salt.encode()).hexdigest()[:24] + ".pt")

    def get_or_make(self, stage: str, key: str, make: Callable[[], Any]) -> tuple[Any, bool]:
        """(value, hit). The value is pickled whole (our own files: torch.load trusts them)."""
        if self.root is None:
            return make(), False
        path = self._path(stage, key)
        if path.exists():
            try:
                return torch.load(path, weights_only=False), True
            except Exception:  # a truncated or stale entry: rebuild it
                path.unlink(missing_ok=True)
        value = make()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")  # atomic: never half-written
        os.close(fd)
        torch.save(value, tmp)
        os.replace(tmp, path)
        (path.with_suffix(".json")).write_text(json.dumps({"stage": stage, "key": key}))
        return value, False
