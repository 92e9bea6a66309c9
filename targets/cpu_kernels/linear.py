"""CPU kernels for `linear` (float32, float16 or bfloat16 weights) and `quantized_linear` (grouped 4/8-bit
weights of every form ir/quant_formats.py allows).

One kernel per weight shape serves decode and prefill: it branches at run time on the
number of rows m, to a GEMV loop nest for few rows and a packed-panel GEMM for many (see
matmul.py). Weights stay in PyTorch's (N, K) layout, so every target shares one copy.
The optional bias and residual are added in the epilogue. Each kernel is written with
every optional input in its signature; the inputs a node lacks are dropped afterwards.
Activations are (batch, seq, features) tensors, read as (batch * seq, features) matrices.
Kernels are memoized: the layers of a model share a handful of shapes.
"""

from __future__ import annotations

import functools

from tvm.script import tirx as T

from . import matmul
from .common import opaque, without_unused_params


def supported(n: int, k: int, quantized: bool = False) -> bool:
    return (n % matmul.ROWS_PER_TASK == 0 and k % (matmul.GROUP if quantized else matmul.LANES) == 0
            and matmul.panel_width(n) is not None)


@functools.lru_cache(maxsize=None)
def linear_float(n: int, k: int, weight_dtype: str, has_bias: bool, has_residual: bool):
    """`linear` on float32 activations and an (n, k) float32, float16 or bfloat16 weight (converted as it is
    read: F16C's vcvtph2ps on x86; bfloat16 is the high half of a float32, so a shift)."""
    gemv = matmul.gemv_float(n, k)
    NR = matmul.panel_width(n)

    @T.macro
    def copy_panel(panel, first, weights):
        for kk in range(k):
            for j in T.unroll(NR):
                panel[kk * NR + j] = T.Cast("float32", weights[first + j, kk])

    gemm = matmul.gemm_panels(n, k, copy_panel)

    @T.macro
    def body(x, w, bias, res, y, m):
        if m < matmul.GEMV_ROWS:
            gemv(x, w, bias if has_bias else None, res, y, m)
        else:
            gemm(x, w, bias if has_bias else None, res, y, m)

    @T.prim_func
    def linear(var_x: T.handle, w: T.Buffer((n, k), weight_dtype), bias: T.Buffer((n,), "float32"),
               var_res: T.handle, var_y: T.handle):
        T.func_attr({"tirx.noalias": True})
        batch, seq = T.int64(), T.int64()
        x3 = T.match_buffer(var_x, (batch, seq, k), "float32")
        y3 = T.match_buffer(var_y, (batch, seq, n), "float32")
        if has_residual:
            res3 = T.match_buffer(var_res, (batch, seq, n), "float32")
            body(x3.view(batch * seq, k), w, bias, res3.view(batch * seq, n), y3.view(batch * seq, n), batch * seq)
        else:
            body(x3.view(batch * seq, k), w, bias, None, y3.view(batch * seq, n), batch * seq)
    return opaque(without_unused_params(linear))


@functools.lru_cache(maxsize=None)
def quantized_linear(n: int, k: int, bits: int, group: int, scale_dtype: str, has_mins: bool, has_bias: bool,
                     has_residual: bool, vnni: bool = False):
    """`quantized_linear` on an (n, k) grouped weight of the given form (ir/quant_formats.py); `vnni` when the
    processor has AVX-512 VNNI."""
    blocks = k // matmul.GROUP
    half = matmul.GROUP // 2
    gemv = matmul.int8_gemv(n, k, bits, group, has_mins, vnni)
    NR = matmul.panel_width(n)
    codes_shape = (n, k // 2) if bits == 4 else (n, k)
    codes_dtype = "uint8" if bits == 4 else "int8"
    code_offset = T.float32(8 if bits == 4 and not has_mins else 0)

    def value(weights, row, code, index):
        """The weight at input `index` of `row` whose code (float32) is `code`."""
        scaled = code * T.Cast("float32", weights[1][row, index // group])
        return scaled + T.Cast("float32", weights[2][row, index // group]) if has_mins else scaled

    @T.macro
    def dequantize_panel(panel, first, weights):
        for g in range(blocks):
            if bits == 4:
                for b in range(half):
                    for j in T.unroll(NR):
                        byte = weights[0][first + j, g * half + b]
                        panel[(g * matmul.GROUP + b) * NR + j] = value(
                            weights, first + j, T.Cast("float32", T.bitwise_and(byte, T.uint8(15))) - code_offset,
                            g * matmul.GROUP + b)
                        panel[(g * matmul.GROUP + b + half) * NR + j] = value(
                            weights, first + j, T.Cast("float32", T.shift_right(byte, T.uint8(4))) - code_offset,
                            g * matmul.GROUP + b + half)
            else:
                for b in range(matmul.GROUP):
                    for j in T.unroll(NR):
                        panel[(g * matmul.GROUP + b) * NR + j] = value(
                            weights, first + j, T.Cast("float32", weights[0][first + j, g * matmul.GROUP + b]),
                            g * matmul.GROUP + b)

    gemm = matmul.gemm_panels(n, k, dequantize_panel)

    @T.macro
    def body(x, codes, scales, mins, bias, res, y, m):
        if m < matmul.GEMV_ROWS:
            gemv(x, codes, scales, mins if has_mins else None, bias if has_bias else None, res, y, m)
        else:
            gemm(x, (codes, scales, mins if has_mins else None), bias if has_bias else None, res, y, m)

    @T.prim_func
    def quantized(var_x: T.handle, codes: T.Buffer(codes_shape, codes_dtype),
                  scales: T.Buffer((n, k // group), scale_dtype), mins: T.Buffer((n, k // group), scale_dtype),
                  bias: T.Buffer((n,), "float32"), var_res: T.handle, var_y: T.handle):
        T.func_attr({"tirx.noalias": True})
        batch, seq = T.int64(), T.int64()
        x3 = T.match_buffer(var_x, (batch, seq, k), "float32")
        y3 = T.match_buffer(var_y, (batch, seq, n), "float32")
        if has_residual:
            res3 = T.match_buffer(var_res, (batch, seq, n), "float32")
            body(x3.view(batch * seq, k), codes, scales, mins, bias, res3.view(batch * seq, n),
                 y3.view(batch * seq, n), batch * seq)
        else:
            body(x3.view(batch * seq, k), codes, scales, mins, bias, None, y3.view(batch * seq, n), batch * seq)
    return opaque(without_unused_params(quantized))


@functools.lru_cache(maxsize=None)
def expert_linear(experts: int, n: int, k: int):
    """`expert_linear`: row t of x (m, k) times the (n, k) float32 weight of expert ids[t]. The GEMV loop nest of
    `linear` with the weight chosen per row, so a row reads only its expert's weight, in place: parallel over
    blocks of weight rows, each task runs every activation row through its block of its row's expert."""
    rows, lanes = matmul.ROWS_PER_TASK, matmul.LANES

    @T.prim_func
    def expert_gemv(var_x: T.handle, w: T.Buffer((experts, n, k), "float32"), var_ids: T.handle, var_y: T.handle):
        T.func_attr({"tirx.noalias": True})
        m = T.int64()
        x = T.match_buffer(var_x, (m, k), "float32")
        ids = T.match_buffer(var_ids, (m,), "int64")
        y = T.match_buffer(var_y, (m, n), "float32")
        for nb in T.parallel(n // rows):
            acc = T.alloc_buffer((rows * lanes,), "float32")
            for i in range(m):
                expert: T.let[T.int64] = T.min(T.max(ids[i], T.int64(0)), T.int64(experts - 1))
                for r in T.unroll(rows):
                    acc[T.Ramp(r * lanes, 1, lanes)] = T.Broadcast(T.float32(0), lanes)
                for kl in range(k // lanes):
                    for r in T.unroll(rows):
                        acc[T.Ramp(r * lanes, 1, lanes)] = acc[T.Ramp(r * lanes, 1, lanes)] + \
                            w[expert, nb * rows + r, T.Ramp(kl * lanes, 1, lanes)] * x[i, T.Ramp(kl * lanes, 1, lanes)]
                for r in T.unroll(rows):
                    y[i, nb * rows + r] = matmul.lane_sum(acc, r * lanes)
    return opaque(expert_gemv)
