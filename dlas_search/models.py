"""Layer 2, models and architectures: a configuration and the data's shape in, a trained
`torch.nn.Module` out.

Models come from torchvision by name (random init: this layer records where weights came from)
and are adapted to the class count and, with `model.stem: cifar`, to small images.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torchvision
from torch import nn

from . import training
from .data import Data


def _cifar_stem_resnet(model: nn.Module) -> nn.Module:
    """3x3 stride-1 first conv and no max-pool: keeps resolution on 32x32 inputs."""
    model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def _cifar_stem_mobilenet(model: nn.Module) -> nn.Module:
    """Stride 1 in the first conv (the CIFAR adaptation of MobileNetV2)."""
    model.features[0][0].stride = (1, 1)
    return model


# name -> adaptation for small inputs (`model.stem: cifar`)
ARCHS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "resnet18": _cifar_stem_resnet,
    "mobilenet_v2": _cifar_stem_mobilenet,
}


@dataclass(frozen=True)
class ModelConfig:
    arch: str = field(default="resnet18", metadata={"choices": ARCHS})
    stem: str = field(default="standard", metadata={"choices": ("standard", "cifar")})
    weights: str = field(default="random", metadata={"choices": ("random",)})
    epochs: int = field(default=3, metadata={"min": 0, "max": 1000})  # training from scratch
    lr: float = field(default=0.05, metadata={"min": 1e-6, "max": 10.0})


def create(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The untrained architecture, adapted to the class count and stem."""
    model = torchvision.models.get_model(cfg.arch, weights=None, num_classes=num_classes)
    if cfg.stem == "cifar":
        model = ARCHS[cfg.arch](model)
    return model


def build(cfg: ModelConfig, data: Data, seed: int) -> nn.Module:
    """The model with its weights: random init trained for `cfg.epochs` on the training split."""
    torch.manual_seed(seed)
    model = create(cfg, data.num_classes)
    training.fit(model, data.train, cfg.epochs, cfg.lr, desc=f"train {cfg.arch}")
    return training.recalibrate_batchnorm(model, data.train)
