"""Layer 3: channel pruning on the paper's seven models (smaller, still exports and compiles),
fine-tuning that recovers accuracy after pruning, and bad pruning settings."""
import copy

import pytest
import torch

from conftest import compiled_error, write_space
from dlas_search import compression, data, models
from dlas_search.compression import CompressConfig, FinetuneConfig
from dlas_search.errors import BadInput
from dlas_search.space import load_space

# Compiled in TVM too: a residual, a depthwise and a plain network. All seven compile after
# pruning (TVM.md), but the other four take 20-90 s each here, so they are only exported.
COMPILED = ("resnet18", "mobilenet_v2", "vgg16")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The machine is shared: two threads per process can be much slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_digits(image_size: int) -> data.Data:
    return data.load(data.DataConfig(image_size=image_size, val_fraction=0.3, subset_train=256,
                                     subset_val=128), seed=0)


@pytest.fixture(scope="module")
def digits():
    """16x16 for six models; VGG's five max-pools need 32x32 (16x16 would pool to nothing)."""
    return {16: small_digits(16), 32: small_digits(32)}


@pytest.mark.parametrize("arch", models.PAPER_ARCHS)
def test_channel_pruning_shrinks_each_paper_model_and_it_still_compiles(digits, arch):
    dataset = digits[32 if arch == "vgg16" else 16]
    torch.manual_seed(0)
    model = models.create(models.ModelConfig(arch=arch, stem="cifar"), dataset.num_classes)
    result = compression.compress(CompressConfig("channel", ratio=0.5),
                                  FinetuneConfig(epochs=0), model, dataset)
    m = result.metrics
    # half the channels on both sides of a layer leave about a quarter (measured 0.25-0.28)
    assert m["params"] < 0.4 * m["params_before"]
    assert m["macs"] < 0.4 * m["macs_before"]
    assert m["sparsity"] < 1e-3  # channels removed, not zeroed: the weights stay dense
    assert m["size_mb"] == m["size_dense_mb"] < 0.4 * m["params_before"] * 4 / 1e6
    assert 0.0 <= m["accuracy"] <= 1.0

    x = dataset.example()
    with torch.no_grad():
        reference = result.module(x)
    assert reference.shape == (1, 10)  # the classifier kept its outputs
    exported = torch.export.export(result.module, (x,))
    with torch.no_grad():
        assert torch.allclose(exported.module()(x), reference, rtol=1e-4, atol=1e-5)
    if arch in COMPILED:
        assert compiled_error(result.module, x)[1] < 1e-4


def test_before_metrics_are_logged_for_every_method(digits):
    dataset = digits[16]
    for cfg in (CompressConfig("none"), CompressConfig("unstructured", amount=0.5)):
        torch.manual_seed(0)
        model = models.create(models.ModelConfig(arch="resnet18"), 10)
        m = compression.compress(cfg, FinetuneConfig(epochs=0), model, dataset).metrics
        # these methods keep the shapes: same count before and after, and MACs counted dense
        assert m["params_before"] == m["params"] > 1e6
        assert m["macs_before"] == m["macs"] > 1e6


@pytest.fixture(scope="module")
def trained_resnet18():
    """resnet18 trained one epoch on all of digits at 16x16 (about 0.85 top-1)."""
    dataset = data.load(data.DataConfig(image_size=16, val_fraction=0.3), seed=0)
    model = models.build(models.ModelConfig(arch="resnet18", epochs=1), dataset, seed=0)
    return model, dataset


@pytest.mark.parametrize("cfg", [CompressConfig("unstructured", amount=0.9),
                                 CompressConfig("channel", ratio=0.5)],
                         ids=["unstructured 0.9", "channel 0.5"])
def test_fine_tuning_recovers_accuracy_after_heavy_pruning(trained_resnet18, cfg):
    trained, dataset = trained_resnet18
    accuracy = {}
    for epochs in (0, 1):
        torch.manual_seed(0)
        result = compression.compress(cfg, FinetuneConfig(epochs=epochs),
                                      copy.deepcopy(trained), dataset)
        accuracy[epochs] = result.metrics["accuracy"]
        if cfg.method == "unstructured":  # the masks kept the zeros through fine-tuning
            assert result.metrics["sparsity"] == pytest.approx(0.9, abs=0.005)
        else:
            assert result.metrics["params"] < 0.4 * result.metrics["params_before"]
    # measured: unstructured 0.64 -> 0.93, channel 0.39 -> 0.92
    assert accuracy[1] > accuracy[0] + 0.1
    assert accuracy[1] > 0.7


@pytest.mark.parametrize("cfg,words", [
    (CompressConfig("channel", ratio=1.0), ["compress.ratio", "1.0", "0.0 to 0.95"]),
    (CompressConfig("channel", ratio=-0.1), ["compress.ratio", "-0.1", "0.0 to 0.95"]),
    (CompressConfig("channel"), ["compress.ratio", "required", "channel", "0.0 to 0.95"]),
    (CompressConfig("unstructured"), ["compress.amount", "required", "0.0 to 0.99"]),
], ids=["ratio 1", "negative ratio", "no ratio", "no amount"])
def test_bad_pruning_settings_are_named(digits, cfg, words):
    model = models.create(models.ModelConfig(arch="resnet18"), 10)
    with pytest.raises(BadInput) as error:
        compression.compress(cfg, FinetuneConfig(epochs=0), model, digits[16])
    for word in words:
        assert word in str(error.value)


CHANNEL_SPACE = """\
study: channel
space:
  data: {name: digits, image_size: 16}
  compress:
    method: [none, channel]
    ratio: %s
"""


def test_ratio_is_a_space_parameter_only_for_channel_pruning(workdir):
    space = load_space(write_space(workdir, CHANNEL_SPACE % "[0.25, 0.5]", "channel.yaml"))
    assert "ratio: one of 0.25, 0.5 when compress.method in ['channel']" in space.show()
    chosen = {"compress.method": "channel", "compress.ratio": 0.5}
    assert space.configure(chosen).compress.ratio == 0.5
    assert space.configure({**chosen, "compress.method": "none"}).compress.ratio is None
    with pytest.raises(BadInput, match=r"compress\.ratio.*1\.0.*0\.0 to 0\.95"):
        load_space(write_space(workdir, CHANNEL_SPACE % "[0.5, 1.0]", "bad.yaml"))
