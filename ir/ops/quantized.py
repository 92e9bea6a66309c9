"""Ops on grouped quantized weights (ir/quant_formats.py: 4- or 8-bit codes, groups of 32 or 16
inputs, fp16 or fp32 scales, minimums or not): a matmul and an embedding lookup.

Their meaning is exact: the weights are dequantized and the result is what the float
op would give on them. Kernels may approximate inside that (the CPU decode kernel
quantizes activations to int8 per group, as llama.cpp does); tests state the tolerance.
"""

from __future__ import annotations

import numpy as np

from .. import dims as D
from ..errors import IRError
from ..quant_formats import GROUP, GROUP_SIZES, SCALE_DTYPES, code_dtype, dequantize, input_count
from ..types import TensorType
from . import rules
from .registry import REQUIRED, as_dtype, define


def _weight_shape(types, op: str, bits: int) -> tuple[int, int]:
    codes, scales = rules.tensor(types[0], op, "codes"), rules.tensor(types[1], op, "scales")
    if bits not in (4, 8):
        raise IRError(f"op {op}: bits must be 4 or 8, got {bits}")
    if codes.dtype != code_dtype(bits) or scales.dtype not in SCALE_DTYPES or codes.rank != 2 or scales.rank != 2:
        raise IRError(f"op {op}: codes {codes} / scales {scales} are not a {bits}-bit grouped weight")
    rows, groups = scales.shape
    cols = input_count(codes.shape, bits)
    if codes.shape[0] != rows or cols % groups or cols // groups not in GROUP_SIZES or cols % GROUP:
        raise IRError(f"op {op}: codes {codes} do not fit scales {scales} (groups of {', '.join(map(str, GROUP_SIZES))} "
                      f"inputs, codes in blocks of {GROUP})")
    mins = types[2]
    if mins is not None and not rules.tensor(mins, op, "mins").same_as(scales):
        raise IRError(f"op {op}: minimums {mins} must have the scales' type {scales}")
    return rows, cols


def _quantized_linear_infer(types, attrs):
    rows, cols = _weight_shape(types[1:4], "quantized_linear", attrs["bits"])
    x = rules.tensor(types[0], "quantized_linear")
    if x.dtype != "float32" or not D.equal(x.shape[-1], cols):
        raise IRError(f"op quantized_linear: input {x} does not fit a ({rows}, {cols}) weight")
    out = x.with_shape(x.shape[:-1] + (rows,))
    if types[4] is not None and not rules.tensor(types[4], "quantized_linear", "bias").same_as(
            TensorType((rows,), "float32")):
        raise IRError(f"op quantized_linear: bias {types[4]} does not fit {rows} outputs")
    if types[5] is not None and not rules.tensor(types[5], "quantized_linear", "residual").same_as(out):
        raise IRError(f"op quantized_linear: residual {types[5]} must have the output's type {out}")
    return out


def _quantized_linear_reference(values, attrs, out_shape):
    x, codes, scales, mins, bias, residual = values
    y = x @ dequantize(codes, scales, mins, attrs["bits"]).T
    if bias is not None:
        y = y + bias
    if residual is not None:
        y = y + residual
    return as_dtype(y, "float32")


define("quantized_linear", ("x", "codes", "scales", "mins?", "bias?", "residual?"), _quantized_linear_infer,
       _quantized_linear_reference,
       "linear with a grouped quantized weight: x @ dequantize(codes, scales, mins).T + bias + residual.",
       attrs={"bits": REQUIRED})


def _quantized_take_infer(types, attrs):
    rows, cols = _weight_shape(types[:3], "quantized_take", attrs["bits"])
    indices = rules.tensor(types[3], "quantized_take", "indices")
    if indices.dtype not in ("int64", "int32"):
        raise IRError(f"op quantized_take: indices must be integers, got {indices.dtype}")
    return TensorType(indices.shape + (cols,), "float32")


define("quantized_take", ("codes", "scales", "mins?", "indices"), _quantized_take_infer,
       lambda values, attrs, out_shape: np.take(dequantize(values[0], values[1], values[2], attrs["bits"]),
                                                values[3], axis=0),
       "Rows of a grouped quantized weight (an embedding lookup), dequantized.", attrs={"bits": REQUIRED})
