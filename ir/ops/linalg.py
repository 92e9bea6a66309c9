"""Matrix products: NumPy-style batched `matmul`, and `linear` with PyTorch's weight layout."""

from __future__ import annotations

import numpy as np

from .. import dims as D
from ..errors import IRError
from ..types import TensorType
from . import rules
from .registry import as_dtype, define


def _matmul_infer(types, attrs):
    a, b = (rules.tensor(t, "matmul") for t in types)
    dtype = rules.same_dtype("matmul", [a, b])
    if a.rank < 2 or b.rank < 2:
        raise IRError(f"op matmul: operands need rank >= 2, got {a} and {b}")
    if not D.equal(a.shape[-1], b.shape[-2]):
        raise IRError(f"op matmul: inner dims differ: {a} @ {b}")
    batch = rules.broadcast_shapes("matmul", a.shape[:-2], b.shape[:-2])
    return TensorType(batch + (a.shape[-2], b.shape[-1]), dtype)


def _wide(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) if x.dtype.name in ("float16", "bfloat16") else x


define("matmul", ("a", "b"), _matmul_infer,
       lambda values, attrs, out_shape: as_dtype(np.matmul(_wide(values[0]), _wide(values[1])), values[0].dtype.name),
       "Batched matrix product a @ b with broadcast batch axes.")


# Weights stored narrower than the float32 activations they multiply (the checkpoint's 16 bits, kept).
WEIGHT_ONLY_DTYPES = ("float16", "bfloat16")


def _linear_infer(types, attrs):
    x = rules.tensor(types[0], "linear")
    w = rules.tensor(types[1], "linear", "weight")
    if w.rank != 2 or x.rank < 1 or not D.equal(x.shape[-1], w.shape[1]):
        raise IRError(f"op linear: input {x} does not fit weight {w} (out_features, in_features)")
    if w.dtype != x.dtype and not (x.dtype == "float32" and w.dtype in WEIGHT_ONLY_DTYPES):
        raise IRError(f"op linear: weight {w} must have the input's dtype, or be float16 or bfloat16 for a float32 "
                      "input")
    if types[2] is not None:
        bias = rules.tensor(types[2], "linear", "bias")
        if bias.rank != 1 or not D.equal(bias.shape[0], w.shape[0]) or bias.dtype != x.dtype:
            raise IRError(f"op linear: bias {bias} does not fit weight {w}")
    out = x.with_shape(x.shape[:-1] + (w.shape[0],))
    if types[3] is not None and not rules.tensor(types[3], "linear", "residual").same_as(out):
        raise IRError(f"op linear: residual {types[3]} must have the output's type {out}")
    return out


def _linear_reference(values, attrs, out_shape):
    x, w, bias, residual = values
    y = _wide(x) @ _wide(w).T
    if bias is not None:
        y = y + _wide(bias)
    if residual is not None:
        y = y + _wide(residual)
    return as_dtype(y, x.dtype.name)


define("linear", ("x", "weight", "bias?", "residual?"), _linear_infer, _linear_reference,
       "x @ weight.T + bias + residual, weight stored (out_features, in_features) as in PyTorch; the residual "
       "(a tensor of the output's shape) lets a following add run in the same pass. A float32 input may take a "
       "float16 or bfloat16 weight (computed as its exact float32 value).")


def _expert_linear_infer(types, attrs):
    x = rules.tensor(types[0], "expert_linear")
    w = rules.tensor(types[1], "expert_linear", "weight")
    experts = rules.indices(types[2], "expert_linear", "experts")
    if x.rank != 2 or w.rank != 3 or not D.equal(x.shape[1], w.shape[2]) or w.dtype != x.dtype:
        raise IRError(f"op expert_linear: input {x} does not fit the experts' weight {w} (experts, out, in)")
    if experts.rank != 1 or not D.equal(experts.shape[0], x.shape[0]):
        raise IRError(f"op expert_linear: experts {experts} must hold one integer per row of {x}")
    return x.with_shape((x.shape[0], w.shape[1]))


define("expert_linear", ("x", "weight", "experts"), _expert_linear_infer,
       lambda values, attrs, out_shape: as_dtype(np.einsum("tk,tnk->tn", _wide(values[0]),
                                                           _wide(values[1])[values[2]]), values[0].dtype.name),
       "Row t of x times the weight of expert experts[t], transposed: y[t] = weight[experts[t]] @ x[t]. A "
       "mixture-of-experts layer's product, reading only the chosen experts' weights.")
