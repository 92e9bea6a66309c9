"""Data-movement and creation ops: reshape, permute, broadcast, concat, slice, gathers,
arange, full and small constants.

Shape attributes may hold symbolic dims (`reshape` to `[1, seq, 9, 64]`); the
interpreter evaluates them before calling a reference implementation.
"""

from __future__ import annotations

import numpy as np

from .. import dims as D
from ..errors import IRError
from ..types import TensorType, numpy_dtype
from . import rules
from .registry import REQUIRED, as_dtype, define

# Slice bounds at or beyond this are "to the end" (PyTorch exports INT64_MAX there).
END = 2 ** 62


def _reshape_infer(types, attrs):
    x = rules.tensor(types[0], "reshape")
    shape = list(attrs["shape"])
    if sum(1 for d in shape if isinstance(d, int) and d == -1) > 1:
        raise IRError("op reshape: at most one -1 in the target shape")
    total = D.product(x.shape)
    if -1 in shape:
        known = D.product(d for d in shape if not (isinstance(d, int) and d == -1))
        try:
            shape[shape.index(-1)] = D.divide_exact(total, known)
        except ValueError:
            raise IRError(f"op reshape: cannot reshape {x} to {attrs['shape']}") from None
    if not D.equal(D.product(shape), total):
        raise IRError(f"op reshape: cannot reshape {x} ({total} elements) to {shape}")
    return x.with_shape(tuple(shape))


define("reshape", ("x",), _reshape_infer,
       lambda values, attrs, out_shape: values[0].reshape(out_shape),
       "Same elements, new shape (row-major); one dim may be -1.", attrs={"shape": REQUIRED})


def _permute_infer(types, attrs):
    x = rules.tensor(types[0], "permute")
    axes = [rules.axis("permute", a, x.rank) for a in attrs["axes"]]
    if sorted(axes) != list(range(x.rank)):
        raise IRError(f"op permute: {attrs['axes']} is not a permutation of {x.rank} axes")
    return x.with_shape(tuple(x.shape[a] for a in axes))


define("permute", ("x",), _permute_infer,
       lambda values, attrs, out_shape: np.ascontiguousarray(np.transpose(values[0], attrs["axes"])),
       "Reorder axes: output axis i is input axis axes[i].", attrs={"axes": REQUIRED})


def _broadcast_to_infer(types, attrs):
    x = rules.tensor(types[0], "broadcast_to")
    target = tuple(attrs["shape"])
    if len(target) < x.rank or not D.equal(D.product(rules.broadcast_shapes("broadcast_to", x.shape, target)),
                                          D.product(target)):
        raise IRError(f"op broadcast_to: cannot broadcast {x} to {list(target)}")
    return x.with_shape(target)


define("broadcast_to", ("x",), _broadcast_to_infer,
       lambda values, attrs, out_shape: np.broadcast_to(values[0], out_shape).copy(),
       "Repeat size-1 (or missing leading) axes to reach `shape`.", attrs={"shape": REQUIRED})


def _concat_infer(types, attrs):
    xs = [rules.tensor(t, "concat") for t in types]
    dtype = rules.same_dtype("concat", xs)
    rank = xs[0].rank
    axis = rules.axis("concat", attrs["axis"], rank)
    for t in xs[1:]:
        if t.rank != rank or any(not D.equal(a, b) for i, (a, b) in enumerate(zip(t.shape, xs[0].shape))
                                 if i != axis):
            raise IRError(f"op concat: shapes {', '.join(str(x) for x in xs)} differ off axis {axis}")
    shape = list(xs[0].shape)
    shape[axis] = D.normalize(sum((t.shape[axis] for t in xs), 0))
    return TensorType(tuple(shape), dtype)


define("concat", ("*xs",), _concat_infer,
       lambda values, attrs, out_shape: np.concatenate(values, axis=attrs["axis"]),
       "Join tensors along `axis`.", attrs={"axis": REQUIRED})


def slice_bounds(start, end, step, dim):
    """Normalise PyTorch-style bounds (negative, beyond the end) against `dim`."""
    if isinstance(start, int) and start < 0:
        start = D.normalize(dim + start)
    if isinstance(end, int) and end >= END:
        end = dim
    elif isinstance(end, int) and end < 0:
        end = D.normalize(dim + end)
    if D.is_static(dim) and isinstance(end, int):
        end = min(end, dim)
    if D.is_static(dim) and isinstance(start, int):
        start = min(start, dim)
    return start, end, step


def _slice_infer(types, attrs):
    x = rules.tensor(types[0], "slice")
    axis = rules.axis("slice", attrs["axis"], x.rank)
    start, end, step = slice_bounds(attrs["start"], attrs["end"], attrs["step"], x.shape[axis])
    if not isinstance(step, int) or step < 1:
        raise IRError(f"op slice: step must be a positive int, got {step}")
    length = D.normalize((end - start + step - 1) // step) if step > 1 else D.normalize(end - start)
    if isinstance(length, int):
        length = max(length, 0)
    shape = list(x.shape)
    shape[axis] = length
    return x.with_shape(tuple(shape))


def _slice_reference(values, attrs, out_shape):
    x = values[0]
    axis = attrs["axis"] % x.ndim
    start, end, step = slice_bounds(attrs["start"], attrs["end"], attrs["step"], x.shape[axis])
    index = [slice(None)] * x.ndim
    index[axis] = slice(start, end, step)
    return np.ascontiguousarray(x[tuple(index)])


define("slice", ("x",), _slice_infer, _slice_reference,
       "Elements start, start+step, ... < end along `axis` (end at or past 2**62 means the whole axis).",
       attrs={"axis": REQUIRED, "start": 0, "end": END, "step": 1})


def _take_infer(types, attrs):
    x = rules.tensor(types[0], "take")
    indices = rules.indices(types[1], "take")
    axis = rules.axis("take", attrs["axis"], x.rank)
    return x.with_shape(x.shape[:axis] + indices.shape + x.shape[axis + 1:])


define("take", ("x", "indices"), _take_infer,
       lambda values, attrs, out_shape: np.take(values[0], values[1], axis=attrs["axis"]),
       "Gather slices of x along `axis` at `indices` (embedding lookup is take on axis 0).",
       attrs={"axis": 0})


def _gather_infer(types, attrs):
    x = rules.tensor(types[0], "gather")
    indices = rules.indices(types[1], "gather")
    axis = rules.axis("gather", attrs["axis"], x.rank)
    if indices.rank != x.rank or any(D.normalize(a) != D.normalize(b) for i, (a, b) in
                                     enumerate(zip(x.shape, indices.shape)) if i != axis):
        raise IRError(f"op gather: indices {list(indices.shape)} must have x's shape {list(x.shape)} except along "
                      f"axis {axis}")
    return x.with_shape(indices.shape)


define("gather", ("x", "indices"), _gather_infer,
       lambda values, attrs, out_shape: np.take_along_axis(values[0], values[1], axis=attrs["axis"]),
       "out[..., i, ...] = x[..., indices[..., i, ...], ...] along `axis` (torch.gather, NumPy take_along_axis).",
       attrs={"axis": REQUIRED})


def _index_infer(types, attrs):
    x = rules.tensor(types[0], "index")
    indices = [rules.indices(t, "index", "index tensors") for t in types[1:]]
    if not indices or len(indices) > x.rank:
        raise IRError(f"op index: needs 1 to {x.rank} index tensors, got {len(indices)}")
    batch = rules.broadcast_shapes("index", *(t.shape for t in indices))
    return x.with_shape(batch + x.shape[len(indices):])


define("index", ("x", "*indices"), _index_infer,
       lambda values, attrs, out_shape: values[0][tuple(values[1:])],
       "NumPy advanced indexing of x's leading axes by broadcast integer tensors.")


def _arange_length(start, end, step):
    if step == 1:
        return D.normalize(end - start)
    return D.normalize((end - start + step - 1) // step)


define("arange", (),
       lambda types, attrs: TensorType((_arange_length(attrs["start"], attrs["end"], attrs["step"]),), attrs["dtype"]),
       lambda values, attrs, out_shape: np.arange(attrs["start"], attrs["end"], attrs["step"],
                                                  dtype=numpy_dtype(attrs["dtype"])),
       "start, start+step, ... < end; bounds may be symbolic.",
       attrs={"start": 0, "end": REQUIRED, "step": 1, "dtype": "int64"})

define("full", (),
       lambda types, attrs: TensorType(tuple(attrs["shape"]), attrs["dtype"]),
       lambda values, attrs, out_shape: np.full(out_shape, attrs["value"], dtype=numpy_dtype(attrs["dtype"])),
       "A tensor of `shape` filled with `value`; the shape may be symbolic.",
       attrs={"shape": REQUIRED, "value": REQUIRED, "dtype": REQUIRED})

define("constant", (),
       lambda types, attrs: TensorType(tuple(np.shape(attrs["value"])), attrs["dtype"]),
       lambda values, attrs, out_shape: as_dtype(np.array(attrs["value"]), attrs["dtype"]),
       "A small literal tensor kept in the graph (scalars, short tables). Weights are params.",
       attrs={"value": REQUIRED, "dtype": REQUIRED})
