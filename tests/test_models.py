"""Layer 2: the paper's seven with both stems, other torchvision names, user factories,
checkpoints and ImageNet weights, and the checks that run before a study.

The TVM compile check covers six of the seven by default (about 2.5 min on 2 cores, most of it
BatchNorm folding); densenet161 alone takes another ~2 min (it passes), so it runs only with
DLAS_SLOW_TESTS=1.
"""
from __future__ import annotations

import os
import textwrap
import time

import pytest
import torch
from torch import nn

from dlas_search import hardware, models, space
from dlas_search.errors import BadInput
from dlas_search.models import ModelConfig

from conftest import compiled_error, randomise_batchnorm

SIZE = 32  # standard VGG and DenseNet need 32x32 (their five halvings reach 1x1)
# the module whose output is the last feature map before global pooling
FEATURES = {"resnet18": "layer4", "resnet50": "layer4", "mobilenet_v2": "features",
            "vgg16": "avgpool", "densenet161": "features", "efficientnet_b0": "features",
            "mnasnet1_0": "layers"}


@pytest.fixture(scope="module")
def make():
    """Seeded models in eval mode, built once per (arch, stem) for the whole file."""
    made: dict[tuple[str, str], nn.Module] = {}

    def get(arch: str, stem: str = "standard") -> nn.Module:
        if (arch, stem) not in made:
            torch.manual_seed(0)
            made[arch, stem] = models.create(ModelConfig(arch=arch, stem=stem), 10).eval()
        return made[arch, stem]
    return get


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


def feature_map(model: nn.Module, arch: str, x: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """The output and the spatial size of the last feature map."""
    seen = []
    hook = model.get_submodule(FEATURES[arch]).register_forward_hook(
        lambda m, i, o: seen.append(o.shape[-2:]))
    with torch.no_grad():
        out = model(x)
    hook.remove()
    return out, tuple(seen[0])


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", [a if a in ("resnet18", "mobilenet_v2") else  # fast: two
                                  pytest.param(a, marks=pytest.mark.slow)
                                  for a in models.PAPER_ARCHS])
def test_both_stems_forward_and_cifar_keeps_resolution(make, x, arch):
    standard, cifar = make(arch, "standard"), make(arch, "cifar")
    out_s, size_s = feature_map(standard, arch, x)
    out_c, size_c = feature_map(cifar, arch, x)
    assert out_s.shape == out_c.shape == (1, 10)
    assert torch.isfinite(out_s).all() and torch.isfinite(out_c).all()
    if arch == "vgg16":  # no stem to change: the 7x7 pool and the 100M-parameter head go
        assert size_s == (7, 7) and size_c == (1, 1)
        assert params(standard) > 100e6 and params(cifar) < 16e6
    else:
        assert size_s == (1, 1) and size_c[0] >= 2 * size_s[0], (size_s, size_c)


@pytest.fixture(scope="module")
def target():
    return hardware.local_target(1)


@pytest.mark.parametrize("arch", [
    pytest.param(a, marks=[pytest.mark.skipif(
        a == "densenet161" and not os.environ.get("DLAS_SLOW_TESTS"),
        reason="~2 min to compile; set DLAS_SLOW_TESTS=1"),
        *([] if a == "resnet18" else [pytest.mark.slow])])  # compiling a whole model
    for a in models.PAPER_ARCHS])
def test_exports_compiles_and_matches_pytorch(make, target, arch):
    """Cifar stem at 16x16 (VGG needs 32x32): torch.export -> TVM -> same outputs."""
    torch.set_num_threads(1)
    model = make(arch, "cifar")
    randomise_batchnorm(model)
    size = SIZE if arch == "vgg16" else 16
    example = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2))
    _, error = compiled_error(model, example)
    assert error < 1e-4


def test_other_torchvision_names(x):
    torch.manual_seed(0)
    shuffle = models.create(ModelConfig(arch="shufflenet_v2_x0_5"), 7).eval()
    resnet34 = models.create(ModelConfig(arch="resnet34", stem="cifar"), 7).eval()
    with torch.no_grad():  # a family adapter covers the family, not only the paper's member
        assert shuffle(x).shape == resnet34(x).shape == (1, 7)
    assert resnet34.conv1.kernel_size == (3, 3) and isinstance(resnet34.maxpool, nn.Identity)
    with pytest.raises(BadInput, match=r"cifar is not available for 'shufflenet_v2_x0_5'"
                                       r".*resnet.*vgg16"):
        models.create(ModelConfig(arch="shufflenet_v2_x0_5", stem="cifar"), 7)


def test_auxiliary_heads_are_left_out_so_training_and_pruning_see_one_output(x):
    """googlenet's aux classifiers ran only in train mode: a tuple the loss could not score, and
    convs channel pruning (traced in eval mode) never saw, so a pruned googlenet broke there."""
    from dlas_search import compression
    torch.manual_seed(0)
    net = models.create(ModelConfig(arch="googlenet"), 7)
    assert net.aux1 is None and net.aux2 is None
    assert isinstance(net.train()(x.repeat(2, 1, 1, 1)), torch.Tensor)  # a batch, train mode
    pruned = compression.ChannelPruning().apply(net, compression.CompressConfig(
        "channel", ratio=0.5), x)
    assert pruned.train()(x.repeat(2, 1, 1, 1)).shape == (2, 7)


def test_user_factory_by_import_path(tmp_path, monkeypatch, x):
    (tmp_path / "dlas_user_nets.py").write_text(textwrap.dedent("""\
        from torch import nn

        def tiny(num_classes):
            return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(4, num_classes))

        def not_a_model(num_classes):
            return "nope"
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = ModelConfig(arch="dlas_user_nets:tiny")
    assert space.check_value("model.arch", cfg.arch) == cfg.arch  # the YAML accepts it
    models.check(cfg)
    with torch.no_grad():
        assert models.create(cfg, 5)(x).shape == (1, 5)
    assert models.describe(cfg)["model.arch_source"] == "user factory dlas_user_nets:tiny"
    for arch, message in [("dlas_user_nets:missing", "no callable 'missing'"),
                          ("dlas_no_such_module:tiny", "cannot import 'dlas_no_such_module'")]:
        with pytest.raises(BadInput, match=message):
            models.check(ModelConfig(arch=arch))
    with pytest.raises(BadInput, match="returned a str"):
        models.create(ModelConfig(arch="dlas_user_nets:not_a_model"), 5)
    with pytest.raises(BadInput, match="cifar is not available"):
        models.check(ModelConfig(arch="dlas_user_nets:tiny", stem="cifar"))


def test_checkpoint_round_trip_and_mismatch(make, tmp_path, x):
    source = make("resnet18", "cifar")
    plain, wrapped = tmp_path / "plain.pt", tmp_path / "wrapped.pth"
    torch.save(source.state_dict(), plain)
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, wrapped)
    with torch.no_grad():
        expected = source(x)
        for path in (plain, wrapped):
            cfg = ModelConfig(arch="resnet18", stem="cifar", weights=str(path))
            assert torch.equal(models.create(cfg, 10).eval()(x), expected)
    tag = models.describe(ModelConfig(arch="resnet18", weights=str(plain)))
    assert tag["model.weights_source"].startswith(f"checkpoint {plain} sha256:")
    assert len(tag["model.weights_source"].rsplit(":", 1)[1]) == 12

    with pytest.raises(BadInput, match=r"plain\.pt does not match mobilenet_v2.*missing"):
        models.create(ModelConfig(arch="mobilenet_v2", weights=str(plain)), 10)
    with pytest.raises(BadInput, match=r"plain\.pt.*conv1\.weight: \(64, 3, 3, 3\) in the file, "
                                       r"\(64, 3, 7, 7\) in the model"):
        models.create(ModelConfig(arch="resnet18", weights=str(plain)), 10)
    with pytest.raises(BadInput, match=r"plain\.pt.*fc\.weight"):
        models.create(ModelConfig(arch="resnet18", stem="cifar", weights=str(plain)), 5)
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(BadInput, match=r"junk\.pt is not a loadable checkpoint"):
        models.create(ModelConfig(arch="resnet18", weights=str(tmp_path / "junk.pt")), 10)


def test_imagenet_weights_from_the_hub_cache(tmp_path, monkeypatch, x):
    """A file at the cache path torchvision uses is loaded; the head is replaced for 10 classes."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torch.hub.get_dir() + "/checkpoints/resnet18-f37072fd.pth"
    os.makedirs(os.path.dirname(weights))
    torch.manual_seed(3)
    imagenet = models.create(ModelConfig(arch="resnet18"), 1000)
    torch.save(imagenet.state_dict(), weights)
    cfg = ModelConfig(arch="resnet18", weights="imagenet")
    model = models.create(cfg, 10)
    assert torch.equal(model.layer4[1].conv2.weight, imagenet.layer4[1].conv2.weight)
    assert model.fc.out_features == 10 and model.fc.in_features == 512
    assert models.describe(cfg) == {"model.arch_source": "torchvision",
                                    "model.weights_source": "torchvision IMAGENET1K_V1"}
    kept = models.create(ModelConfig(arch="resnet18", stem="cifar", weights="imagenet"), 1000)
    assert torch.equal(kept.fc.weight, imagenet.fc.weight)  # same class count: head kept


@pytest.mark.reliability("ImageNet weights with an empty cache and no internet",
                         "BadInput within seconds: where to put the weights file",
                         kept="nothing written")
def test_imagenet_weights_offline_fail_fast_and_say_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache
    cfg = ModelConfig(arch="resnet18", weights="imagenet")
    start = time.perf_counter()
    try:
        models.check(cfg)
    except BadInput as e:
        assert str(tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in str(e)
        assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in str(e)
    else:  # this machine is online: the download worked
        assert (tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth").is_file()
    assert time.perf_counter() - start < 60


def test_check_rejects_bad_configurations(tmp_path):
    with pytest.raises(BadInput) as bad:
        models.check(ModelConfig(arch="resnet19"))
    for word in ("model.arch", "resnet19", *models.PAPER_ARCHS, "torchvision",
                 "package.module:factory"):
        assert word in str(bad.value)
    with pytest.raises(BadInput, match=r"checkpoint file '.*nowhere\.pt' not found"):
        models.check(ModelConfig(weights=str(tmp_path / "nowhere.pt")))
    with pytest.raises(BadInput, match="model.weights: 'imagenett' is not allowed"):
        models.check(ModelConfig(weights="imagenett"))
    with pytest.raises(BadInput, match="imagenet is for torchvision models"):
        models.check(ModelConfig(arch="a.b:c", weights="imagenet"))
    for arch in ("resnet34", "vit_b_16", "pkg.sub:make"):
        assert space.check_value("model.arch", arch) == arch
    with pytest.raises(BadInput, match="resnet19.*resnet18, resnet50"):
        space.check_value("model.arch", "resnet19")
    assert space.check_value("model.weights", "ckpt/model.pt") == "ckpt/model.pt"
    assert models.check(ModelConfig()) is None
    assert models.describe(ModelConfig()) == {"model.arch_source": "torchvision",
                                              "model.weights_source": "random init"}
