"""Normalisation ops that fusion passes create from their spelled-out forms."""

from __future__ import annotations

import numpy as np

from .. import dims as D
from ..errors import IRError
from . import rules
from .registry import REQUIRED, as_dtype, define


def _rms_norm_infer(types, attrs):
    x = rules.tensor(types[0], "rms_norm")
    if x.dtype not in ("float32", "float16", "bfloat16"):
        raise IRError(f"op rms_norm: input must be a float tensor, got {x.dtype}")
    if types[1] is not None:
        weight = rules.tensor(types[1], "rms_norm", "weight")
        if weight.rank != 1 or not D.equal(weight.shape[0], x.shape[-1]) or weight.dtype != x.dtype:
            raise IRError(f"op rms_norm: weight {weight} does not fit the last axis of {x}")
    return x


def _rms_norm_reference(values, attrs, out_shape):
    x, weight = values
    wide = x.astype(np.float32)
    y = wide * (1.0 / np.sqrt(np.mean(wide * wide, axis=-1, keepdims=True) + np.float32(attrs["eps"])))
    if weight is not None:
        y = weight.astype(np.float32) * y
    return as_dtype(y, x.dtype.name)


define("rms_norm", ("x", "weight?"), _rms_norm_infer, _rms_norm_reference,
       "weight * x / sqrt(mean(x ** 2 over the last axis) + eps).", attrs={"eps": REQUIRED})
