"""The stage cache: what a stage produces depends only on the layers above it, so a trial that
repeats the upper layers of an earlier one loads their result instead of recomputing it.

Entries are content-addressed: the key hashes the settings of the layers involved, the seed and
the versions of the libraries that produced it. Models are pickles (`<stage>/<hash>.pt`); a
compiled module is a folder (`compile/<hash>/`: the library TVM loads, and its build report).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torchvision

__all__ = ["FORMAT", "StageCache", "fingerprint", "folder_digest"]


# Bump when what a stage stores changes shape (new metrics, new fields): old entries then miss.
FORMAT = 3


class StageCache:
    """A directory of `<stage>/<hash>.pt` files; `None` disables caching."""

    def __init__(self, root: str | Path | None):
        self.root = Path(root) if root else None

    def _path(self, stage: str, key: str) -> Path:
        salt = f"{FORMAT}|{torch.__version__}|{torchvision.__version__}|{key}"
        return self.root / stage / (hashlib.sha256(salt.encode()).hexdigest()[:24] + ".pt")

    def get_or_make_folder(self, stage: str, key: str, make: Callable[[], Any],
                           save: Callable[[Any, Path], None],
                           load: Callable[[Path], Any]) -> tuple[Any, bool, Path | None]:
        """(value, hit, entry folder or None) for a stage stored as files (a compiled library
        is a file TVM loads, not a pickle): `save(value, folder)` writes an entry, `load(folder)`
        reads it back and raises on anything broken, which rebuilds the entry."""
        if self.root is None:
            return make(), False, None
        path = self._path(stage, key).with_suffix("")
        if path.is_dir():
            try:
                return load(path), True, path
            except Exception:  # truncated, corrupt or stale: rebuild it
                shutil.rmtree(path, ignore_errors=True)
        value = make()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, suffix=".tmp"))  # atomic: renamed whole
        try:
            save(value, tmp)
            (tmp / "key.json").write_text(json.dumps({"stage": stage, "key": key}))
            os.replace(tmp, path)
        except OSError as e:
            if not path.is_dir():  # not merely another worker that stored it first
                warnings.warn(f"stage cache: could not store {stage} entry {path}: {e}")
        except Exception as e:  # a trial that worked does not fail over its cache entry
            warnings.warn(f"stage cache: could not store {stage} entry {path}: {e}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return value, False, (path if path.is_dir() else None)

    def get(self, stage: str, key: str) -> Any | None:
        """The stored value, or None when there is none (nothing is made)."""
        if self.root is None or not self._path(stage, key).exists():
            return None
        try:
            return torch.load(self._path(stage, key), weights_only=False)
        except Exception:  # truncated or stale: as if absent
            return None

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


def fingerprint(module: torch.nn.Module, precision: str) -> str:
    """A hash of what a compiler sees of a model: its class, layer structure, every weight
    and buffer (names, shapes, dtypes, bytes), any traced graph's code, and the precision."""
    h = hashlib.sha256(f"{precision}|{type(module).__qualname__}|{module!r}".encode())
    for sub in module.modules():
        if isinstance(sub, torch.fx.GraphModule):  # a quantised graph: its ops are its model
            h.update(sub.code.encode())
    for name, tensor in module.state_dict().items():
        if not isinstance(tensor, torch.Tensor):
            h.update(f"{name}={tensor!r}".encode())
            continue
        tensor = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def folder_digest(folder: Path) -> str:
    """A hash of every file's name and bytes under `folder` ("" when there is none)."""
    if not folder.is_dir():
        return ""
    h = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(file.relative_to(folder)).encode() + b"\0" + file.read_bytes())
    return h.hexdigest()
