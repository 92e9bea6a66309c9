"""ONNX converters for data movement, shapes and creation: Shape, Gather, Concat, Reshape, Slice, ...

These are the ops exporters build shape arithmetic from, so each one computes its result
at import time when its inputs are known (symbolic dims included) and emits IR only for
tensors that exist at run time. Shape-typed inputs (a Reshape's target, a Slice's bounds)
must be known; a shape computed from tensor data is reported as unsupported.
"""

from __future__ import annotations

import numpy as np

from llmc.ir import dims as D
from llmc.ir.ops.rules import broadcast_shapes
from llmc.ir.ops.shape import END

from .onnx_context import FOLD_LIMIT, OnnxContext, Value, converts
from .onnx_values import Known, dims_of, is_integer, known, onnx_dtype


def positive_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


@converts("Identity", "Dropout")
def _identity(cx: OnnxContext, inputs, attrs):
    return inputs[0]


@converts("Constant")
def _constant(cx, inputs, attrs):
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in attrs:
            value = attrs[key]
            if isinstance(value, np.ndarray):
                return cx.known(value, value.dtype.name)
            return cx.known(value, "float32" if "float" in key else "int64")
    raise cx.unsupported("a Constant that is not a numeric tensor")


@converts("Shape")
def _shape(cx, inputs, attrs):
    shape = list(cx.shape(inputs[0]))
    rank = len(shape)
    start = max(0, min(rank, positive_axis(attrs.get("start", 0), rank)))
    end = max(0, min(rank, positive_axis(attrs.get("end", rank), rank)))
    return cx.known(shape[start:end], "int64")


@converts("Size")
def _size(cx, inputs, attrs):
    return cx.known(D.product(cx.shape(inputs[0])), "int64")


@converts("ConstantOfShape")
def _constant_of_shape(cx, inputs, attrs):
    shape = dims_of(cx.require_known(inputs[0], "the shape"), "ConstantOfShape's shape")
    value = attrs.get("value", np.zeros(1, dtype=np.float32))
    dtype = value.dtype.name
    if all(isinstance(d, int) for d in shape) and int(np.prod(shape)) <= FOLD_LIMIT:
        return cx.known(np.full(shape, value.reshape(-1)[0]), dtype)
    return cx.op("full", [], {"shape": shape, "value": value.reshape(-1)[0].item(), "dtype": dtype})


@converts("Range")
def _range(cx, inputs, attrs):
    start, limit, delta = (cx.require_known(v, "a Range bound") for v in inputs)
    dtype = start.dtype
    values = [D.normalize(v.array.reshape(()).item()) if v.symbolic else v.array.reshape(()).item()
              for v in (start, limit, delta)]
    if all(isinstance(v, (int, float)) for v in values):
        return cx.known(np.arange(*values, dtype=np.dtype(dtype)), dtype)
    if not is_integer(dtype) or not isinstance(values[2], int) or values[2] < 1:
        raise cx.unsupported("a Range with symbolic bounds that is not over integers with a positive step")
    return cx.op("arange", [], {"start": values[0], "end": values[1], "step": values[2], "dtype": dtype})


@converts("Cast")
def _cast(cx, inputs, attrs):
    return cx.cast(inputs[0], onnx_dtype(attrs["to"]))


@converts("CastLike")
def _cast_like(cx, inputs, attrs):
    return cx.cast(inputs[0], cx.dtype(inputs[1]))


@converts("Reshape")
def _reshape(cx, inputs, attrs):
    x = inputs[0]
    target = dims_of(cx.require_known(inputs[1], "the target shape"), "Reshape's shape")
    source = cx.shape(x)
    if not attrs.get("allowzero", 0):
        target = [source[i] if isinstance(d, int) and d == 0 else d for i, d in enumerate(target)]
    if -1 in target:
        rest = D.product(d for d in target if not (isinstance(d, int) and d == -1))
        try:
            target[target.index(-1)] = D.divide_exact(D.product(source), rest)
        except ValueError:
            raise cx.unsupported(f"reshaping {list(source)} to {target}") from None
    return cx.reshape(x, target)


def axes_argument(cx: OnnxContext, inputs: list, attrs: dict, index: int) -> list[int] | None:
    """Axes given as input `index` (newer opsets) or as the `axes` attribute (older ones)."""
    if len(inputs) > index and inputs[index] is not None:
        return [int(a) for a in dims_of(cx.require_known(inputs[index], "the axes"), "axes")]
    return list(attrs["axes"]) if "axes" in attrs else None


@converts("Unsqueeze")
def _unsqueeze(cx, inputs, attrs):
    shape = list(cx.shape(inputs[0]))
    rank = len(shape) + len(axes_argument(cx, inputs, attrs, 1))
    for axis in sorted(positive_axis(a, rank) for a in axes_argument(cx, inputs, attrs, 1)):
        shape.insert(axis, 1)
    return cx.reshape(inputs[0], shape)


@converts("Squeeze")
def _squeeze(cx, inputs, attrs):
    shape = list(cx.shape(inputs[0]))
    axes = axes_argument(cx, inputs, attrs, 1)
    drop = ({positive_axis(a, len(shape)) for a in axes} if axes is not None
            else {i for i, d in enumerate(shape) if isinstance(d, int) and d == 1})
    return cx.reshape(inputs[0], [d for i, d in enumerate(shape) if i not in drop])


@converts("Flatten")
def _flatten(cx, inputs, attrs):
    shape = cx.shape(inputs[0])
    axis = positive_axis(attrs.get("axis", 1), len(shape))
    return cx.reshape(inputs[0], [D.product(shape[:axis]), D.product(shape[axis:])])


@converts("Transpose")
def _transpose(cx, inputs, attrs):
    x = inputs[0]
    rank = len(cx.shape(x))
    perm = list(attrs.get("perm", range(rank)[::-1]))
    if perm == list(range(rank)):
        return x
    if isinstance(x, Known):
        return known(np.transpose(x.array, perm), x.dtype, x.name)
    return cx.op("permute", [x], {"axes": perm})


@converts("Expand")
def _expand(cx, inputs, attrs):
    x = inputs[0]
    target = dims_of(cx.require_known(inputs[1], "the target shape"), "Expand's shape")
    return cx.broadcast(x, broadcast_shapes("Expand", cx.shape(x), target))


@converts("Concat")
def _concat(cx, inputs, attrs):
    rank = len(cx.shape(inputs[0]))
    axis = positive_axis(attrs["axis"], rank)
    parts = [v for v in inputs if not (isinstance(cx.shape(v)[axis], int) and cx.shape(v)[axis] == 0)] or inputs[:1]
    if all(isinstance(v, Known) for v in parts):
        symbolic = any(v.symbolic for v in parts)
        arrays = [v.array.astype(object) if symbolic else v.array for v in parts]
        return cx.known(np.concatenate(arrays, axis=axis), parts[0].dtype)
    return parts[0] if len(parts) == 1 else cx.op("concat", parts, {"axis": axis})


@converts("Split")
def _split(cx, inputs, attrs):
    x = inputs[0]
    shape = cx.shape(x)
    axis = positive_axis(attrs.get("axis", 0), len(shape))
    if len(inputs) > 1 and inputs[1] is not None:
        sizes = dims_of(cx.require_known(inputs[1], "the split sizes"), "Split's sizes")
    else:
        count = attrs.get("num_outputs", len(cx.output_names))
        if not isinstance(shape[axis], int):
            raise cx.unsupported("splitting a symbolic axis into equal parts")
        step = -(-shape[axis] // count)
        sizes = [min(step, shape[axis] - i * step) for i in range(count)]
    parts, start = [], 0
    for size in sizes:
        parts.append(_slice_axis(cx, x, axis, start, D.normalize(start + size), 1))
        start = D.normalize(start + size)
    return parts


def _slice_axis(cx: OnnxContext, x: Value, axis: int, start: D.Dim, end: D.Dim, step: int) -> Value:
    if isinstance(x, Known):
        if not all(isinstance(b, int) for b in (start, end)):
            raise cx.unsupported("slicing a known value at symbolic bounds")
        index = [slice(None)] * x.array.ndim
        index[axis] = slice(start, end, step)
        return known(x.array[tuple(index)], x.dtype, x.name)
    return cx.op("slice", [x], {"axis": axis, "start": start, "end": end, "step": step})


def _bound(value: D.Dim, dim: D.Dim) -> D.Dim:
    """ONNX clamps out-of-range bounds; the IR reads anything past 2**62 as 'to the end'."""
    if not isinstance(value, int):
        return value
    if value >= END:
        return END
    if value <= -END:
        return 0
    if isinstance(dim, int):
        return max(-dim, min(value, dim))
    return value


@converts("Slice")
def _slice(cx, inputs, attrs):
    x = inputs[0]
    shape = cx.shape(x)
    starts = dims_of(cx.require_known(inputs[1], "the slice starts"), "Slice's starts")
    ends = dims_of(cx.require_known(inputs[2], "the slice ends"), "Slice's ends")
    axes = (dims_of(cx.require_known(inputs[3], "the slice axes"), "Slice's axes")
            if len(inputs) > 3 and inputs[3] is not None else list(range(len(starts))))
    steps = (dims_of(cx.require_known(inputs[4], "the slice steps"), "Slice's steps")
             if len(inputs) > 4 and inputs[4] is not None else [1] * len(starts))
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = positive_axis(int(axis), len(shape))
        if not isinstance(step, int) or step < 1:
            raise cx.unsupported(f"a Slice with step {step} (only positive steps)")
        start, end = _bound(start, shape[axis]), _bound(end, shape[axis])
        x = _slice_axis(cx, x, axis, start, end, step)
    return x


@converts("Gather")
def _gather(cx, inputs, attrs):
    data, indices = inputs
    shape = cx.shape(data)
    axis = positive_axis(attrs.get("axis", 0), len(shape))
    if isinstance(data, Known) and isinstance(indices, Known):
        taken = np.take(data.array, indices.array.astype(np.int64), axis=axis)
        return cx.known(taken, data.dtype)
    if isinstance(indices, Known) and indices.array.ndim == 0 and not indices.symbolic:
        index = int(indices.array)
        end = index + 1 if index != -1 else END
        picked = _slice_axis(cx, data, axis, index, end, 1)
        return cx.reshape(picked, [d for i, d in enumerate(cx.shape(picked)) if i != axis])
    if isinstance(indices, Known) and isinstance(shape[axis], int):
        indices = known(np.where(indices.array < 0, indices.array + shape[axis], indices.array), indices.dtype,
                        indices.name)
    return cx.op("take", [data, indices], {"axis": axis})


@converts("GatherND")
def _gather_nd(cx, inputs, attrs):
    data, indices = inputs
    if attrs.get("batch_dims", 0):
        raise cx.unsupported("GatherND with batch_dims")
    index_shape = cx.shape(indices)
    depth = index_shape[-1]
    if not isinstance(depth, int):
        raise cx.unsupported("GatherND with a symbolic index depth")
    if isinstance(data, Known) and isinstance(indices, Known) and not indices.symbolic:
        columns = tuple(np.moveaxis(indices.array, -1, 0))
        return cx.known(data.array[columns], data.dtype)
    columns = [cx.reshape(_slice_axis(cx, indices, len(index_shape) - 1, j, j + 1, 1), index_shape[:-1])
               for j in range(depth)]
    return cx.op("index", [data, *columns])


@converts("Trilu")
def _trilu(cx, inputs, attrs):
    x = inputs[0]
    diagonal = int(cx.require_known(inputs[1], "the diagonal").array) if len(inputs) > 1 and inputs[1] else 0
    rows, cols = cx.shape(x)[-2:]
    row = cx.reshape(cx.op("arange", [], {"end": rows, "dtype": "int64"}), [rows, 1])
    col = cx.reshape(cx.op("arange", [], {"end": cols, "dtype": "int64"}), [1, cols])
    offset = cx.binary("subtract", col, row)
    keep = cx.binary("greater_equal" if attrs.get("upper", 1) else "less_equal", offset,
                     cx.scalar(diagonal, "int64"))
    return cx.op("where", [keep, x, cx.scalar(0, cx.dtype(x))])
