"""Elementwise ops: broadcasting binary arithmetic and comparisons, unary math, casts, where.

Binary ops take operands of one dtype (importers insert the casts that PyTorch's or
ONNX's type promotion implies), so each op's result dtype is plain to read.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import IRError
from ..types import TensorType
from . import rules
from .registry import REQUIRED, as_dtype, define


def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[np.float64])(x)


ARITHMETIC = {
    "add": (np.add, "x + y"),
    "subtract": (np.subtract, "x - y"),
    "multiply": (np.multiply, "x * y"),
    "divide": (np.true_divide, "x / y (floats only)"),
    "power": (np.power, "x ** y"),
    "maximum": (np.maximum, "elementwise max(x, y)"),
    "minimum": (np.minimum, "elementwise min(x, y)"),
    "floor_divide": (np.floor_divide, "floor(x / y)"),
    "remainder": (np.remainder, "x mod y, with the sign of y"),
}

COMPARISON = {
    "equal": (np.equal, "x == y"),
    "not_equal": (np.not_equal, "x != y"),
    "less": (np.less, "x < y"),
    "less_equal": (np.less_equal, "x <= y"),
    "greater": (np.greater, "x > y"),
    "greater_equal": (np.greater_equal, "x >= y"),
}

LOGICAL = {
    "logical_and": (np.logical_and, "x and y (bool)"),
    "logical_or": (np.logical_or, "x or y (bool)"),
}

UNARY = {
    "negative": (np.negative, "-x"),
    "exp": (np.exp, "e ** x"),
    "log": (np.log, "natural logarithm"),
    "sqrt": (np.sqrt, "square root"),
    "rsqrt": (lambda x: 1.0 / np.sqrt(x), "1 / sqrt(x)"),
    "sin": (np.sin, "sine"),
    "cos": (np.cos, "cosine"),
    "tanh": (np.tanh, "hyperbolic tangent"),
    "abs": (np.abs, "absolute value"),
    "floor": (np.floor, "the largest integer not above x"),
    "erf": (_erf, "error function"),
    "sigmoid": (lambda x: 1.0 / (1.0 + np.exp(-x)), "1 / (1 + e ** -x)"),
    "silu": (lambda x: x / (1.0 + np.exp(-x)), "x * sigmoid(x)"),
    "gelu": (lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))), "x * Phi(x), exact (erf) form"),
    "gelu_tanh": (lambda x: 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3))),
                  "x * Phi(x), tanh approximation"),
}


def _binary_infer(name: str, result_dtype: str | None):
    def infer(types, attrs):
        x, y = (rules.tensor(t, name) for t in types)
        dtype = rules.same_dtype(name, [x, y])
        if name == "divide" and dtype not in ("float32", "float16", "bfloat16"):
            raise IRError("op divide: operands must be floats (cast integers first)")
        if result_dtype == "bool" and name.startswith("logical") and dtype != "bool":
            raise IRError(f"op {name}: operands must be bool, got {dtype}")
        return TensorType(rules.broadcast_shapes(name, x.shape, y.shape), result_dtype or dtype)
    return infer


def _binary_reference(fn, result_dtype: str | None):
    def reference(values, attrs, out_shape):
        x, y = values
        return as_dtype(fn(x, y), result_dtype or _dtype_name(x))
    return reference


def _dtype_name(x: np.ndarray) -> str:
    name = np.asarray(x).dtype.name
    return "bfloat16" if name == "bfloat16" else name


def _unary_infer(name: str):
    def infer(types, attrs):
        x = rules.tensor(types[0], name)
        if name not in ("negative", "abs") and x.dtype not in ("float32", "float16", "bfloat16"):
            raise IRError(f"op {name}: input must be a float tensor, got {x.dtype}")
        return x
    return infer


def _unary_reference(fn):
    def reference(values, attrs, out_shape):
        x = values[0]
        if x.dtype.name in ("float16", "bfloat16"):
            return as_dtype(fn(x.astype(np.float32)), _dtype_name(x))
        return as_dtype(fn(x), _dtype_name(x))
    return reference


for _name, (_fn, _doc) in ARITHMETIC.items():
    define(_name, ("x", "y"), _binary_infer(_name, None), _binary_reference(_fn, None),
           f"Broadcasting {_doc}; both operands share a dtype.")
for _name, (_fn, _doc) in COMPARISON.items():
    define(_name, ("x", "y"), _binary_infer(_name, "bool"), _binary_reference(_fn, "bool"),
           f"Broadcasting comparison {_doc}; the result is bool.")
for _name, (_fn, _doc) in LOGICAL.items():
    define(_name, ("x", "y"), _binary_infer(_name, "bool"), _binary_reference(_fn, "bool"),
           f"Broadcasting {_doc}.")
for _name, (_fn, _doc) in UNARY.items():
    define(_name, ("x",), _unary_infer(_name), _unary_reference(_fn), f"Elementwise {_doc}.")


def _logical_not_infer(types, attrs):
    x = rules.tensor(types[0], "logical_not")
    if x.dtype != "bool":
        raise IRError(f"op logical_not: input must be bool, got {x.dtype}")
    return x


define("logical_not", ("x",), _logical_not_infer, lambda v, a, s: np.logical_not(v[0]), "Elementwise not (bool).")

define("cast", ("x",),
       lambda types, attrs: rules.tensor(types[0], "cast").with_dtype(attrs["dtype"]),
       lambda values, attrs, out_shape: as_dtype(values[0], attrs["dtype"]),
       "Convert to another dtype (floats to ints truncate toward zero).",
       attrs={"dtype": REQUIRED})


def _where_infer(types, attrs):
    cond, x, y = (rules.tensor(t, "where") for t in types)
    if cond.dtype != "bool":
        raise IRError(f"op where: condition must be bool, got {cond.dtype}")
    dtype = rules.same_dtype("where", [x, y])
    return TensorType(rules.broadcast_shapes("where", cond.shape, x.shape, y.shape), dtype)


define("where", ("condition", "x", "y"), _where_infer,
       lambda values, attrs, out_shape: np.where(values[0], values[1], values[2]).astype(values[1].dtype),
       "Broadcasting select: x where condition holds, else y.")
