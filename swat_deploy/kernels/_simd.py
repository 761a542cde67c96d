"""A 16-lane float32 vector type for numba, so hot loops keep accumulators in registers.

Why this exists: the CSR kernels' inner step is "acc[0:T] += w * x[off:off+T]" over all
non-zeros of an output row. Written as a plain numba loop, LLVM must re-load and re-store
`acc` for every non-zero (it cannot prove `acc` and `x` do not overlap) and numba disables
LLVM's SLP vectorizer, so short rows (a 4x4 feature map is 16-24 floats) cost ~15 cycles of
overhead per non-zero. With an explicit vector value the accumulators are SSA registers and
a non-zero costs one broadcast, T/16 unaligned loads and T/16 FMAs: measured 2-4x faster for
T <= 64. On AVX2-only CPUs LLVM splits each 16-lane op into two 8-lane ones.

Only a few operations are provided: splat, unaligned load, unaligned store, fused
multiply-add, add, and ReLU (for fused conv epilogues). Loads and stores do no bounds checks - callers guarantee the range.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

LANES = 16
_VT = ir.VectorType(ir.FloatType(), LANES)


class F32Vec(types.Type):
    """numba type of a <16 x float> LLVM vector value."""

    def __init__(self) -> None:
        super().__init__(name=f"f32x{LANES}")


f32vec = F32Vec()


@register_model(F32Vec)
class _F32VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):  # noqa: ANN001
        super().__init__(dmm, fe_type, _VT)


def _is_f32_vector_array(arr) -> bool:  # noqa: ANN001
    return isinstance(arr, types.Array) and arr.dtype == types.float32 and arr.ndim == 1 and arr.layout == "C"


def _elem_ptr(context, builder, aryty, ary, idx, idxty):  # noqa: ANN001, ANN202
    a = context.make_array(aryty)(context, builder, ary)
    i = context.cast(builder, idx, idxty, types.intp)
    return builder.bitcast(builder.gep(a.data, [i], inbounds=True), _VT.as_pointer())


@intrinsic
def vsplat(typingctx, x):  # noqa: ANN001, ANN201
    """A vector with every lane equal to the scalar `x` (cast to float32)."""
    if not isinstance(x, (types.Float, types.Integer)):
        return None

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        v = context.cast(builder, args[0], sig.args[0], types.float32)
        v = builder.insert_element(ir.Constant(_VT, ir.Undefined), v, ir.Constant(ir.IntType(32), 0))
        mask = ir.Constant(ir.VectorType(ir.IntType(32), LANES), [0] * LANES)
        return builder.shuffle_vector(v, ir.Constant(_VT, ir.Undefined), mask)

    return f32vec(x), codegen


@intrinsic
def vload(typingctx, arr, idx):  # noqa: ANN001, ANN201
    """arr[idx : idx + 16] of a 1-D contiguous float32 array (unaligned, unchecked)."""
    if not (_is_f32_vector_array(arr) and isinstance(idx, types.Integer)):
        return None

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        return builder.load(_elem_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1]), align=4)

    return f32vec(arr, idx), codegen


@intrinsic
def vstore(typingctx, arr, idx, v):  # noqa: ANN001, ANN201
    """arr[idx : idx + 16] = v (unaligned, unchecked)."""
    if not (_is_f32_vector_array(arr) and isinstance(idx, types.Integer) and v == f32vec):
        return None

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        builder.store(args[2], _elem_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1]), align=4)
        return context.get_dummy_value()

    return types.none(arr, idx, v), codegen


@intrinsic
def vfma(typingctx, acc, w, x):  # noqa: ANN001, ANN201
    """acc + w * x, fused (one rounding), lane-wise."""
    if not (acc == f32vec and w == f32vec and x == f32vec):
        return None

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VT, [_VT, _VT, _VT]),
                                            f"llvm.fma.v{LANES}f32")
        return builder.call(fn, [args[1], args[2], args[0]])

    return f32vec(acc, w, x), codegen


@intrinsic
def vadd(typingctx, a, b):  # noqa: ANN001, ANN201
    """a + b, lane-wise."""
    if not (a == f32vec and b == f32vec):
        return None

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        return builder.fadd(args[0], args[1])

    return f32vec(a, b), codegen


@intrinsic
def vrelu(typingctx, a):  # noqa: ANN001, ANN201
    """max(a, 0) lane-wise; NaN stays NaN, as in torch.relu (an unordered compare keeps it)."""
    if a != f32vec:
        return None

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        zero = ir.Constant(_VT, [0.0] * LANES)
        keep = builder.fcmp_unordered(">=", args[0], zero)
        return builder.select(keep, args[0], zero)

    return f32vec(a), codegen
