"""Reductions over axes (sum, mean, max, min, any), softmax and cumulative sum."""

from __future__ import annotations

import numpy as np

from ..errors import IRError
from . import rules
from .registry import REQUIRED, as_dtype, define

REDUCTIONS = {
    "sum": (np.sum, "Sum"),
    "mean": (np.mean, "Mean"),
    "max": (np.max, "Maximum"),
    "min": (np.min, "Minimum"),
    "any": (np.any, "Logical or"),
}


def _reduce_infer(name):
    def infer(types, attrs):
        x = rules.tensor(types[0], name)
        if name == "any" and x.dtype != "bool":
            raise IRError(f"op any: input must be bool, got {x.dtype}")
        axes = rules.axes(name, attrs["axes"], x.rank)
        if attrs["keepdims"]:
            shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape))
        else:
            shape = tuple(d for i, d in enumerate(x.shape) if i not in axes)
        return x.with_shape(shape)
    return infer


def _reduce_reference(fn):
    def reference(values, attrs, out_shape):
        x = values[0]
        axes = None if attrs["axes"] is None else tuple(a % x.ndim for a in attrs["axes"])
        if x.dtype.name in ("float16", "bfloat16"):
            return as_dtype(fn(x.astype(np.float32), axis=axes, keepdims=attrs["keepdims"]), x.dtype.name)
        return np.asarray(fn(x, axis=axes, keepdims=attrs["keepdims"])).astype(x.dtype)
    return reference


for _name, (_fn, _doc) in REDUCTIONS.items():
    define(_name, ("x",), _reduce_infer(_name), _reduce_reference(_fn),
           f"{_doc} over `axes` (all when None), keeping them as size 1 when `keepdims`.",
           attrs={"axes": None, "keepdims": False})


def _float_same(name):
    def infer(types, attrs):
        x = rules.tensor(types[0], name)
        rules.axis(name, attrs["axis"], x.rank)
        if x.dtype not in ("float32", "float16", "bfloat16"):
            raise IRError(f"op {name}: input must be a float tensor, got {x.dtype}")
        return x
    return infer


def softmax_reference(x: np.ndarray, axis: int) -> np.ndarray:
    wide = x.astype(np.float32) if x.dtype.name in ("float16", "bfloat16") else x
    shifted = wide - np.max(wide, axis=axis, keepdims=True)
    e = np.exp(shifted)
    return as_dtype(e / np.sum(e, axis=axis, keepdims=True), x.dtype.name)


def _log_softmax_reference(values, attrs, out_shape):
    x = values[0]
    wide = x.astype(np.float32) if x.dtype.name in ("float16", "bfloat16") else x
    shifted = wide - np.max(wide, axis=attrs["axis"], keepdims=True)
    return as_dtype(shifted - np.log(np.sum(np.exp(shifted), axis=attrs["axis"], keepdims=True)), x.dtype.name)


define("softmax", ("x",), _float_same("softmax"),
       lambda values, attrs, out_shape: softmax_reference(values[0], attrs["axis"]),
       "exp(x) / sum(exp(x)) along `axis`.", attrs={"axis": REQUIRED})
define("log_softmax", ("x",), _float_same("log_softmax"), _log_softmax_reference,
       "x - log(sum(exp(x))) along `axis`.", attrs={"axis": REQUIRED})


def _cumsum_infer(types, attrs):
    x = rules.tensor(types[0], "cumsum")
    rules.axis("cumsum", attrs["axis"], x.rank)
    return x if attrs["dtype"] is None else x.with_dtype(attrs["dtype"])


define("cumsum", ("x",), _cumsum_infer,
       lambda values, attrs, out_shape: as_dtype(np.cumsum(values[0], axis=attrs["axis"]),
                                                 attrs["dtype"] or values[0].dtype.name),
       "Running sum along `axis`, in `dtype` (the input's when None).", attrs={"axis": REQUIRED, "dtype": None})


def _topk_infer(types, attrs):
    x = rules.tensor(types[0], "topk")
    axis = rules.axis("topk", attrs["axis"], x.rank)
    k = attrs["k"]
    size = x.shape[axis]
    if not isinstance(k, int) or k < 1 or (isinstance(size, int) and k > size):
        raise IRError(f"op topk: k must be an integer from 1 to the axis' size {size}, got {k!r}")
    if attrs["output"] not in ("values", "indices"):
        raise IRError(f"op topk: output must be 'values' or 'indices', got {attrs['output']!r}")
    shape = tuple(k if i == axis else d for i, d in enumerate(x.shape))
    return x.with_shape(shape) if attrs["output"] == "values" else x.with_shape(shape).with_dtype("int64")


def _topk_reference(values, attrs, out_shape):
    x, axis, k = values[0], attrs["axis"], attrs["k"]
    order = np.argsort(-x.astype(np.float64), axis=axis, kind="stable")  # the largest first, ties by position
    chosen = np.take(order, np.arange(k), axis=axis)
    if attrs["output"] == "indices":
        return chosen.astype(np.int64)
    return np.take_along_axis(x, chosen, axis=axis)


define("topk", ("x",), _topk_infer, _topk_reference,
       "The `k` largest values along `axis`, largest first (equal values in order of position), or, with "
       "output='indices', their positions as int64. Mixture-of-experts routers choose their experts with it.",
       attrs={"k": REQUIRED, "axis": -1, "output": "values"})
