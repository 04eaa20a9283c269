"""Layer 2, models and architectures: a configuration and the data's shape in, a trained
`torch.nn.Module` out.

`model.arch` names the architecture: the DLAS paper's seven (`PAPER_ARCHS`), any torchvision
classification model (`torchvision.models.list_models(module=torchvision.models)`), or a user
model `package.module:factory`, where `factory(num_classes=...)` returns an `nn.Module`. A user
factory is imported and called in this process: naming one executes that code.

`model.stem: cifar` adapts a family to small images (`STEMS`, one adapter per torchvision family).
`model.weights` says where the first weights come from: `random`, `imagenet` (torchvision's
default weights, from the torch hub cache or downloaded; a new final layer for another class
count; with `cifar`, a replaced first conv or VGG head starts random), or a checkpoint path (of
the adapted model). `describe` gives that as run tags; `check` validates before any work.

    cfg = ModelConfig(arch="mobilenet_v2", stem="cifar")
    check(cfg)
    model = create(cfg, num_classes=10)      # build(cfg, data, seed) also trains it
"""
from __future__ import annotations

import hashlib
import importlib
import os
import re
import socket
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from . import training
from .data import Data
from .errors import BadInput, allowed
from .registry import Registry

__all__ = ["STEMS", "PAPER_ARCHS", "ModelConfig", "stem", "family", "check", "describe", "create",
           "build", "torchvision_names"]

PAPER_ARCHS = ("resnet18", "resnet50", "mobilenet_v2", "vgg16", "densenet161",
               "efficientnet_b0", "mnasnet1_0")
FACTORY = re.compile(r"^[\w.]+:\w+$")   # package.module:factory
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".tar")
DOWNLOAD_TIMEOUT_S = 10.0               # per socket operation: an offline machine fails fast
# Architectures built with auxiliary classifiers that only run in train mode: trained and
# deployed without them (they return a tuple the training loop cannot score, pruning cannot see
# them from an eval-mode trace, and the deployed model never runs them, so they are not its size)
AUX_HEADS = frozenset({"googlenet", "inception_v3"})


@cache
def torchvision_names() -> frozenset[str]:
    return frozenset(torchvision.models.list_models(module=torchvision.models))


class ArchNames:
    """`model.arch` choices: open-ended, so a container rather than a list. Iterating gives the
    paper's seven and a description of the other allowed forms (for error messages)."""

    def __contains__(self, name) -> bool:
        return isinstance(name, str) and (
            name in torchvision_names() or FACTORY.match(name) is not None)

    def __iter__(self):
        yield from PAPER_ARCHS
        yield "any torchvision classification model name"
        yield "package.module:factory (user code)"


class WeightSources:
    """`model.weights` choices: `random`, `imagenet`, or a path to a checkpoint file (one with
    a directory part or a .pt/.pth/.ckpt/.bin/.tar suffix, so a typo is not taken for a file)."""

    def __contains__(self, value) -> bool:
        return isinstance(value, str) and (
            value in ("random", "imagenet") or "/" in value or os.sep in value
            or value.lower().endswith(CHECKPOINT_SUFFIXES))

    def __iter__(self):
        yield from ("random", "imagenet")
        yield "a checkpoint path (e.g. ./model.pt)"


# --- small-input adapters (`model.stem: cifar`), one per torchvision family ------------------

# torchvision family (builder module name) -> its small-input adapter for `model.stem: cifar`
STEMS = Registry("model.family", "small-input (cifar) stem")


def stem(family: str):
    """Register the small-input adapter of a torchvision family (its module name)."""
    return STEMS.register(family)


@stem("resnet")
def _resnet(model: nn.Module) -> nn.Module:
    """3x3 stride-1 conv1 and no max-pool: the 7x7/2 conv and pool cut 32x32 to 8x8 at once."""
    model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


@stem("densenet")
def _densenet(model: nn.Module) -> nn.Module:
    """3x3 stride-1 conv0 and no pool0, as for ResNet."""
    model.features.conv0 = nn.Conv2d(3, model.features.conv0.out_channels, 3, 1, 1, bias=False)
    model.features.pool0 = nn.Identity()
    return model


@stem("mobilenetv2")
@stem("efficientnet")
def _first_conv_stride_1(model: nn.Module) -> nn.Module:
    """Stride 1 in the first conv (the usual CIFAR adaptation of these inverted-residual nets)."""
    model.features[0][0].stride = (1, 1)
    return model


@stem("mnasnet")
def _mnasnet(model: nn.Module) -> nn.Module:
    """Stride 1 in the first conv, as for MobileNetV2."""
    model.layers[0].stride = (1, 1)
    return model


@stem("vgg")
def _vgg(model: nn.Module) -> nn.Module:
    """VGG has no down-sampling stem: its five max-pools take 32x32 to 1x1, which the 7x7
    adaptive pool copies 49 times into a 25088x4096 classifier (100M+ parameters). The CIFAR
    VGG keeps the features, pools to 1x1 and classifies with a small head."""
    channels = [m for m in model.features if isinstance(m, nn.Conv2d)][-1].out_channels
    classes = model.classifier[-1].out_features
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.classifier = nn.Sequential(nn.Linear(channels, 512), nn.ReLU(True), nn.Dropout(0.5),
                                     nn.Linear(512, classes))
    return model


def family(arch: str) -> str | None:
    """The torchvision family (builder module) of `arch`; None for a user factory."""
    if arch not in torchvision_names():
        return None
    return torchvision.models.get_model_builder(arch).__module__.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class ModelConfig:
    """`lr` is the SGD learning rate for training from scratch (`epochs`); VGG has no BatchNorm
    and stays at chance at the default 0.05: give it about 1e-4."""
    arch: str = field(default="resnet18", metadata={"choices": ArchNames()})
    stem: str = field(default="standard", metadata={"choices": ("standard", "cifar")})
    weights: str = field(default="random", metadata={"choices": WeightSources()})
    epochs: int = field(default=3, metadata={"min": 0, "max": 1000})  # training from scratch
    lr: float = field(default=0.05, metadata={"min": 1e-6, "max": 10.0})


# --- validation and provenance ----------------------------------------------------------------

def check(cfg: ModelConfig) -> None:
    """Raise BadInput for a configuration that cannot build, before any work: unknown arch,
    a user factory that does not import, `cifar` for a family without an adapter, a missing
    checkpoint. With `imagenet` it fetches the weights file now (cache, else a download with
    a short time-out), so an offline machine fails here and not in every trial."""
    if cfg.arch not in ArchNames():
        raise allowed("model.arch", cfg.arch, ArchNames())
    if cfg.stem not in ("standard", "cifar"):
        raise allowed("model.stem", cfg.stem, ("standard", "cifar"))
    if cfg.weights not in WeightSources():
        raise allowed("model.weights", cfg.weights, WeightSources())
    if cfg.stem == "cifar" and family(cfg.arch) not in STEMS:
        supported = [a for a in sorted(torchvision_names()) if family(a) in STEMS]
        raise BadInput(f"model.stem: cifar is not available for {cfg.arch!r}; it adapts the "
                       f"{', '.join(sorted(STEMS))} families: {', '.join(supported)}")
    if cfg.weights == "imagenet":
        _imagenet_file(cfg.arch)
    elif cfg.weights != "random" and not Path(cfg.weights).expanduser().is_file():
        raise BadInput(f"model.weights: checkpoint file {cfg.weights!r} not found "
                       "(allowed: random, imagenet or the path of a checkpoint file)")
    elif cfg.weights != "random":
        _read_checkpoint(Path(cfg.weights).expanduser())  # corrupt or not plain tensors: now
    if family(cfg.arch) is None:
        _factory(cfg.arch)


def describe(cfg: ModelConfig) -> dict[str, str]:
    """Run tags saying where the model and its first weights came from."""
    arch = "torchvision" if family(cfg.arch) else f"user factory {cfg.arch}"
    if cfg.weights == "random":
        weights = "random init"
    elif cfg.weights == "imagenet":
        weights = f"torchvision {_imagenet_weights(cfg.arch).name}"
    else:
        digest = hashlib.sha256(Path(cfg.weights).expanduser().read_bytes()).hexdigest()
        weights = f"checkpoint {cfg.weights} sha256:{digest[:12]}"
    return {"model.arch_source": arch, "model.weights_source": weights}


# --- building -----------------------------------------------------------------------------------

def create(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The untrained architecture with its first weights, adapted to class count and stem."""
    check(cfg)
    if family(cfg.arch) is None:
        model = _factory(cfg.arch)(num_classes=num_classes)
        if not isinstance(model, nn.Module):
            raise BadInput(f"model.arch: {cfg.arch}(num_classes=...) returned a "
                           f"{type(model).__name__}, not a torch.nn.Module")
    elif cfg.weights == "imagenet":
        model = torchvision.models.get_model(cfg.arch, weights=_imagenet_weights(cfg.arch))
    else:
        extra = {"aux_logits": False} if cfg.arch in AUX_HEADS else {}
        model = torchvision.models.get_model(cfg.arch, weights=None, num_classes=num_classes,
                                             **extra)
    if cfg.stem == "cifar":
        model = STEMS.lookup(family(cfg.arch))(model)
    if cfg.weights == "imagenet":
        _replace_head(model, num_classes)
    elif cfg.weights != "random":
        _load_checkpoint(model, Path(cfg.weights).expanduser(), cfg.arch)
    return model


def build(cfg: ModelConfig, data: Data, seed: int) -> nn.Module:
    """The model with its weights, trained for `cfg.epochs` on the training split."""
    torch.manual_seed(seed)
    model = create(cfg, data.num_classes)
    training.fit(model, data.train, cfg.epochs, cfg.lr, desc=f"train {cfg.arch}")
    return training.recalibrate_batchnorm(model, data.train)


def _factory(spec: str) -> Callable[..., nn.Module]:
    """Import `package.module:factory` (this runs the module's code)."""
    module_name, _, name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise BadInput(f"model.arch: cannot import {module_name!r} for {spec!r} ({e}); is it "
                       "on sys.path / PYTHONPATH?") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise BadInput(f"model.arch: {module_name} has no callable {name!r} (for {spec!r})")
    return factory


def _imagenet_weights(arch: str):
    if family(arch) is None:
        raise BadInput(f"model.weights: imagenet is for torchvision models, not {arch!r}; "
                       "give a checkpoint path instead")
    try:
        return torchvision.models.get_model_weights(arch).DEFAULT
    except (ValueError, AttributeError, KeyError):
        raise BadInput(f"model.weights: torchvision has no pretrained weights for {arch!r}")


def _imagenet_file(arch: str) -> Path:
    """The weights file in the torch hub cache, downloaded there if absent (never hangs)."""
    weights = _imagenet_weights(arch)
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
    if path.is_file():
        return path
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(weights.url, str(path), progress=False)
    except OSError as e:
        raise BadInput(f"model.weights: imagenet weights for {arch} ({weights.name}) are not in "
                       f"the torch hub cache and could not be downloaded ({e}); put {weights.url} "
                       f"at {path}") from None
    finally:
        socket.setdefaulttimeout(previous)
    return path


def _replace_head(model: nn.Module, num_classes: int) -> None:
    """A fresh final classifier (the last Linear or Conv2d) for another class count."""
    name, old = [(n, m) for n, m in model.named_modules()
                 if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
    out = old.out_features if isinstance(old, nn.Linear) else old.out_channels
    if out == num_classes:
        return
    new = (nn.Linear(old.in_features, num_classes) if isinstance(old, nn.Linear)
           else nn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride))
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, new)


def _read_checkpoint(path: Path) -> dict:
    """The state_dict (or {'state_dict': ...}) saved by torch.save, read with
    `weights_only=True`: tensors and plain containers only, so no pickled code runs."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        # torch's message: boilerplate paragraphs around the reason (e.g. "unsupported GLOBAL
        # posix.system": a pickle that would run code)
        parts = [p.strip() for p in str(e).split("\n\n") if p.strip()] or [type(e).__name__]
        reason = next((p for p in parts if not p.startswith(
            ("Weights only load failed", "Check the documentation"))), parts[0])
        raise BadInput(f"model.weights: {path} is not a loadable checkpoint ({reason}); "
                       "allowed: a state_dict saved with torch.save (tensors only, loaded with "
                       "weights_only=True)") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BadInput(f"model.weights: {path} holds a {type(state).__name__}, not a state_dict")
    return state


def _load_checkpoint(model: nn.Module, path: Path, arch: str) -> None:
    """Load a checkpoint whose names and shapes match the model (else BadInput)."""
    state = _read_checkpoint(path)
    expected = model.state_dict()
    problems = [f"missing {k}" for k in expected if k not in state][:3]
    problems += [f"unexpected {k}" for k in state if k not in expected][:3]
    problems += [f"{k}: {tuple(v.shape)} in the file, {tuple(expected[k].shape)} in the model"
                 for k, v in state.items()
                 if k in expected and getattr(v, "shape", None) != expected[k].shape][:3]
    if problems:
        raise BadInput(f"model.weights: checkpoint {path} does not match {arch} (with this stem "
                       f"and class count): {'; '.join(problems)}")
    model.load_state_dict(state)
