"""lowering.py: the numpy constant folder gives TVM's FoldConstant's bits, without LLVM."""
import numpy as np
import tvm
from tvm import relax

from dlas_search import lowering


def constant_arithmetic() -> tvm.IRModule:
    """An int8 weight's zero-point correction, an int32 product that wraps, and a decomposed
    BatchNorm's broadcast scale: each computed on constants only."""
    rng = np.random.default_rng(0)
    weight = rng.integers(-128, 128, (8, 3, 3, 3), dtype=np.int8)
    scale = rng.standard_normal(8).astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 4, 4), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            sums = bb.emit(relax.op.sum(relax.op.astype(relax.const(weight), "int32"),
                                        axis=[1, 2, 3]))
            correction = bb.emit(relax.op.multiply(sums, relax.const(-7, "int32")))
            wrapped = bb.emit(relax.op.add(relax.op.multiply(
                relax.const(np.full(4, 2**30, "int32")), relax.const(4, "int32")),
                relax.const(np.arange(4, dtype="int32"))))
            scaled = bb.emit(relax.op.multiply(x, relax.op.expand_dims(relax.const(scale),
                                                                      axis=[1, 2])))
            out = bb.emit_output(relax.Tuple([scaled, correction, wrapped]))
        bb.emit_func_output(out)
    return bb.get()


def test_numpy_folds_integer_sums_products_and_expand_dims_as_tvm_does():
    mod = constant_arithmetic()
    by_numpy = lowering._NumpyFolder(mod).run()
    calls = [b.value.op.name for b in by_numpy["main"].body.blocks[0].bindings
             if isinstance(b.value, relax.Call)]
    assert calls == ["relax.multiply"]  # only x * scale is left: numpy did the rest
    tvm.ir.assert_structural_equal(lowering.fold_constants(mod),
                                   relax.transform.FoldConstant()(mod))


def test_integer_division_is_left_to_tvm():
    """Floor or truncate: numpy and TVM may round a negative quotient differently."""
    bb = relax.BlockBuilder()
    with bb.function("main", []):
        with bb.dataflow():
            q = bb.emit_output(relax.op.divide(relax.const(np.array([-7], "int32")),
                                               relax.const(2, "int32")))
        bb.emit_func_output(q)
    mod = bb.get()
    by_numpy = lowering._NumpyFolder(mod).run()
    assert any(isinstance(b.value, relax.Call) for b in by_numpy["main"].body.blocks[0].bindings)
