"""Layer 3: every technique on the paper's seven models (smaller or lower precision, still
exports and compiles with the arithmetic asked for), int8 and fp16 accuracy in TVM against
PyTorch, fine-tuning and distillation, sizes, and bad settings."""
import contextlib
import copy

import pytest
import torch

from conftest import compiled_error, slow_except, write_space
from dlas_search import compiler, compression, data, hardware, models
from dlas_search.compression import CompressConfig, FinetuneConfig
from dlas_search.errors import BadInput
from dlas_search.space import load_space

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


# Every paper model under every technique. Each case compresses an untrained model (fine-tuning
# 0 epochs: what is checked here is the shape of the result, not its accuracy), exports it and
# compiles it for the local CPU, checking which arithmetic the compiled convs and matmuls use.
TECHNIQUES = {
    "unstructured": CompressConfig("unstructured", amount=0.7),
    "channel": CompressConfig("channel", ratio=0.5),
    "int8": CompressConfig("int8", calibration_images=64),
    "fp16": CompressConfig("fp16"),
}
# inputs x weights -> accumulator of every compiled conv and matmul kernel
ARITHMETIC = {"fp32": "float32xfloat32->float32", "fp16": "float16xfloat16->float32",
              "int8": "uint8xint8->int32"}


@pytest.mark.parametrize("technique", slow_except(TECHNIQUES, "unstructured", "channel"))
@pytest.mark.parametrize("arch", slow_except(models.PAPER_ARCHS, "resnet18"))  # compiles
def test_each_technique_on_each_paper_model(digits, arch, technique):
    dataset = digits[32 if arch == "vgg16" else 16]
    torch.manual_seed(0)
    model = models.create(models.ModelConfig(arch=arch, stem="cifar"), dataset.num_classes)
    fp32_mb = 4 * sum(t.numel() for t in model.state_dict().values()
                      if t.is_floating_point()) / 1e6
    result = compression.compress(TECHNIQUES[technique], FinetuneConfig(epochs=0), model,
                                  dataset)
    m = result.metrics
    assert 0.0 <= m["accuracy"] <= 1.0
    if technique == "unstructured":
        assert m["sparsity"] == pytest.approx(0.7, abs=0.005)
        assert m["params"] == m["params_before"]  # same shapes, zeros inside
        assert m["size_mb"] < 0.7 * m["size_dense_mb"]  # CSR at 70% zeros: about 0.6
    elif technique == "channel":
        # half the channels on both sides of a layer leave about a quarter (measured 0.25-0.28)
        assert m["params"] < 0.4 * m["params_before"]
        assert m["macs"] < 0.4 * m["macs_before"]
        assert m["sparsity"] < 1e-3  # channels removed, not zeroed: the weights stay dense
        assert m["size_mb"] == m["size_dense_mb"] < 0.4 * fp32_mb
    elif technique == "int8":
        assert m["size_mb"] < 0.3 * fp32_mb  # one byte a weight, plus scales and fp32 biases
        graph = str(result.module.for_export().graph)
        assert graph.count("quantize_per_tensor") > 0 and "dequantize_per_channel" in graph
    else:
        assert all(p.dtype == torch.float16 for p in result.module.parameters())
        assert m["size_mb"] == pytest.approx(fp32_mb / 2, rel=1e-6)
    assert result.precision == {"int8": "int8", "fp16": "fp16"}.get(technique, "fp32")

    x = dataset.example()
    with torch.no_grad():
        reference = result.module(x)
    assert reference.shape == (1, 10) and reference.dtype == torch.float32
    torch.export.export(compiler.exportable(result.module), (x,))
    built, error = compiled_error(result.module, x, precision=result.precision)
    expected = ARITHMETIC[result.precision]
    assert built.arithmetic["conv2d"] == {expected}
    assert built.arithmetic["matmul"] == {expected}
    if result.precision == "fp32":
        assert error < 1e-4
    else:  # untrained logits nearly tie, so only a sanity bound here (accuracy: see below)
        assert error < 1.0


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
                                 pytest.param(CompressConfig("channel", ratio=0.5),
                                              marks=pytest.mark.slow)],
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


def compiled_accuracy(built, loader, images: int) -> tuple[float, torch.Tensor]:
    """Top-1 accuracy of a compiled module over the first `images` validation images (batch 1),
    and its predictions."""
    predictions, labels = [], []
    for batch, targets in loader:
        for x, y in zip(batch, targets):
            predictions.append(int(hardware.run_tvm(built.executable, x[None]).argmax()))
            labels.append(int(y))
            if len(labels) == images:
                predictions = torch.tensor(predictions)
                return float((predictions == torch.tensor(labels)).float().mean()), predictions
    raise AssertionError("not enough validation images")


@pytest.mark.parametrize("method", slow_except(["int8", "fp16", "channel+int8"], "int8"))
def test_quantised_model_in_tvm_keeps_pytorchs_accuracy(trained_resnet18, method):
    """The compiled int8/fp16 module computes in int8/fp16 and classifies like PyTorch's
    quantised (half) model: same accuracy within a point, the same top-1 almost everywhere."""
    trained, dataset = trained_resnet18
    torch.manual_seed(0)
    cfg = CompressConfig(method, ratio=0.5 if "channel" in method else None)
    result = compression.compress(cfg, FinetuneConfig(epochs=1 if "channel" in method else 0),
                                  copy.deepcopy(trained), dataset)
    built, _ = compiled_error(result.module, dataset.example(), precision=result.precision)
    assert built.arithmetic["conv2d"] == {ARITHMETIC[result.precision]}
    images = 200
    tvm_accuracy, tvm_top1 = compiled_accuracy(built, dataset.val, images)
    with torch.no_grad():
        val = torch.cat([x for x, _ in dataset.val])[:images]
        torch_top1 = result.module(val).argmax(1)
        torch_accuracy = float((torch_top1 == torch.cat([y for _, y in dataset.val])[:images])
                               .float().mean())
    assert abs(tvm_accuracy - torch_accuracy) <= 0.01
    assert (tvm_top1 == torch_top1).float().mean() >= 0.98
    assert torch_accuracy > 0.7  # quantisation kept a working classifier


def test_int8_skips_torchaos_qat_step_and_gets_the_same_model(monkeypatch):
    """A BatchNorm before a conv (DenseNet's layers) stays in the graph after prepare_pt2e, so
    convert_pt2e runs its quantisation-aware-training folding, which can match nothing after
    post-training preparation. Skipping it leaves the same graph, weights and outputs."""
    from torchao.quantization.pt2e import quantize_pt2e
    from dlas_search.compression import quantisation

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(  # pre-activation block, then conv+BatchNorm
            torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10)).eval()

    def int8():  # the calibration batches follow the data's seeded generator: load afresh
        dataset = small_digits(16)
        return compression.compress(CompressConfig("int8", calibration_images=32),
                                    FinetuneConfig(epochs=0), model(), dataset), dataset

    skipped, dataset = int8()
    batchnorms = []
    original = quantize_pt2e._fold_conv_bn_qat

    def counted(graph):
        batchnorms.append(sum("batch_norm" in str(n.target) for n in graph.graph.nodes))
        return original(graph)
    monkeypatch.setattr(quantize_pt2e, "_fold_conv_bn_qat", counted)
    monkeypatch.setattr(quantisation, "_without_qat_batchnorm_folding", contextlib.nullcontext)
    folded, _ = int8()
    assert batchnorms and batchnorms[0] >= 1  # the step ran, with a BatchNorm to look at
    a, b = skipped.module.program, folded.module.program
    assert a.graph_module.code == b.graph_module.code
    assert a.state_dict.keys() == b.state_dict.keys()
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    images = next(iter(dataset.val))[0]
    with torch.no_grad():
        assert torch.equal(skipped.module(images), folded.module(images))


def test_deployed_size_counts_bytes_per_precision_and_csr():
    layer = torch.nn.Linear(10, 10)  # 100 weights, 10 biases
    with torch.no_grad():
        layer.weight.copy_(torch.arange(1.0, 101.0).reshape(10, 10))
    assert compression.deployed_bytes(layer, "fp32") == (440, 440)
    assert compression.deployed_bytes(layer, "fp16") == (220, 220)
    assert compression.deployed_bytes(layer, "int8") == (180, 180)  # + 10 fp32 scales
    with torch.no_grad():
        layer.weight[:, 1:] = 0  # 90% zeros: CSR = 10 values + 10 int32 columns + 11 pointers
    assert compression.deployed_bytes(layer, "fp32") == (10 * 8 + 44 + 40, 440)
    assert compression.deployed_bytes(layer, "int8") == (10 * 5 + 44 + 40 + 40, 180)


def test_distillation_pulls_the_pruned_model_towards_the_uncompressed_one(trained_resnet18):
    trained, dataset = trained_resnet18
    with torch.no_grad():
        val = torch.cat([x for x, _ in dataset.val])
        teacher = torch.log_softmax(trained.eval()(val) / 4, dim=1)
    divergence = {}
    for distill in (False, True):
        torch.manual_seed(0)
        result = compression.compress(CompressConfig("channel", ratio=0.5),
                                      FinetuneConfig(epochs=1, distill=distill),
                                      copy.deepcopy(trained), dataset)
        with torch.no_grad():
            student = torch.log_softmax(result.module(val) / 4, dim=1)
        divergence[distill] = float(torch.nn.functional.kl_div(
            student, teacher, log_target=True, reduction="batchmean"))
    assert divergence[True] < 0.8 * divergence[False]


def test_finetune_batch_size_sets_the_loader():
    dataset = small_digits(16)
    assert dataset.train_loader(None) is dataset.train
    loader = dataset.train_loader(32)
    assert loader.batch_size == 32 and len(loader) == 8  # 256 images
    first = next(iter(dataset.train_loader(32)))[1]
    assert torch.equal(first, next(iter(dataset.train_loader(32)))[1])  # seeded shuffle


def test_unknown_method_lists_the_combinations(digits):
    model = models.create(models.ModelConfig(arch="resnet18"), 10)
    with pytest.raises(BadInput, match=r"compress\.method.*'int4'.*channel\+int8"):
        compression.compress(CompressConfig("int4"), FinetuneConfig(epochs=0), model, digits[16])


def test_a_technique_that_cannot_follow_the_model_says_which_and_why():
    """torch-pruning cannot follow ShuffleNet's channel shuffle (it divided by zero inside its
    dependency graph): the trial's error names the layer, the technique and why."""
    dataset = small_digits(16)
    model = models.create(models.ModelConfig(arch="shufflenet_v2_x0_5"), dataset.num_classes)
    with pytest.raises(compression.NotApplicable) as caught:
        compression.compress(CompressConfig("channel", ratio=0.5), FinetuneConfig(epochs=0),
                             model, dataset)
    text = str(caught.value)
    assert text.startswith("compression: channel cannot compress this model: ")
    assert "channel shuffle" in text and "torch-pruning" in text and "unstructured" in text
    caught.value.model = "shufflenet_v2_x0_5"  # what stages.py adds
    assert "cannot compress shufflenet_v2_x0_5:" in str(caught.value)


def test_channel_pruning_refuses_attention_before_tracing(monkeypatch):
    """swin_t's attention reshapes made torch-pruning's graph grow past 14 GB: refused before
    the library is reached, naming the attention layers."""
    import torch_pruning as tp

    def reached(*args, **kwargs):
        raise AssertionError("torch-pruning was reached")
    monkeypatch.setattr(tp.pruner, "MagnitudePruner", reached)
    model = models.create(models.ModelConfig(arch="swin_t"), 10)
    with pytest.raises(compression.NotApplicable, match=r"channel cannot compress this model: "
                       r"its attention layers \(ShiftedWindowAttention\) split channels"):
        compression.ChannelPruning().apply(model, CompressConfig("channel", ratio=0.5), None)


def test_a_precision_the_model_cannot_compute_in_is_refused_naming_where():
    """swin_v2_t in fp16 computes NaN (its cosine attention): the trial fails naming the
    technique and the first module whose output is not finite, instead of logging NaNs."""
    dataset = small_digits(16)
    torch.manual_seed(0)
    model = models.create(models.ModelConfig(arch="swin_v2_t"), dataset.num_classes)
    with pytest.raises(compression.NotApplicable, match=r"fp16 cannot compress this model: "
                       r"its converted model computes NaN or inf .* first in "
                       r"model\.features\.\S+ \(ShiftedWindowAttentionV2\)"):
        compression.compress(CompressConfig("fp16"), FinetuneConfig(epochs=0), model, dataset)


def test_a_library_failure_inside_a_technique_is_named(monkeypatch):
    """An exception from inside a library that no rule knows still names the technique, the
    step and the library, not a bare traceback."""
    import torch_pruning as tp

    def broken(*args, **kwargs):
        raise IndexError("index 384 is out of bounds for dimension 0 with size 384")
    monkeypatch.setattr(tp.pruner, "MagnitudePruner", broken)
    dataset = small_digits(16)
    model = models.create(models.ModelConfig(arch="resnet18"), dataset.num_classes)
    with pytest.raises(compression.NotApplicable, match=r"channel cannot compress this model: "
                       r"compressing failed inside .* with IndexError: index 384"):
        compression.compress(CompressConfig("channel", ratio=0.5), FinetuneConfig(epochs=0),
                             model, dataset)
