"""Layer 4's conv primitives against PyTorch: single convs over a grid of shapes and dtypes,
whole models, and which convs fall back to `direct` and why."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tvm
from tvm import relax

from torch.nn.utils import prune

from dlas_search import algorithms, compiler, compression, hardware, lowering, models, registry
from dlas_search.algorithms import AlgoConfig, CannotExpress, Plan, plan, schedules, sparse
from dlas_search.errors import BadInput
from dlas_search.space import LAYERS, TrialConfig, infeasible

from conftest import compiled_error, randomise_batchnorm, slow_except

NAMES = ["direct", "direct_nhwc", "im2col_gemm", "im2col_gemm_nhwc", "spatial_pack", "winograd",
         "winograd_nhwc"]
# The PrimFunc each primitive's conv kernel is named after.
KERNEL = {"direct": "conv2d", "direct_nhwc": "conv2d", "im2col_gemm": "conv2d_im2col_gemm",
          "im2col_gemm_nhwc": "conv2d_im2col_gemm_nhwc",
          "spatial_pack": "conv2d_nchwc", "winograd": "conv2d_winograd",
          "winograd_nhwc": "conv2d_winograd_nhwc"}
# Weight transforms, computed at compile time: none may be left as a kernel in the module.
WEIGHT_KERNELS = ("weight_matrix", "pack_weight", "winograd_weight_transform", "weight_hwio")


@pytest.fixture(scope="module")
def target():
    return hardware.local_target(1)


@dataclass(frozen=True)
class Case:
    data: tuple[int, int, int, int]  # NCHW
    out_channels: int
    kernel: int
    stride: int = 1
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right
    dilation: int = 1
    groups: int = 1
    winograd_refuses: str | None = None  # the reason winograd falls back, if it does


CASES = {
    "1x1": Case((1, 8, 6, 6), 16, 1, winograd_refuses="kernel 1x1"),
    "3x3 batch 2 non-square (F2x2)": Case((2, 8, 9, 7), 8, 3, padding=(1, 1, 1, 1)),
    "3x3 odd channels partial tiles (F4x4)": Case((1, 5, 12, 12), 7, 3),
    "3x3 16->32 (F4x4)": Case((1, 16, 12, 12), 32, 3, padding=(1, 1, 1, 1)),
    "3x3 asymmetric padding": Case((1, 4, 8, 8), 6, 3, padding=(1, 0, 0, 1)),
    "3x3 stride 2": Case((1, 6, 9, 9), 8, 3, 2, (1, 1, 1, 1), winograd_refuses="stride 2x2"),
    "3x3 stride 2 16 channels": Case((1, 16, 9, 9), 8, 3, 2, (1, 1, 1, 1),
                                     winograd_refuses="stride 2x2"),
    "5x5": Case((1, 3, 10, 10), 4, 5, padding=(2, 2, 2, 2), winograd_refuses="kernel 5x5"),
    "7x7 stride 2 odd": Case((1, 3, 15, 15), 5, 7, 2, (3, 3, 3, 3),
                             winograd_refuses="kernel 7x7"),
    "groups 2": Case((1, 4, 8, 8), 6, 3, padding=(1, 1, 1, 1), groups=2,
                     winograd_refuses="groups"),
    "depthwise": Case((1, 6, 8, 8), 6, 3, padding=(1, 1, 1, 1), groups=6,
                      winograd_refuses="depthwise"),
    "depthwise stride 2 batch 2": Case((2, 7, 9, 9), 7, 3, 2, (1, 1, 1, 1), groups=7,
                                       winograd_refuses="stride 2x2"),
    "dilation 2": Case((1, 4, 10, 10), 4, 3, padding=(2, 2, 2, 2), dilation=2,
                       winograd_refuses="dilation 2x2"),
}


def conv_module(case: Case, weight: np.ndarray, dtype="float32", out_dtype=None,
                weight_as_input=False) -> tvm.IRModule:
    """main(x) = conv2d(x, weight) with the weight a constant (as after import) or an input."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(case.data, dtype))
    w = relax.Var("w", relax.TensorType(weight.shape, str(weight.dtype)))
    with bb.function("main", [x, w] if weight_as_input else [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(
                x, w if weight_as_input else relax.const(weight), strides=case.stride,
                padding=case.padding, dilation=case.dilation, groups=case.groups,
                out_dtype=out_dtype))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def lower(conv_plan: Plan, mod: tvm.IRModule) -> tvm.IRModule:
    """What the compiler does with a plan."""
    mod = conv_plan.rewrite(mod)
    return relax.transform.LegalizeOps(customize_legalize_map=conv_plan.legalize_map())(mod)


def run(mod: tvm.IRModule, target, *inputs: np.ndarray) -> np.ndarray:
    vm = relax.VirtualMachine(tvm.compile(mod, target), tvm.cpu())
    return vm["main"](*(tvm.runtime.tensor(a) for a in inputs)).numpy()


def reference(case: Case, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """PyTorch's conv in float64 (exact for the integer and fp16 inputs used here)."""
    top, left, bottom, right = case.padding
    padded = F.pad(torch.from_numpy(x.astype("float64")), (left, right, top, bottom))
    return F.conv2d(padded, torch.from_numpy(w.astype("float64")), stride=case.stride,
                    dilation=case.dilation, groups=case.groups).numpy()


def random_case(case: Case, seed=0):
    rng = np.random.default_rng(seed)
    n, c, _, _ = case.data
    x = rng.standard_normal(case.data).astype("float32")
    w = rng.standard_normal((case.out_channels, c // case.groups, case.kernel, case.kernel))
    return x, w.astype("float32")


def relative_error(ours, ref) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def kernel_names(mod: tvm.IRModule) -> set[str]:
    return {gv.name_hint for gv, f in mod.functions.items() if not isinstance(f, relax.Function)}


def expected_lowering(name: str, case: Case) -> tuple[str, dict]:
    """(what lowers the conv, fallbacks counted) for primitive `name` on `case`."""
    if name in ("winograd", "winograd_nhwc") and case.winograd_refuses:
        # winograd_nhwc hands strided convs of 16+ channels to im2col_gemm_nhwc
        wide_strided = case.stride > 1 and case.kernel > 1 and case.data[1] >= 16
        used = "im2col_gemm_nhwc" if name == "winograd_nhwc" and wide_strided else "direct"
        return used, {f"{name}: {case.winograd_refuses}": 1}
    if name == "im2col_gemm_nhwc" and case.groups > 1:
        in_per_group = case.data[1] // case.groups
        return "direct", {f"{name}: {'depthwise' if in_per_group == 1 else 'groups'}": 1}
    return name, {}


# fast: every primitive on a Winograd case, a strided 16-channel one and a depthwise one
@pytest.mark.parametrize("case_id", slow_except(CASES, "3x3 batch 2 non-square (F2x2)",
                                                "3x3 stride 2 16 channels", "depthwise"))
@pytest.mark.parametrize("name", NAMES)
def test_primitive_matches_pytorch_on_single_conv(name, case_id, target):
    case = CASES[case_id]
    x, w = random_case(case)
    conv_plan = plan(AlgoConfig(conv=name))
    mod = lower(conv_plan, conv_module(case, w))
    assert relative_error(run(mod, target, x), reference(case, x, w)) <= 1e-4
    used, fallbacks = expected_lowering(name, case)
    assert conv_plan.lowered == {used: 1}
    assert conv_plan.fallbacks == fallbacks
    assert KERNEL[used] in kernel_names(mod)
    assert not kernel_names(mod) & set(WEIGHT_KERNELS)  # weight transforms were folded


@pytest.mark.parametrize("name,reads_data", [("direct_nhwc", "conv2d"),
                                             ("im2col_gemm_nhwc", "im2col"),
                                             ("winograd_nhwc", "conv2d_winograd_nhwc")])
def test_nhwc_primitives_really_compute_in_nhwc(name, reads_data, target):
    case = CASES["3x3 batch 2 non-square (F2x2)"]
    x, w = random_case(case)
    mod = lower(plan(AlgoConfig(conv=name)), conv_module(case, w))
    script = mod[reads_data].script()
    signature = re.sub(r"T\.int64\((\d+)\)", r"\1", script.split("):\n", 1)[0])
    n, c, h, wd = case.data
    assert f'T.Buffer(({n}, {h}, {wd}, {c}), "float32")' in signature  # the data, NHWC


@pytest.mark.parametrize("case_id", ["3x3 batch 2 non-square (F2x2)", "depthwise"])
@pytest.mark.parametrize("budget, layout", [(20.0, "HWIO"), (0.0, "OHWI"), (2.0, "OHWI")])
def test_direct_nhwc_weights_follow_the_tuning_budget(case_id, budget, layout, target):
    """Well tuned (trials per conv): output channels innermost in the weights as in the output
    (HWIO, transposed at compile time from ConvertLayout's OHWI), so the vectorised loop over
    them loads contiguously. Untuned or barely tuned: OHWI as they come, input channels
    innermost, as TVM's default loops reduce over them (HWIO slowed such builds 1.6-8x)."""
    case = CASES[case_id]
    x, w = random_case(case)
    with schedules(budget):
        mod = lower(plan(AlgoConfig(conv="direct_nhwc")), conv_module(case, w))
    signature = re.sub(r"T\.int64\((\d+)\)", r"\1", mod["conv2d"].script().split("):\n", 1)[0])
    o, i, kh, kw = w.shape
    shape = {"HWIO": (kh, kw, i, o), "OHWI": (o, kh, kw, i)}[layout]
    assert f'T.Buffer(({", ".join(map(str, shape))}), "float32")' in signature
    assert relative_error(run(mod, target, x), reference(case, x, w)) <= 1e-4


def test_hwio_only_for_well_tuned_fp32():
    from dlas_search.algorithms.direct import HWIO_MIN_TRIALS_PER_CONV, hwio_weights
    assert hwio_weights("float32", HWIO_MIN_TRIALS_PER_CONV)
    assert not hwio_weights("float32", HWIO_MIN_TRIALS_PER_CONV - 1)
    assert not hwio_weights("float32", 0)
    for dtype in ("int8", "float16"):  # measured slower (int8) or never measured (fp16)
        assert not hwio_weights(dtype, 1000)


def test_a_changed_primitive_changes_the_compile_key_of_its_builds_only():
    assert plan(AlgoConfig(conv="direct_nhwc")).revisions() == {"direct_nhwc": 2}
    assert plan(AlgoConfig(conv="direct")).revisions() == {}  # unchanged: keys as before


def test_direct_nhwc_keeps_relu6_in_nhwc():
    """ReLU6 (R.clip) has no layout rule in ConvertLayout: left alone, every one would run in
    NCHW between two transposes. As min/max it follows the convs' layout: only the model's
    input and output are transposed, and the result is unchanged."""
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU6(),
        torch.nn.Conv2d(8, 8, 3, padding=1, groups=8), torch.nn.ReLU6(),
        torch.nn.Conv2d(8, 4, 1), torch.nn.Hardtanh(-1.0, 2.0)).eval()
    example = torch.randn(1, 3, 12, 12)
    mod = compiler.fold_batchnorm(compiler.import_module(model, example))
    assert str(mod).count("R.clip") == 3
    text = str(plan(AlgoConfig(conv="direct_nhwc")).rewrite(mod))
    assert text.count("R.permute_dims") == 2 and "R.clip" not in text
    built, error = compiled_error(model, example, "direct_nhwc")
    assert error <= 1e-5


@pytest.mark.parametrize("name", ["im2col_gemm", "im2col_gemm_nhwc", "spatial_pack", "winograd",
                                  "winograd_nhwc"])
def test_weight_transform_runs_as_a_kernel_when_the_weight_is_an_input(name, target):
    case = CASES["3x3 odd channels partial tiles (F4x4)"]
    x, w = random_case(case)
    mod = lower(plan(AlgoConfig(conv=name)), conv_module(case, w, weight_as_input=True))
    assert kernel_names(mod) & set(WEIGHT_KERNELS)
    assert relative_error(run(mod, target, x, w), reference(case, x, w)) <= 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_int8_conv_is_exact_in_integer_arithmetic(name, target):
    """uint8 x int8 -> int32 as the int8 importer emits it (padding done before the conv)."""
    case = Case((1, 8, 8, 8), 8, 3)
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, case.data).astype("uint8")
    w = rng.integers(-128, 128, (8, 8, 3, 3)).astype("int8")
    conv_plan = plan(AlgoConfig(conv=name))
    mod = lower(conv_plan, conv_module(case, w, "uint8", "int32"))
    out = run(mod, target, x)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, reference(case, x, w).astype("int64"))
    used, reason = (("direct", {f"{name}: dtype uint8": 1}) if "winograd" in name
                    else (name, {}))
    assert conv_plan.lowered == {used: 1} and conv_plan.fallbacks == reason
    assert lowering.arithmetic_dtypes(mod)["conv2d"] == {"uint8xint8->int32"}


@pytest.mark.parametrize("name", NAMES)
def test_fp16_conv_multiplies_in_fp16_and_accumulates_in_fp32(name, target):
    """fp16 x fp16 -> fp32 as ToMixedPrecision emits it."""
    case = CASES["3x3 batch 2 non-square (F2x2)"]
    x, w = (a.astype("float16") for a in random_case(case))
    conv_plan = plan(AlgoConfig(conv=name))
    mod = lower(conv_plan, conv_module(case, w, "float16", "float32"))
    out = run(mod, target, x)
    assert out.dtype == np.float32
    assert relative_error(out, reference(case, x, w)) <= 1e-4
    used, reason = (("direct", {f"{name}: dtype float16": 1}) if "winograd" in name
                    else (name, {}))
    assert conv_plan.lowered == {used: 1} and conv_plan.fallbacks == reason
    assert lowering.arithmetic_dtypes(mod)["conv2d"] == {"float16xfloat16->float32"}


class RefuseAll(algorithms.Primitive):
    """Stands for a sparse lowering that declines a dense weight."""
    name = "sparse"

    def lower(self, bb, conv):
        raise CannotExpress("dense weight")


def test_plan_tries_its_lowerings_in_order_then_falls_back_to_direct():
    case = CASES["1x1"]
    _, w = random_case(case)
    first = Plan(RefuseAll(), algorithms.PRIMITIVES["winograd"])
    lower(first, conv_module(case, w))
    assert first.lowered == {"direct": 1}
    assert first.fallbacks == {"sparse: dense weight": 1, "winograd: kernel 1x1": 1}
    second = Plan(RefuseAll(), algorithms.PRIMITIVES["spatial_pack"])
    lower(second, conv_module(case, w))
    assert second.lowered == {"spatial_pack": 1} and second.fallbacks == {"sparse: dense weight": 1}


class RefuseInstead(algorithms.Primitive):
    """Refuses every conv and names the primitives to try next for it."""
    name = "picky"

    def __init__(self, *instead):
        self.instead = instead

    def lower(self, bb, conv):
        raise CannotExpress("never", self.instead)


def test_a_refusal_can_name_what_to_try_next_before_the_rest_of_the_chain():
    case = CASES["1x1"]
    _, w = random_case(case)
    handed = Plan(RefuseInstead(algorithms.PRIMITIVES["spatial_pack"]),
                  algorithms.PRIMITIVES["im2col_gemm"])
    lower(handed, conv_module(case, w))
    assert handed.lowered == {"spatial_pack": 1} and handed.fallbacks == {"picky: never": 1}
    # a named primitive that refuses too: the plan goes on with the rest of its chain
    refused_again = Plan(RefuseInstead(RefuseAll()), algorithms.PRIMITIVES["im2col_gemm"])
    lower(refused_again, conv_module(case, w))
    assert refused_again.lowered == {"im2col_gemm": 1}
    assert refused_again.fallbacks == {"picky: never": 1, "sparse: dense weight": 1}


def test_unknown_primitive_is_bad_input_listing_the_names():
    with pytest.raises(BadInput) as error:
        plan(AlgoConfig(conv="fft"))
    for word in ["algo.conv", "'fft'", *NAMES]:
        assert word in str(error.value)
    assert isinstance(error.value, ValueError)


def test_every_primitive_is_tested():
    assert sorted(algorithms.PRIMITIVES) == sorted(NAMES)
    assert set(AlgoConfig.__dataclass_fields__["conv"].metadata["choices"]) == set(NAMES)


# --- whole models ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_models():
    torch.manual_seed(0)
    return {arch: randomise_batchnorm(models.create(models.ModelConfig(arch=arch), 10)).eval()
            for arch in ("resnet18", "mobilenet_v2")}


# resnet18 has 20 convs: 13 are 3x3 stride 1; the stem (7x7), three 3x3 stride-2 convs and
# three 1x1 downsamples are not Winograd's. mobilenet_v2 has 52 (17 depthwise).
MODEL_CASES = {
    ("resnet18", "direct"): ({"direct": 20}, {}),
    ("resnet18", "direct_nhwc"): ({"direct_nhwc": 20}, {}),
    ("resnet18", "im2col_gemm"): ({"im2col_gemm": 20}, {}),
    ("resnet18", "im2col_gemm_nhwc"): ({"im2col_gemm_nhwc": 20}, {}),
    ("resnet18", "spatial_pack"): ({"spatial_pack": 20}, {}),
    ("resnet18", "winograd"): ({"winograd": 13, "direct": 7},
                               {"winograd: kernel 7x7": 1, "winograd: stride 2x2": 3,
                                "winograd: kernel 1x1": 3}),
    ("resnet18", "winograd_nhwc"): ({"winograd_nhwc": 13, "im2col_gemm_nhwc": 3, "direct": 4},
                                    {"winograd_nhwc: kernel 7x7": 1,
                                     "winograd_nhwc: stride 2x2": 3,
                                     "winograd_nhwc: kernel 1x1": 3}),
    ("mobilenet_v2", "im2col_gemm"): ({"im2col_gemm": 52}, {}),
    ("mobilenet_v2", "spatial_pack"): ({"spatial_pack": 52}, {}),
    ("mobilenet_v2", "im2col_gemm_nhwc"): ({"im2col_gemm_nhwc": 35, "direct": 17},
                                           {"im2col_gemm_nhwc: depthwise": 17}),
}


@pytest.mark.parametrize("arch,name", slow_except(MODEL_CASES, ("resnet18", "winograd")))
def test_primitive_matches_pytorch_on_a_model(arch, name, small_models, target):
    model, example = small_models[arch], torch.randn(1, 3, 32, 32)
    conv_plan = plan(AlgoConfig(conv=name))
    built = compiler.compile(model, example, conv_plan, compiler.CompilerConfig(), target)
    with torch.no_grad():
        ref = model(example).numpy()
    assert compiler.max_relative_error(hardware.run_tvm(built.executable, example), ref) <= 1e-4
    assert (conv_plan.lowered, conv_plan.fallbacks) == MODEL_CASES[arch, name]


def first_buffer_shape(func) -> list[int]:
    """The shape of a PrimFunc's first parameter (its data input), from its signature."""
    signature = re.sub(r"T\.int64\((\d+)\)", r"\1", func.script().split("):\n", 1)[0])
    return [int(d) for d in re.search(r"T\.Buffer\(\(([\d, ]+)\)", signature)[1].split(",")]


def test_winograd_nhwc_runs_its_fallbacks_in_nhwc(small_models):
    """resnet18 under winograd_nhwc: the layout changes once on the way in and once before the
    classifier, so the seven convs Winograd cannot take run in NHWC, not between transposes:
    the three 3x3 stride-2 convs as im2col + GEMM, the stem and the 1x1 downsamples direct."""
    model, example = small_models["resnet18"], torch.randn(1, 3, 32, 32)
    mod = compiler.fold_batchnorm(compiler.import_module(model, example))
    conv_plan = plan(AlgoConfig(conv="winograd_nhwc"))
    rewritten = conv_plan.rewrite(mod)
    assert str(rewritten).count("R.permute_dims") == 2
    lowered = relax.transform.LegalizeOps(customize_legalize_map=conv_plan.legalize_map())(
        rewritten)
    assert conv_plan.lowered == {"winograd_nhwc": 13, "im2col_gemm_nhwc": 3, "direct": 4}
    inputs = [first_buffer_shape(func) for gv, func in lowered.functions.items()
              if re.fullmatch(r"(conv2d|im2col)\d*", gv.name_hint)]  # direct convs, gathers
    assert len(inputs) == 7 and all(shape[3] in (3, 64, 128, 256) and shape[1] == shape[2]
                                    for shape in inputs)  # NHWC: channels last


@pytest.mark.parametrize("name", slow_except(NAMES, "direct", "winograd"))
def test_a_bare_primitive_still_plugs_into_the_compiler(name):
    """conftest.compiled_error passes PRIMITIVES[name] itself, not a plan."""
    torch.manual_seed(0)
    model = randomise_batchnorm(torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 4, 1)))
    _, error = compiled_error(model, torch.randn(1, 3, 10, 10), conv=name)
    assert error <= 1e-4


# --- sparse format -----------------------------------------------------------------------------

def sparse_plan(conv="direct", block="1x1", threshold=None) -> Plan:
    return plan(AlgoConfig(conv=conv, format="sparse", block=block, threshold=threshold))


def pruned_cnn() -> torch.nn.Module:
    """Three convs and a linear layer, magnitude-pruned: the 3x3 stem 70% (BatchNorm folded into
    it keeps its zeros), a 3x3 stride-2 conv only 20% (below the 0.5 threshold: stays dense),
    a 1x1 conv 80% and the classifier 60%."""
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 16, 1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
    for index, amount in ((0, 0.7), (3, 0.2), (5, 0.8), (9, 0.6)):
        prune.l1_unstructured(model[index], "weight", amount)
        prune.remove(model[index], "weight")
    return randomise_batchnorm(model).eval()


SPARSE_LAYERS = (0, 5, 9)  # the layers above the threshold, in pruned_cnn
SPARSE_MODEL_CASES = {  # (algo.conv, algo.block): the sparse conv kernel, the dense primitive
    ("direct", "1x1"): ("sparse direct", "direct"),
    ("im2col_gemm", "4x1"): ("sparse im2col", "im2col_gemm"),
    ("direct_nhwc", "1x1"): ("sparse direct", "direct_nhwc"),
    ("winograd", "8x1"): ("sparse direct", "direct"),  # winograd refuses the stride-2 conv
    ("winograd_nhwc", "1x1"): ("sparse direct", "direct"),  # the stride-2 conv: direct NHWC
    ("im2col_gemm_nhwc", "1x1"): ("sparse im2col", "im2col_gemm_nhwc"),
}


@pytest.mark.parametrize("conv,block", slow_except(SPARSE_MODEL_CASES, ("direct", "1x1"),
                                                ("im2col_gemm", "4x1")))
def test_sparse_plan_matches_pytorch_on_a_pruned_cnn(conv, block, target):
    model, example = pruned_cnn(), torch.randn(2, 3, 10, 10)
    conv_plan = sparse_plan(conv, block)
    built = compiler.compile(model, example, conv_plan, compiler.CompilerConfig(), target)
    with torch.no_grad():
        ref = model(example).numpy()
    assert compiler.max_relative_error(hardware.run_tvm(built.executable, example), ref) <= 1e-4

    sparse_kernel, dense = SPARSE_MODEL_CASES[conv, block]
    assert conv_plan.lowered == {sparse_kernel: 2, dense: 1, "sparse linear": 1}
    refused = {f"{sparse_kernel}: sparsity 0.20 < 0.5": 1}
    if "winograd" in conv:
        refused[f"{conv}: stride 2x2"] = 1
    assert conv_plan.fallbacks == refused
    assert built.arithmetic["matmul"] == {"float32xfloat32->float32"}  # the sparse linear

    # bytes: the kernels' constants (values, offsets, indptr: as CSR/BSR with one column per
    # block) against the dense fp32 weights of the three sparse layers
    rows, cols = map(int, block.split("x"))
    weights = [model[i].weight.detach().numpy() for i in SPARSE_LAYERS]
    stored = sum((sparse.conv_weight_to_sparse(w, 1, sparse.BlockShape(rows, cols)) if w.ndim == 4
                  else sparse.to_sparse(w, sparse.BlockShape(rows, cols))).stored_bytes
                 for w in weights)
    metrics = conv_plan.metrics()
    assert metrics["sparse_layers"] == 3 and metrics["linears_sparse"] == 1
    assert metrics[f"convs_{sparse_kernel.replace(' ', '_')}"] == 2
    assert metrics["conv_fallbacks"] == len(refused)
    assert metrics["sparse_weight_bytes"] == stored
    assert metrics["dense_weight_bytes"] == 4 * sum(w.size for w in weights)
    if block == "1x1":  # CSR of 20-40% nonzeros: 8 bytes each, less than the dense 4 x all
        assert metrics["sparse_weight_bytes"] < metrics["dense_weight_bytes"]


def test_direct_nhwc_converts_only_the_dense_convs():
    """The sparse kernels are NCHW: the convs the sparse lowering claims keep that layout (here
    lowered by the rewrite already, each with the bias add after it) and get NCHW inputs."""
    example = torch.randn(1, 3, 10, 10)
    mod = compiler.fold_batchnorm(compiler.import_module(pruned_cnn(), example))
    text = sparse_plan("direct_nhwc").rewrite(mod).script(show_meta=False)
    assert text.count('data_layout="NHWC"') == 1 and text.count('data_layout="NCHW"') == 0
    assert text.count("R.call_tir(cls.sparse_conv2d_direct") == 2
    assert text.count("R.permute_dims(") == 2  # into NHWC for the dense conv, back after it


class ResidualBlock(torch.nn.Module):
    """resnet's basic block with a 1x1 projection: conv-BN-ReLU, conv-BN, + projection, ReLU."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.conv1, self.bn1 = nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.proj, self.bn3 = nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.bn3(self.proj(x)))


def run_model(mod: tvm.IRModule, target, x: torch.Tensor) -> np.ndarray:
    """An imported model's main returns a tuple: its first field."""
    vm = relax.VirtualMachine(tvm.compile(mod, target), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x.numpy()))[0].numpy()


def pruned(model: torch.nn.Module, amount: float) -> torch.nn.Module:
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            prune.l1_unstructured(m, "weight", amount)
            prune.remove(m, "weight")
    return randomise_batchnorm(model).eval()


@pytest.mark.parametrize("conv", slow_except(["direct", "im2col_gemm", "direct_nhwc"], "direct"))
def test_sparse_kernels_apply_bias_residual_and_relu_as_they_store(conv, target):
    """In a residual block every bias add, the residual add and both ReLUs go into the sparse
    kernels: no elementwise kernel is left, and the result is PyTorch's."""
    model, example = pruned(ResidualBlock(), 0.8), torch.randn(1, 8, 9, 9)
    conv_plan = sparse_plan(conv)
    mod = compiler.fold_batchnorm(compiler.import_module(model, example))
    with target:
        lowered = lower(conv_plan, mod)
    kernel = "sparse_conv2d_direct" if conv != "im2col_gemm" else "sparse_conv2d_im2col"
    assert all(name.startswith(kernel) for name in kernel_names(lowered)), kernel_names(lowered)
    assert conv_plan.lowered == {f"sparse {kernel.split('_')[-1]}": 3}
    with torch.no_grad():
        ref = model(example).numpy()
    assert relative_error(run_model(lowered, target, example), ref) <= 1e-4


def test_epilogue_stops_where_a_result_has_another_user(target):
    """y = conv + bias is read twice (ReLU and the final add): the kernel takes the bias only,
    ReLU and the add stay kernels of their own, and the result is right."""
    nn = torch.nn

    class TwoUsers(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 8, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            return torch.relu(y) + y

    model, example = pruned(TwoUsers(), 0.7), torch.randn(1, 4, 7, 7)
    conv_plan = sparse_plan()
    mod = compiler.fold_batchnorm(compiler.import_module(model, example))
    with target:
        lowered = lower(conv_plan, mod)
    names = kernel_names(lowered)
    assert "sparse_conv2d_direct" in names and any("relu" in n for n in names), names
    bias = [f for gv, f in lowered.functions.items() if gv.name_hint == "sparse_conv2d_direct"]
    assert len(bias[0].params) == 6  # x, values, offsets, indptr, bias, out: no residual
    with torch.no_grad():
        ref = model(example).numpy()
    assert relative_error(run_model(lowered, target, example), ref) <= 1e-4


def half_zero_weight(case: Case) -> np.ndarray:
    """A weight with exactly half its entries zero."""
    _, w = random_case(case)
    w.flat[np.random.default_rng(2).permutation(w.size)[:w.size // 2]] = 0
    return w


@pytest.mark.parametrize("threshold,sparse_conv", [(0.5, True), (0.75, False)])
def test_threshold_decides_which_layers_go_sparse(threshold, sparse_conv, target):
    case = CASES["3x3 asymmetric padding"]
    x, w = random_case(case)[0], half_zero_weight(case)
    conv_plan = sparse_plan(threshold=threshold)
    mod = lower(conv_plan, conv_module(case, w))
    assert relative_error(run(mod, target, x), reference(case, x, w)) <= 1e-4
    if sparse_conv:  # sparsity 0.5 >= 0.5
        assert conv_plan.lowered == {"sparse direct": 1} and not conv_plan.fallbacks
        assert "sparse_conv2d_direct" in kernel_names(mod)
    else:
        assert conv_plan.lowered == {"direct": 1}
        assert conv_plan.fallbacks == {"sparse direct: sparsity 0.50 < 0.75": 1}
        assert not any(name.startswith("sparse") for name in kernel_names(mod))
    assert conv_plan.metrics()["sparse_layers"] == float(sparse_conv)


@pytest.mark.parametrize("dtype,out_dtype,weight_as_input,reason", [
    ("uint8", "int32", False, "int8"),
    ("float16", "float32", False, "float16"),
    ("float32", None, True, "weight not constant"),
])
def test_sparse_refuses_what_its_kernels_cannot_compute(dtype, out_dtype, weight_as_input,
                                                        reason):
    case = CASES["1x1"]
    w = half_zero_weight(case).astype("int8" if dtype == "uint8" else dtype)
    conv_plan = sparse_plan(threshold=0.0)
    lower(conv_plan, conv_module(case, w, dtype, out_dtype, weight_as_input))
    assert conv_plan.lowered == {"direct": 1}
    assert conv_plan.fallbacks == {f"sparse direct: {reason}": 1}


def test_matmul_without_a_constant_weight_keeps_relax_legalisation():
    bb = relax.BlockBuilder()
    x, y = (relax.Var(n, relax.TensorType((2, 8), "float32")) for n in "xy")
    with bb.function("main", [x, y]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(x, relax.op.permute_dims(y)))
        bb.emit_func_output(out)
    conv_plan = sparse_plan(threshold=0.0)
    assert set(conv_plan.legalize_map()) == {"relax.nn.conv2d", "relax.matmul"}
    mod = lower(conv_plan, bb.get())
    assert conv_plan.fallbacks == {"sparse linear: weight not constant": 1}
    assert not conv_plan.lowered and "matmul" in kernel_names(mod)


def test_dense_plan_reports_the_same_metric_names_with_zeros():
    case = CASES["1x1"]
    conv_plan = plan(AlgoConfig(conv="direct"))
    lower(conv_plan, conv_module(case, random_case(case)[1]))
    assert list(conv_plan.legalize_map()) == ["relax.nn.conv2d"]
    assert conv_plan.metrics() == {"convs_direct": 1.0, "conv_fallbacks": 0.0,
                                   "linears_sparse": 0.0, "sparse_layers": 0.0,
                                   "sparse_weight_bytes": 0.0, "dense_weight_bytes": 0.0}


def test_bad_sparse_settings_are_bad_input_listing_what_is_allowed():
    with pytest.raises(BadInput) as error:
        sparse_plan(block="3x3")
    for word in ["algo.block", "'3x3'", "1x1", "4x1", "4x4"]:
        assert word in str(error.value)
    with pytest.raises(BadInput, match="algo.threshold: 1.5 is out of range; allowed: 0.0 to 1.0"):
        sparse_plan(threshold=1.5)
    with pytest.raises(BadInput, match="algo.format: 'csr' is not allowed; allowed: dense, sparse"):
        plan(AlgoConfig(format="csr"))
    block = AlgoConfig.__dataclass_fields__["block"].metadata
    assert block["when"] == {"algo.format": ("sparse",)} and block["unset"] == "1x1"
    assert [algorithms.block_shape(b) for b in ("1x1", "4x1", "1x4")] == [
        sparse.BlockShape(1, 1), sparse.BlockShape(4, 1), sparse.BlockShape(1, 4)]


def trial_config(method: str, fmt: str = "sparse") -> TrialConfig:
    groups = {layer: cls() for layer, cls in LAYERS.items()}
    groups["compress"] = compression.CompressConfig(
        method, amount=0.8 if "unstructured" in method else None)
    groups["algo"] = AlgoConfig(format=fmt)
    return TrialConfig(**groups)


def test_sparse_format_needs_an_unstructured_pruned_fp32_model():
    assert infeasible(trial_config("unstructured")) is None
    assert infeasible(trial_config("none", "dense")) is None
    assert infeasible(trial_config("int8", "dense")) is None
    assert infeasible(trial_config("none")) == (
        "algo.format sparse needs an unstructured-pruned fp32 model: compress.method "
        "unstructured or random (got none: no unstructured pruning); otherwise use "
        "algo.format dense")
    for method, problem in (("int8", "no unstructured pruning"),
                            ("channel", "no unstructured pruning"),
                            ("unstructured+int8", "int8 arithmetic"),
                            ("unstructured+fp16", "fp16 arithmetic")):
        reason = infeasible(trial_config(method))
        assert f"(got {method}: {problem}" in reason and "compress.method unstructured" in reason


def test_the_sparse_format_entry_declares_that_constraint():
    """The rule is the `sparse` format's own (algo.format registry), asked as space asks."""
    assert registry.infeasible({"algo.format": "sparse"}, trial_config("unstructured")) is None
    assert registry.infeasible({"algo.format": "dense"}, trial_config("none", "dense")) is None
    assert registry.infeasible({"algo.format": "sparse"}, trial_config("none")) == (
        "algo.format sparse needs an unstructured-pruned fp32 model: compress.method "
        "unstructured or random (got none: no unstructured pruning); otherwise use "
        "algo.format dense")
    for method, problem in (("int8", "no unstructured pruning"),
                            ("unstructured+fp16", "fp16 arithmetic")):
        reason = algorithms.FORMATS.infeasible("sparse", trial_config(method))
        assert f"(got {method}: {problem}" in reason and "compress.method unstructured" in reason


def test_winograd_on_a_1x1_conv_falls_back_to_direct_and_logs_why(caplog):
    model = torch.nn.Conv2d(8, 16, 1).eval()
    example = torch.randn(1, 8, 6, 6)
    plan = algorithms.plan(algorithms.AlgoConfig(conv="winograd"))
    with caplog.at_level(logging.INFO, logger="dlas_search.algorithms"):
        built = compiler.compile(model, example, plan, compiler.CompilerConfig(),
                                 hardware.local_target(1))
    assert plan.lowered == {"direct": 1} and plan.fallbacks == {"winograd: kernel 1x1": 1}
    assert any("winograd: kernel 1x1" in r.getMessage() for r in caplog.records)
    assert built.metrics["conv_fallbacks"] == 1
    with torch.no_grad():
        reference = model(example).numpy()
    assert compiler.max_relative_error(hardware.run_tvm(built.executable, example),
                                       reference) <= 1e-5
