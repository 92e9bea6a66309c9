"""exp for the CPU kernels without a libm call per element.

LLVM lowers `exp` on float32 to a call of `expf`, lane by lane, and a loop that calls a
function is not vectorised: SwiGLU's sigmoid took 8 ns an element, 8% of a prefill.
Here exp and exp2 are computed from the exponent bits (a power of two) times a polynomial
in the rest, in plain arithmetic that vectorises, within a few float32 ulps. `use_polynomial_exp` makes it the lowering of float32 `exp`
(and `sigmoid`) for LLVM targets; the attention kernels call `exp2` directly.
"""

from __future__ import annotations

import functools
import math

from tvm import tirx

# 2**f on [0, 1): least-squares degree-6 fit on Chebyshev nodes (relative error 2.6e-9, below f32 rounding).
EXP2_COEFFICIENTS = (1.0000000025868887, 0.6931469286930426, 0.24023050204510465, 0.055480426324716045,
                     0.00968458045497916, 0.0012387821452754277, 0.00021877504861477862)
LOG2E = math.log2(math.e)


def _splat(value: float | int, dtype: str, lanes: int) -> tirx.PrimExpr:
    scalar = tirx.const(value, dtype)
    return scalar if lanes == 1 else tirx.Broadcast(scalar, lanes)


def exp2(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """2**x for float32 x of any lane count; below -126 the result is as good as zero."""
    lanes = x.ty.dtype.lanes
    x = tirx.max(x, _splat(-126.0, "float32", lanes))
    whole = tirx.floor(x)
    fraction = x - whole
    poly = _splat(EXP2_COEFFICIENTS[-1], "float32", lanes)
    for coefficient in EXP2_COEFFICIENTS[-2::-1]:
        poly = poly * fraction + _splat(coefficient, "float32", lanes)
    return poly * _power_of_two(whole, lanes)


# ln 2 split so that n * LN2_HIGH is exact in float32 for |n| < 256 (Cody and Waite's range reduction).
LN2_HIGH = 0.693145751953125
LN2_LOW = 1.4286068202862268e-06
# e**r on [-ln2/2, ln2/2]: Taylor to degree 7 (truncation error 6e-9 relative, below float32's rounding).
EXP_COEFFICIENTS = tuple(1 / math.factorial(i) for i in range(8))


def exp(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """e**x for float32 x of any lane count, within a few float32 ulps: x = n ln2 + r, e**x = 2**n e**r. x is
    clamped to [-87, 88]: beyond, e**x is below 1.7e-38 or above 1.6e38, as good as 0 or infinite to a sigmoid
    or a softmax."""
    lanes = x.ty.dtype.lanes
    x = tirx.min(tirx.max(x, _splat(-87.0, "float32", lanes)), _splat(88.0, "float32", lanes))
    n = tirx.floor(x * _splat(LOG2E, "float32", lanes) + _splat(0.5, "float32", lanes))
    r = x - n * _splat(LN2_HIGH, "float32", lanes) - n * _splat(LN2_LOW, "float32", lanes)
    poly = _splat(EXP_COEFFICIENTS[-1], "float32", lanes)
    for coefficient in EXP_COEFFICIENTS[-2::-1]:
        poly = poly * r + _splat(coefficient, "float32", lanes)
    return poly * _power_of_two(n, lanes)


def _power_of_two(whole: tirx.PrimExpr, lanes: int) -> tirx.PrimExpr:
    """2**whole for an integral float32 `whole` in [-126, 127], from the exponent bits."""
    int_type = "int32" if lanes == 1 else f"int32x{lanes}"
    float_type = "float32" if lanes == 1 else f"float32x{lanes}"
    bits = tirx.shift_left(tirx.Cast(int_type, whole) + _splat(127, "int32", lanes), _splat(23, "int32", lanes))
    return tirx.reinterpret(float_type, bits)


def _is_float32(x: tirx.PrimExpr) -> bool:
    dtype = x.ty.dtype
    return dtype.is_float and dtype.bits == 32


def _lower_exp(call: tirx.PrimExpr) -> tirx.PrimExpr:
    x = call.args[0]
    return exp(x) if _is_float32(x) else call  # other types: left to LLVM


def _lower_sigmoid(call: tirx.PrimExpr) -> tirx.PrimExpr:
    x = call.args[0]
    if not _is_float32(x):
        return call
    one = _splat(1.0, "float32", x.ty.dtype.lanes)
    return one / (one + exp(-x))


@functools.cache
def use_polynomial_exp() -> None:
    """Lower float32 `exp` and `sigmoid` in every LLVM build of this process with `exp` above (once)."""
    tirx.register_intrin_lowering("tirx.exp", "llvm", f=_lower_exp, level=99)
    tirx.register_intrin_lowering("tirx.sigmoid", "llvm", f=_lower_sigmoid, level=99)
