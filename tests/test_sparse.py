"""Sparse conv / linear kernels (dlas_search.algorithms.sparse) against PyTorch, on small shapes
so the whole file runs in well under a minute on one core. Each case builds a Relax module with
one sparse call, compiles it with the default pipeline for the local CPU and compares with
torch."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tvm
from tvm import relax

from conftest import slow_except
from dlas_search import hardware
from dlas_search.algorithms import Conv, sparse
from dlas_search.algorithms.sparse import BlockShape, kernels, tiling

TARGET = hardware.local_target(1)
TOL = 1e-4
CSR, BSR4 = BlockShape(), BlockShape(4, 1)


def pruned(shape, amount: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype("float32")
    w[rng.random(shape) < amount] = 0
    return w


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    assert got.shape == ref.shape
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-6))


def run(build, x: np.ndarray) -> np.ndarray:
    """Build `main(x)` whose body is `build(bb, x_var)`, compile, run."""
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(x.shape, "float32"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            out = bb.emit_output(build(bb, xv))
        bb.emit_func_output(out)
    ex = tvm.compile(bb.get(), TARGET)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x, tvm.cpu())).numpy()


def conv_call(bb, xv, w, stride=(1, 1), padding=(0, 0, 0, 0), groups=1, dilation=(1, 1)):
    return bb.normalize(relax.op.nn.conv2d(xv, relax.const(w), strides=stride, padding=padding,
                                           groups=groups, dilation=dilation))


def torch_conv(x, w, stride=(1, 1), padding=(0, 0, 0, 0), groups=1, dilation=(1, 1)):
    top, left, bottom, right = padding
    xt = F.pad(torch.from_numpy(x), (left, right, top, bottom))
    return F.conv2d(xt, torch.from_numpy(w), stride=stride, groups=groups,
                    dilation=dilation).numpy()


def check_conv(kernel, block, x, w, **conv):
    got = run(lambda bb, xv: sparse.emit_conv(bb, conv_call(bb, xv, w, **conv), kernel, block),
              x)
    err = rel_err(got, torch_conv(x, w, **conv))
    assert err <= TOL, f"{kernel} {block}: relative error {err:.2e}"


# (batch, in, height, width, out, kh, kw, stride, padding top/left/bottom/right, groups)
CASES = [
    pytest.param(1, 3, 9, 11, 5, 3, 3, (1, 1), (1, 1, 1, 1), 1, id="3x3-s1-odd-channels"),
    pytest.param(1, 5, 8, 9, 4, 3, 3, (1, 1), (0, 0, 0, 0), 1, id="3x3-valid"),
    pytest.param(1, 5, 12, 10, 7, 3, 3, (2, 2), (1, 1, 1, 1), 1, id="3x3-s2"),
    pytest.param(1, 7, 8, 8, 9, 1, 1, (1, 1), (0, 0, 0, 0), 1, id="1x1"),
    pytest.param(1, 6, 9, 9, 10, 1, 1, (2, 2), (0, 0, 0, 0), 1, id="1x1-s2-downsample"),
    pytest.param(1, 4, 11, 9, 6, 5, 5, (1, 1), (2, 2, 2, 2), 1, id="5x5"),
    pytest.param(1, 3, 20, 18, 8, 7, 7, (2, 2), (3, 3, 3, 3), 1, id="7x7-s2-stem"),
    pytest.param(1, 5, 9, 10, 8, 3, 2, (1, 2), (0, 1, 2, 0), 1, id="3x2-asym-pad-stride"),
    pytest.param(1, 6, 9, 9, 8, 3, 3, (1, 1), (1, 1, 1, 1), 2, id="groups2"),
    pytest.param(1, 7, 10, 12, 7, 3, 3, (1, 1), (1, 1, 1, 1), 7, id="depthwise"),
    pytest.param(1, 6, 11, 11, 6, 3, 3, (2, 2), (1, 1, 1, 1), 6, id="depthwise-s2"),
    pytest.param(2, 4, 6, 70, 5, 3, 3, (1, 1), (1, 1, 1, 1), 1, id="batch2-wide-rows"),
]


@pytest.mark.parametrize("kernel", sparse.KERNELS)
@pytest.mark.parametrize("block", [CSR, BSR4], ids=["csr", "bsr4x1"])
@pytest.mark.parametrize("n,c,h,w,o,kh,kw,stride,padding,groups",
                         slow_except(CASES, "3x3-s2"))  # fast: one case, both kernels and formats
def test_conv_matches_torch(kernel, block, n, c, h, w, o, kh, kw, stride, padding, groups):
    x = np.random.default_rng(1).standard_normal((n, c, h, w)).astype("float32")
    weight = pruned((o, c // groups, kh, kw), 0.8)
    check_conv(kernel, block, x, weight, stride=stride, padding=padding, groups=groups)


@pytest.mark.parametrize("kernel", slow_except(sparse.KERNELS, "direct"))
@pytest.mark.parametrize("block", [(8, 1), (1, 4), (3, 2), (16, 1)], ids=str)
def test_block_shapes_with_ragged_tails(kernel, block):
    """Block rows/cols that divide neither the 10 output channels nor the 5*3*3 columns."""
    x = np.random.default_rng(2).standard_normal((1, 5, 9, 7)).astype("float32")
    check_conv(kernel, BlockShape(*block), x, pruned((10, 5, 3, 3), 0.7), stride=(1, 1),
               padding=(1, 1, 1, 1))


@pytest.mark.parametrize("kernel", sparse.KERNELS)
@pytest.mark.parametrize("block", [CSR, BSR4], ids=["csr", "bsr4x1"])
@pytest.mark.parametrize("amount", slow_except([0.0, 0.8, 1.0], 0.8))
def test_sparsity_extremes_and_empty_rows(kernel, block, amount):
    """Dense weights, ~80% zeros with whole output channels (one a whole 4-row block) zeroed,
    and an all-zero weight."""
    x = np.random.default_rng(3).standard_normal((1, 6, 8, 8)).astype("float32")
    weight = pruned((13, 6, 3, 3), amount)
    weight[[2, 8, 9, 10, 11]] = 0
    check_conv(kernel, block, x, weight, padding=(1, 1, 1, 1))


@pytest.mark.parametrize("kernel", sparse.KERNELS)
def test_dilation(kernel):
    x = np.random.default_rng(4).standard_normal((1, 4, 12, 11)).astype("float32")
    check_conv(kernel, CSR, x, pruned((5, 4, 3, 3), 0.6), padding=(2, 2, 2, 2),
               dilation=(2, 2), stride=(2, 1))


@pytest.mark.parametrize("kernel", sparse.KERNELS)
@pytest.mark.parametrize("block", [CSR, BSR4], ids=["csr", "bsr4x1"])
@pytest.mark.parametrize("residual,relu", slow_except([(False, True), (True, False), (True, True)],
                                                   (True, True)))
def test_epilogue_adds_bias_and_residual_then_relu(kernel, block, residual, relu):
    """Two images, a strided conv with a ragged output-channel block: each output gets its
    channel's bias, the residual at its own position, then ReLU."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 5, 12, 10)).astype("float32")
    w, bias = pruned((7, 5, 3, 3), 0.7), rng.standard_normal(7).astype("float32")
    res = rng.standard_normal((2, 7, 6, 5)).astype("float32")
    conv = dict(stride=(2, 2), padding=(1, 1, 1, 1))

    def emit(bb, xv):
        return sparse.emit_conv(bb, conv_call(bb, xv, w, **conv), kernel, block, bias,
                                relax.const(res) if residual else None, relu)

    ref = torch_conv(x, w, **conv) + bias.reshape(1, 7, 1, 1) + (res if residual else 0)
    ref = np.maximum(ref, 0) if relu else ref
    assert rel_err(run(emit, x), ref) <= TOL


CHUNKED = [
    pytest.param(1, 40, 9, 11, 37, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), id="3x3-ragged-row-groups"),
    pytest.param(2, 24, 12, 10, 20, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1), id="3x3-s2-batch2"),
    pytest.param(1, 24, 9, 9, 16, 1, 1, (2, 2), (0, 0, 0, 0), (1, 1), id="1x1-s2"),
    pytest.param(1, 16, 12, 11, 16, 3, 3, (2, 1), (2, 2, 2, 2), (2, 2), id="dilated"),
    pytest.param(1, 9, 6, 70, 16, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), id="wide-rows"),
]


@pytest.mark.parametrize("block", [CSR, BSR4, BlockShape(1, 4)], ids=["csr", "bsr4x1", "bsr1x4"])
@pytest.mark.parametrize("n,c,h,w,o,kh,kw,stride,padding,dilation",
                         slow_except(CHUNKED, "3x3-s2-batch2"))
def test_direct_walks_input_channels_in_chunks(monkeypatch, block, n, c, h, w, o, kh, kw,
                                               stride, padding, dilation):
    """With an L1 budget of a few hundred bytes every conv here is cut into input-channel
    chunks (partial sums kept between chunks, rows in groups with a ragged last group); the
    result still matches PyTorch and the kernel's indptr has one entry per row and chunk."""
    monkeypatch.setattr(tiling, "L1_BYTES", 600)
    monkeypatch.setattr(tiling, "MIN_CHUNK_BLOCKS", 1)
    x = np.random.default_rng(7).standard_normal((n, c, h, w)).astype("float32")
    weight = pruned((o, c, kh, kw), 0.6)
    conv = dict(stride=stride, padding=padding, dilation=dilation)
    calls = []

    def emit(bb, xv):
        calls.append(sparse.emit_conv(bb, conv_call(bb, xv, weight, **conv), "direct", block))
        return calls[-1]

    err = rel_err(run(emit, x), torch_conv(x, weight, **conv))
    assert err <= TOL, f"relative error {err:.2e}"
    data, indptr = (calls[0].args[1].fields[i].value.numpy() for i in (1, 3))
    sm = sparse.conv_weight_to_sparse(weight, 1, block)
    assert len(indptr) > -(-o // block.rows) + 1  # more (row, chunk) slots than rows
    assert indptr[-1] == sm.blocks and np.all(np.diff(indptr) >= 0)
    # the kernel's blocks, traced back to the matrix's by their first nonzero value
    where = {b.flat[np.flatnonzero(b)[0]]: (row, col) for row in range(len(sm.indptr) - 1)
             for b, col in zip(sm.data[sm.indptr[row]:sm.indptr[row + 1]],
                               sm.indices[sm.indptr[row]:sm.indptr[row + 1]])}
    seen = {}
    for k in range(len(indptr) - 1):
        blocks = [where[b.flat[np.flatnonzero(b)[0]]] for b in data[indptr[k]:indptr[k + 1]]]
        assert len({row for row, _ in blocks}) <= 1  # a slot holds one row's blocks
        for row, col in blocks:
            seen.setdefault(row, []).append(col)
    # every block once, each row's in column order across its slots (chunks by channel)
    assert sum(map(len, seen.values())) == sm.blocks
    assert all(cols == sorted(cols) for cols in seen.values())


def test_chunks_only_where_they_pay():
    """Chunks need enough nonzeros each to pay for their partial sums, and grouped convs never
    chunk (their rows read their own channels only)."""
    s = Conv.nchw(1, 256, 14, 14, 256, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1)
    many = tiling._Chunks.plan(s, 17, 16, 14 * 64, 256, 256 * 230)
    assert many.n > 1 and many.per * many.n >= 256 and many.group > 1
    few = tiling._Chunks.plan(s, 17, 16, 14 * 64, 256, 256 * 20)
    assert few.n == 1
    grouped = Conv.nchw(1, 256, 14, 14, 256, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 4)
    assert tiling._Chunks.plan(grouped, 17, 16, 14 * 64, 256, 256 * 230).n == 1


def test_phase_split_keeps_only_the_phases_taps_read():
    """A strided 1x1 conv reads phase (0, 0) only: a quarter of the copy at stride 2."""
    one = Conv.nchw(1, 8, 9, 9, 8, 1, 1, (2, 2), (0, 0, 0, 0), (1, 1), 1)
    three = Conv.nchw(1, 8, 9, 9, 8, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1), 1)
    p1, p3 = tiling._PhaseSplit.plan(one, 5, 16), tiling._PhaseSplit.plan(three, 5, 16)
    assert (p1.nph, p1.npw, p3.nph, p3.npw) == (1, 1, 2, 2)
    assert p1.zoff == 8 * p1.hq * p1.wq and p3.zoff == 8 * 4 * p3.hq * p3.wq


@pytest.mark.parametrize("block", [CSR, BSR4, BlockShape(1, 4)], ids=["csr", "bsr4x1", "bsr1x4"])
@pytest.mark.parametrize("batch", [1, 3, 37])
def test_linear_matches_torch(block, batch):
    x = np.random.default_rng(5).standard_normal((batch, 45)).astype("float32")
    weight = pruned((11, 45), 0.8)
    weight[4] = 0
    got = run(lambda bb, xv: sparse.emit_linear(bb, xv, weight, block), x)
    err = rel_err(got, F.linear(torch.from_numpy(x), torch.from_numpy(weight)).numpy())
    assert err <= TOL, err


def test_to_sparse_round_trip_and_sizes():
    w = pruned((10, 23), 0.75)
    assert sparse.sparsity(w) == pytest.approx(np.mean(w == 0))
    csr = sparse.to_sparse(w, CSR)
    assert csr.nnz == np.count_nonzero(w) and csr.blocks == csr.nnz
    assert csr.stored_bytes == csr.nnz * 8 + (10 + 1) * 4
    np.testing.assert_array_equal(csr.todense(), w)
    for block in (BlockShape(4, 1), BlockShape(3, 5)):
        bsr = sparse.to_sparse(w, block)
        np.testing.assert_array_equal(bsr.todense(), w)
        assert bsr.data.shape[1:] == (block.rows, block.cols)
        assert len(bsr.indptr) == -(-10 // block.rows) + 1
        assert bsr.nnz >= csr.nnz
    with pytest.raises(ValueError):
        BlockShape(0, 1)


def test_grouped_weight_is_block_diagonal():
    w = pruned((6, 2, 3, 3), 0.5)
    full = np.zeros((6, 6, 3, 3), "float32")
    for g in range(3):
        full[2 * g:2 * g + 2, 2 * g:2 * g + 2] = w[2 * g:2 * g + 2]
    sm = sparse.conv_weight_to_sparse(w, 3, BlockShape(2, 1))
    np.testing.assert_array_equal(sm.todense(), full.reshape(6, -1))


def _prim_funcs(mod):
    return {gv.name_hint: f for gv, f in mod.functions.items()
            if isinstance(f, tvm.tirx.PrimFunc)}


def test_index_arrays_are_call_tir_constants():
    w = pruned((8, 4, 3, 3), 0.8)
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType((1, 4, 6, 6), "float32"))
    with bb.function("main", [xv]):
        call = sparse.emit_conv(bb, conv_call(bb, xv, w, padding=(1, 1, 1, 1)), "direct", CSR)
        bb.emit_func_output(bb.emit(call))
    data, offsets, indptr, bias = (a.value.numpy() for a in call.args[1].fields[1:])
    assert data.size == np.count_nonzero(w)
    np.testing.assert_array_equal(np.sort(data.ravel()), np.sort(w[w != 0]))
    assert offsets.shape == (data.shape[0], 1) and indptr.shape == (9,)
    func = _prim_funcs(bb.get())["sparse_conv2d_direct"]
    np.testing.assert_array_equal(bias, np.zeros(8, np.float32))  # the model has none
    assert len(func.params) == 6 and func.attrs["tirx.is_scheduled"]


@pytest.mark.parametrize("kernel", sparse.KERNELS)
def test_kernels_are_parallel_and_vectorised(kernel):
    s = Conv.nchw(1, 8, 10, 10, 8, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1)
    build = kernels._direct_func if kernel == "direct" else kernels._im2col_func
    text = build(s, CSR, 10, sparse.Isa())[0].script()
    assert "T.parallel(" in text and "T.vectorized(8)" in text


def test_vector_width_follows_target():
    assert sparse.target_isa(tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})) \
        == sparse.Isa(16, 24)
    assert sparse.target_isa(tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})) == \
        sparse.Isa(8, 12)
    assert sparse.target_isa(None).lanes in (4, 8, 16)


@pytest.mark.parametrize("pipeline", ["legalize_map", "zero", "fuse"])
def test_survives_relax_pipelines(pipeline):
    """As a custom legalisation of conv2d (the intended use), then through LegalizeOps,
    FuseOps/FuseTIR or the zero pipeline with a bias + ReLU after it: the sparse PrimFunc
    stays separate (opaque, already scheduled) and the result is right."""
    x = np.random.default_rng(6).standard_normal((1, 4, 9, 9)).astype("float32")
    w, bias = pruned((8, 4, 3, 3), 0.8), np.linspace(-1, 1, 8, dtype="float32")
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(x.shape, "float32"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(xv, relax.const(w), padding=(1, 1)))
            y = bb.emit(relax.op.add(y, relax.const(bias.reshape(1, 8, 1, 1))))
            out = bb.emit_output(relax.op.nn.relu(y))
        bb.emit_func_output(out)
    mod = relax.transform.LegalizeOps(customize_legalize_map={
        "relax.nn.conv2d": lambda bb, call: sparse.emit_conv(bb, call, "direct", CSR),
    }, enable_warning=False)(bb.get())
    if pipeline == "zero":
        mod = relax.get_pipeline("zero")(mod)
    elif pipeline == "fuse":
        mod = relax.transform.AnnotateTIROpPattern()(mod)
        mod = relax.transform.FuseTIR()(relax.transform.FuseOps()(mod))
    funcs = _prim_funcs(mod)
    assert "sparse_conv2d_direct" in funcs
    assert not any("sparse" in name and name != "sparse_conv2d_direct" for name in funcs)
    vm = relax.VirtualMachine(tvm.compile(mod, TARGET), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x, tvm.cpu())).numpy()
    ref = np.maximum(torch_conv(x, w, padding=(1, 1, 1, 1)) + bias.reshape(1, 8, 1, 1), 0)
    assert rel_err(got, ref) <= TOL


def test_rejects_what_it_cannot_lower():
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType((1, 4, 6, 6), "float32"))
    wv = relax.Var("w", relax.TensorType((8, 4, 3, 3), "float32"))
    with bb.function("main", [xv, wv]):
        with pytest.raises(NotImplementedError, match="constant weight"):
            sparse.emit_conv(bb, bb.normalize(relax.op.nn.conv2d(xv, wv)), "direct", CSR)
        nhwc = relax.Var("y", relax.TensorType((1, 6, 6, 4), "float32"))
        call = bb.normalize(relax.op.nn.conv2d(nhwc, relax.const(pruned((8, 3, 3, 4), 0.5)),
                                               data_layout="NHWC", kernel_layout="OHWI"))
        with pytest.raises(NotImplementedError, match="NCHW"):
            sparse.emit_conv(bb, call, "direct", CSR)
        with pytest.raises(ValueError, match="unknown sparse kernel"):
            sparse.emit_conv(bb, conv_call(bb, xv, pruned((8, 4, 3, 3), 0.5)), "winograd", CSR)
        bb.emit_func_output(xv)
