"""Layer 1, datasets and problem spaces: a configuration in, seeded train/val loaders out.

Each dataset is one function registered by the name the YAML uses (`data.name`). `digits`
ships inside scikit-learn, so the embedded default runs with no download.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

DATASETS: dict[str, Callable[["DataConfig", int], tuple]] = {}


def dataset(name: str):
    """Register a loader `fn(cfg, seed) -> (x_train, y_train, x_val, y_val, num_classes)`."""
    def register(fn):
        DATASETS[name] = fn
        return fn
    return register


@dataclass(frozen=True)
class DataConfig:
    name: str = field(default="digits", metadata={"choices": DATASETS})
    image_size: int = field(default=32, metadata={"min": 8, "max": 512})
    val_fraction: float = field(default=0.25, metadata={"min": 0.05, "max": 0.9})
    batch_size: int = field(default=64, metadata={"min": 1, "max": 4096})


@dataclass
class Data:
    """What layer 1 gives the layers below."""
    train: DataLoader
    val: DataLoader
    input_shape: tuple[int, int, int, int]  # batch 1, NCHW: what the deployed model is timed on
    num_classes: int

    def example(self) -> torch.Tensor:
        """One validation image, batch 1: the input used for export, checks and timing."""
        return self.val.dataset.tensors[0][:1].clone()


@dataset("digits")
def _digits(cfg: DataConfig, seed: int):
    """scikit-learn's 1797 8x8 handwritten digits, as 3-channel images of `image_size`."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = torch.nn.functional.interpolate(
        images, size=(cfg.image_size, cfg.image_size), mode="bilinear", align_corners=False)
    images = images.repeat(1, 3, 1, 1)
    labels = torch.tensor(bunch.target, dtype=torch.long)
    idx_train, idx_val = train_test_split(
        np.arange(len(labels)), test_size=cfg.val_fraction, random_state=seed,
        stratify=labels.numpy())
    x_train, x_val = images[idx_train], images[idx_val]
    mean, std = x_train.mean(), x_train.std()  # normalise with training statistics only
    return (x_train - mean) / std, labels[idx_train], (x_val - mean) / std, labels[idx_val], 10


def load(cfg: DataConfig, seed: int) -> Data:
    """Load the dataset `cfg.name` with a split fixed by `seed`."""
    x_train, y_train, x_val, y_val, num_classes = DATASETS[cfg.name](cfg, seed)
    generator = torch.Generator().manual_seed(seed)
    train = DataLoader(TensorDataset(x_train, y_train), batch_size=cfg.batch_size,
                       shuffle=True, generator=generator)
    val = DataLoader(TensorDataset(x_val, y_val), batch_size=256, shuffle=False)
    return Data(train, val, (1, *x_train.shape[1:]), num_classes)
