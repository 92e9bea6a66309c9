"""The ATen op table: one converter per PyTorch op that LLM exports use.

A converter receives an `Emitter` (which builds IR nodes and knows PyTorch's dtype
rules), the op's arguments with FX nodes already replaced by IR nodes (tensors) or
dims (SymInts), and the FX node's fake result `val` for the dtype and shape PyTorch
computed. It returns an IR node, or a list of them for ops with several outputs.
Ops that only check or annotate (`_assert_tensor_metadata`) return None.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from llmc.ir import Node
from llmc.ir import dims as D

from .emitter import Emitter, torch_dtype

Converter = Callable[[Emitter, tuple, dict, Any], Any]

TABLE: dict[str, Converter] = {}


def converts(*names: str):
    def register(fn: Converter) -> Converter:
        for name in names:
            TABLE[name] = fn
        return fn
    return register


def _identity(em: Emitter, args, kwargs, val):
    return args[0]


for _name in ("aten.clone.default", "aten.contiguous.default", "aten.alias.default", "aten.detach.default",
              "aten.lift_fresh_copy.default", "aten.dropout.default", "aten.feature_dropout.default",
              "aten.detach_.default"):
    TABLE[_name] = _identity


@converts("aten._assert_tensor_metadata.default", "aten._assert_scalar.default", "aten.sym_constrain_range_for_size.default")
def _check_only(em, args, kwargs, val):
    return None


@converts("aten.to.dtype", "aten.to.dtype_layout", "aten.to.device", "aten._to_copy.default", "aten.type_as.default")
def _to(em, args, kwargs, val):
    return em.cast(args[0], torch_dtype(val.dtype))


# ---- elementwise -------------------------------------------------------------------------------

_BINARY = {
    "add": "add", "sub": "subtract", "mul": "multiply", "pow": "power", "maximum": "maximum", "minimum": "minimum",
    "eq": "equal", "ne": "not_equal", "lt": "less", "le": "less_equal", "gt": "greater", "ge": "greater_equal",
    "bitwise_and": "logical_and", "__and__": "logical_and", "logical_and": "logical_and",
    "bitwise_or": "logical_or", "__or__": "logical_or", "logical_or": "logical_or",
    "remainder": "remainder", "fmod": "remainder",
}


def _binary(ir_op: str) -> Converter:
    def convert(em, args, kwargs, val):
        x, y = args[0], args[1]
        alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1)
        if alpha != 1:
            y = em.binary("multiply", y, alpha, val)
        return em.binary(ir_op, x, y, val)
    return convert


for _torch_name, _ir_name in _BINARY.items():
    for _overload in ("Tensor", "Scalar", "Tensor_Scalar", "Tensor_Tensor", "Scalar_Tensor", "default"):
        TABLE[f"aten.{_torch_name}.{_overload}"] = _binary(_ir_name)


# The elementwise overloads of min and max (with a second tensor) are minimum and maximum.
TABLE["aten.min.other"], TABLE["aten.max.other"] = _binary("minimum"), _binary("maximum")


@converts("aten.rsub.Scalar", "aten.rsub.Tensor")
def _rsub(em, args, kwargs, val):
    return em.binary("subtract", args[1], args[0], val)


@converts("aten.div.Tensor", "aten.div.Scalar", "aten.div.Tensor_mode", "aten.div.Scalar_mode")
def _div(em, args, kwargs, val):
    mode = kwargs.get("rounding_mode")
    if mode == "floor":
        return em.binary("floor_divide", args[0], args[1], val)
    if mode == "trunc":
        quotient = em.binary("divide", args[0], args[1], torch.empty((), dtype=torch.float32))
        return em.cast(quotient, torch_dtype(val.dtype))
    # True division of integers gives floats in PyTorch: divide in the result's dtype.
    dtype = torch_dtype(val.dtype)
    return em.op("divide", [em.operand(args[0], dtype), em.operand(args[1], dtype)])


@converts("aten.floor_divide.default")
def _floor_divide(em, args, kwargs, val):
    return em.binary("floor_divide", args[0], args[1], val)


# In-place arithmetic on a tensor the model made itself; the importer rebinds the mutated tensor to the result.
for _torch_name in ("add", "sub", "mul", "div"):
    for _overload in ("Tensor", "Scalar"):
        TABLE[f"aten.{_torch_name}_.{_overload}"] = TABLE[f"aten.{_torch_name}.{_overload}"]


_UNARY = {
    "neg": "negative", "exp": "exp", "log": "log", "sqrt": "sqrt", "rsqrt": "rsqrt", "sin": "sin", "cos": "cos",
    "tanh": "tanh", "abs": "abs", "erf": "erf", "floor": "floor", "sigmoid": "sigmoid", "silu": "silu",
    "logical_not": "logical_not", "bitwise_not": "logical_not",
}


def _unary(ir_op: str) -> Converter:
    def convert(em, args, kwargs, val):
        return em.op(ir_op, [em.cast(args[0], torch_dtype(val.dtype))])
    return convert


for _torch_name, _ir_name in _UNARY.items():
    TABLE[f"aten.{_torch_name}.default"] = _unary(_ir_name)


@converts("aten.square.default")
def _square(em, args, kwargs, val):
    return em.binary("multiply", args[0], args[0], val)


@converts("aten.expm1.default")
def _expm1(em, args, kwargs, val):
    return em.binary("subtract", em.op("exp", [em.cast(args[0], torch_dtype(val.dtype))]), 1, val)


@converts("aten.log1p.default")
def _log1p(em, args, kwargs, val):
    return em.op("log", [em.binary("add", args[0], 1, val)])


@converts("aten.softplus.default")
def _softplus(em, args, kwargs, val):
    """log(1 + exp(beta x)) / beta, and x itself where beta x passes the threshold (as PyTorch computes it)."""
    names = ("self", "beta", "threshold")
    bound = dict(zip(names, args), **kwargs)
    x, beta, threshold = bound["self"], bound.get("beta", 1), bound.get("threshold", 20)
    scaled = em.binary("multiply", x, beta, val)
    smooth = em.binary("divide", em.op("log", [em.binary("add", em.op("exp", [scaled]), 1, val)]), beta, val)
    linear = em.binary("greater", scaled, threshold, torch.empty((), dtype=torch.bool))
    return em.where(linear, x, smooth, val)


@converts("aten.reciprocal.default")
def _reciprocal(em, args, kwargs, val):
    return em.binary("divide", 1.0, args[0], val)


@converts("aten.gelu.default")
def _gelu(em, args, kwargs, val):
    approximate = kwargs.get("approximate", args[1] if len(args) > 1 else "none")
    return em.op("gelu_tanh" if approximate == "tanh" else "gelu", [args[0]])


@converts("aten.relu.default")
def _relu(em, args, kwargs, val):
    return em.binary("maximum", args[0], 0, val)


@converts("aten.clamp.default", "aten.clamp.Tensor")
def _clamp(em, args, kwargs, val):
    x = args[0]
    low = kwargs.get("min", args[1] if len(args) > 1 else None)
    high = kwargs.get("max", args[2] if len(args) > 2 else None)
    if low is not None:
        x = em.binary("maximum", x, low, val)
    if high is not None:
        x = em.binary("minimum", x, high, val)
    return x


@converts("aten.where.self", "aten.where.ScalarOther", "aten.where.ScalarSelf", "aten.where.Scalar")
def _where(em, args, kwargs, val):
    return em.where(args[0], args[1], args[2], val)


@converts("aten.masked_fill.Scalar", "aten.masked_fill.Tensor")
def _masked_fill(em, args, kwargs, val):
    return em.where(args[1], args[2], args[0], val)


# ---- reductions ----------------------------------------------------------------------------------

def _reduction(ir_op: str) -> Converter:
    def convert(em, args, kwargs, val):
        dims = kwargs.get("dim", args[1] if len(args) > 1 else None)
        keepdim = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
        if isinstance(dims, int):
            dims = [dims]
        x = args[0]
        if ir_op in ("sum", "mean"):
            x = em.cast(x, torch_dtype(val.dtype))
        return em.op(ir_op, [x], {"axes": list(dims) if dims else None, "keepdims": bool(keepdim)})
    return convert


for _torch_name, _ir_name in {"mean.dim": "mean", "sum.dim_IntList": "sum", "amax.default": "max",
                              "amin.default": "min", "any.dim": "any", "any.dims": "any",
                              "mean.default": "mean", "sum.default": "sum", "max.default": "max",
                              "min.default": "min"}.items():
    TABLE[f"aten.{_torch_name}"] = _reduction(_ir_name)


@converts("aten.logsumexp.default")
def _logsumexp(em, args, kwargs, val):
    """log(sum(exp(x - max))) + max over `dim`, so large inputs do not overflow."""
    x = em.cast(args[0], torch_dtype(val.dtype))
    dims = kwargs.get("dim", args[1] if len(args) > 1 else None)
    axes = [dims] if isinstance(dims, int) else list(dims)
    keepdim = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
    peak = em.op("max", [x], {"axes": axes, "keepdims": True})
    shifted = em.op("exp", [em.binary("subtract", x, peak, val)])
    total = em.binary("add", em.op("log", [em.op("sum", [shifted], {"axes": axes, "keepdims": True})]), peak, val)
    return total if keepdim else em.reshape(total, em.shape_of(val))


@converts("aten.max.dim", "aten.min.dim")
def _extreme_and_position(em, args, kwargs, val):
    """(values, indices) of the largest (max.dim) or smallest (min.dim) along `dim`, the first position winning a
    tie as in PyTorch: the least position whose value equals the extreme, in one pass over the axis."""
    x, axis = args[0], args[1] % args[0].type.rank
    keepdim = bool(kwargs.get("keepdim", args[2] if len(args) > 2 else False))
    extreme = em.op("max" if em.current_target == "aten.max.dim" else "min", [x], {"axes": [axis], "keepdims": True})
    size = x.type.shape[axis]
    positions = em.reshape(em.op("arange", [], {"end": size, "dtype": "int64"}),
                           [size if i == axis else 1 for i in range(x.type.rank)])
    candidates = em.op("where", [em.op("equal", [x, extreme]), positions,
                                 em.op("constant", [], {"value": size, "dtype": "int64"})])
    first = em.op("min", [candidates], {"axes": [axis], "keepdims": keepdim})
    return [extreme if keepdim else em.reshape(extreme, em.shape_of(val[0])), first]


@converts("aten.softmax.int", "aten._softmax.default", "aten._safe_softmax.default")
def _softmax(em, args, kwargs, val):
    return em.op("softmax", [em.cast(args[0], torch_dtype(val.dtype))], {"axis": args[1]})


@converts("aten.log_softmax.int", "aten._log_softmax.default")
def _log_softmax(em, args, kwargs, val):
    return em.op("log_softmax", [em.cast(args[0], torch_dtype(val.dtype))], {"axis": args[1]})


@converts("aten.cumsum.default")
def _cumsum(em, args, kwargs, val):
    return em.op("cumsum", [args[0]], {"axis": args[1], "dtype": torch_dtype(val.dtype)})


@converts("aten.topk.default")
def _topk(em, args, kwargs, val):
    names = ("self", "k", "dim", "largest", "sorted")
    bound = dict(zip(names, args), **kwargs)
    if not bound.get("largest", True):
        raise em.unsupported("topk of the smallest values (largest=False)")
    attrs = {"k": bound["k"], "axis": bound.get("dim", -1)}
    return [em.op("topk", [bound["self"]], {**attrs, "output": "values"}),
            em.op("topk", [bound["self"]], {**attrs, "output": "indices"})]


@converts("aten.layer_norm.default")
def _layer_norm(em, args, kwargs, val):
    names = ("input", "normalized_shape", "weight", "bias", "eps")
    bound = dict(zip(names, args), **kwargs)
    x = bound["input"]
    axes = list(range(-len(bound["normalized_shape"]), 0))
    centered = em.binary("subtract", x, em.op("mean", [x], {"axes": axes, "keepdims": True}), val)
    variance = em.op("mean", [em.binary("multiply", centered, centered, val)], {"axes": axes, "keepdims": True})
    scale = em.op("rsqrt", [em.binary("add", variance, float(bound.get("eps", 1e-5)), val)])
    y = em.binary("multiply", centered, scale, val)
    if bound.get("weight") is not None:
        y = em.binary("multiply", y, bound["weight"], val)
    if bound.get("bias") is not None:
        y = em.binary("add", y, bound["bias"], val)
    return y


@converts("aten.rms_norm.default")
def _rms_norm(em, args, kwargs, val):
    """x * rsqrt(mean(x * x) + eps) * weight, spelled as passes/fuse_rms_norm.py recognises it."""
    names = ("input", "normalized_shape", "weight", "eps")
    bound = dict(zip(names, args), **kwargs)
    x = bound["input"]
    if len(bound["normalized_shape"]) != 1:
        raise em.unsupported("rms_norm over more than the last axis")
    eps = bound.get("eps")
    eps = float(torch.finfo(val.dtype).eps) if eps is None else float(eps)
    squares = em.binary("multiply", x, x, val)
    variance = em.op("mean", [squares], {"axes": [-1], "keepdims": True})
    y = em.binary("multiply", x, em.op("rsqrt", [em.binary("add", variance, eps, val)]), val)
    return y if bound.get("weight") is None else em.binary("multiply", bound["weight"], y, val)


# ---- linear algebra ------------------------------------------------------------------------------

@converts("aten.linear.default")
def _linear(em, args, kwargs, val):
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    return em.op("linear", [args[0], args[1], bias, None])


@converts("aten.mm.default", "aten.bmm.default", "aten.matmul.default")
def _matmul(em, args, kwargs, val):
    return em.op("matmul", [args[0], args[1]])


@converts("aten.addmm.default")
def _addmm(em, args, kwargs, val):
    return em.binary("add", em.op("matmul", [args[1], args[2]]), args[0], val)


@converts("aten.baddbmm.default")
def _baddbmm(em, args, kwargs, val):
    """beta * input + alpha * (batch1 @ batch2)."""
    names = ("self", "batch1", "batch2", "beta", "alpha")
    bound = dict(zip(names, args), **kwargs)
    product = em.op("matmul", [bound["batch1"], bound["batch2"]])
    if bound.get("alpha", 1) != 1:
        product = em.binary("multiply", product, bound["alpha"], val)
    if bound.get("beta", 1) == 0:
        return product
    added = bound["self"] if bound.get("beta", 1) == 1 else em.binary("multiply", bound["self"], bound["beta"], val)
    return em.binary("add", product, added, val)


@converts("aten.index_select.default")
def _index_select(em, args, kwargs, val):
    return em.op("take", [args[0], args[2]], {"axis": args[1]})


@converts("aten.embedding.default")
def _embedding(em, args, kwargs, val):
    return em.op("take", [args[0], args[1]], {"axis": 0})


@converts("aten.scaled_dot_product_attention.default")
def _sdpa(em, args, kwargs, val):
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    bound = dict(zip(names, args), **kwargs)
    mask = bound.get("attn_mask")
    return em.op("attention", [bound["query"], bound["key"], bound["value"], mask],
                 {"scale": bound.get("scale"), "causal": bool(bound.get("is_causal", False))})


# ---- shapes --------------------------------------------------------------------------------------

@converts("aten.view.default", "aten.reshape.default", "aten._unsafe_view.default")
def _reshape(em, args, kwargs, val):
    return em.reshape(args[0], list(args[1]))


@converts("aten.view_as.default")
def _view_as(em, args, kwargs, val):
    return em.reshape(args[0], em.shape_of(val))


@converts("aten.repeat.default")
def _repeat(em, args, kwargs, val):
    """Tile: each axis of size d repeated r times becomes (r, d) by broadcasting, then r * d."""
    x, repeats = args[0], list(args[1])
    shape = [1] * (len(repeats) - x.type.rank) + list(x.type.shape)
    x = em.reshape(x, shape)
    spread, tiled = [], []
    for count, size in zip(repeats, shape):
        spread += [1, size]
        tiled += [em.dim(count), size]
    x = em.broadcast(em.reshape(x, spread), tiled)
    return em.reshape(x, em.shape_of(val))


@converts("aten.repeat_interleave.self_int")
def _repeat_interleave(em, args, kwargs, val):
    """Each element repeated r times along `dim`: (.., d, ..) -> (.., d, r, ..) by broadcasting -> (.., d * r, ..)."""
    names = ("self", "repeats", "dim", "output_size")
    bound = dict(zip(names, args), **kwargs)
    x, axis = bound["self"], bound.get("dim")
    if axis is None:
        raise em.unsupported("repeat_interleave without dim (over the flattened tensor)")
    axis %= x.type.rank
    shape = list(x.type.shape)
    spread = shape[:axis + 1] + [1] + shape[axis + 1:]
    repeated = shape[:axis + 1] + [em.dim(bound["repeats"])] + shape[axis + 1:]
    return em.reshape(em.broadcast(em.reshape(x, spread), repeated), em.shape_of(val))


@converts("aten.unsqueeze.default", "aten.squeeze.dim", "aten.squeeze.dims", "aten.squeeze.default",
          "aten.flatten.using_ints", "aten.unflatten.int")
def _reshape_to_result(em, args, kwargs, val):
    return em.reshape(args[0], em.shape_of(val))


@converts("aten.permute.default")
def _permute(em, args, kwargs, val):
    return em.op("permute", [args[0]], {"axes": list(args[1])})


@converts("aten.transpose.int")
def _transpose(em, args, kwargs, val):
    rank = args[0].type.rank
    axes = list(range(rank))
    a, b = args[1] % rank, args[2] % rank
    axes[a], axes[b] = axes[b], axes[a]
    return em.op("permute", [args[0]], {"axes": axes})


@converts("aten.numpy_T.default")
def _numpy_t(em, args, kwargs, val):
    return em.op("permute", [args[0]], {"axes": list(range(args[0].type.rank))[::-1]})


@converts("aten.t.default")
def _t(em, args, kwargs, val):
    return em.op("permute", [args[0]], {"axes": [1, 0]}) if args[0].type.rank == 2 else args[0]


@converts("aten.expand.default", "aten.expand_as.default")
def _expand(em, args, kwargs, val):
    return em.broadcast(args[0], em.shape_of(val))


@converts("aten.cat.default", "aten.concat.default")
def _cat(em, args, kwargs, val):
    axis = kwargs.get("dim", args[1] if len(args) > 1 else 0)
    parts = [em.cast(t, torch_dtype(val.dtype)) for t in args[0] if not _is_empty(t)]
    return parts[0] if len(parts) == 1 else em.op("concat", parts, {"axis": axis})


def _is_empty(node: Node) -> bool:
    return any(isinstance(d, int) and d == 0 for d in node.type.shape)


@converts("aten.stack.default")
def _stack(em, args, kwargs, val):
    axis = kwargs.get("dim", args[1] if len(args) > 1 else 0)
    rank = args[0][0].type.rank + 1
    axis %= rank
    parts = []
    for t in args[0]:
        shape = list(t.type.shape)
        shape.insert(axis, 1)
        parts.append(em.reshape(t, shape))
    return em.op("concat", parts, {"axis": axis})


@converts("aten.slice.Tensor")
def _slice(em, args, kwargs, val):
    names = ("self", "dim", "start", "end", "step")
    bound = dict(zip(names, args), **kwargs)
    start = bound.get("start") if bound.get("start") is not None else 0
    end = bound.get("end") if bound.get("end") is not None else 2 ** 63 - 1
    return em.op("slice", [args[0]], {"axis": bound.get("dim", 0), "start": start, "end": end,
                                      "step": bound.get("step", 1)})


@converts("aten.narrow.default")
def _narrow(em, args, kwargs, val):
    x, axis, start, length = args
    return em.op("slice", [x], {"axis": axis, "start": start, "end": start + length, "step": 1})


@converts("aten.select.int")
def _select(em, args, kwargs, val):
    x, axis, index = args
    end = index + 1 if index != -1 else 2 ** 63 - 1
    sliced = em.op("slice", [x], {"axis": axis, "start": index, "end": end, "step": 1})
    return em.reshape(sliced, em.shape_of(val))


@converts("aten.split.Tensor", "aten.split_with_sizes.default", "aten.chunk.default", "aten.unbind.int")
def _split(em, args, kwargs, val):
    """Consecutive slices along `dim`; unbind's slices are one long, and lose that axis."""
    x = args[0]
    unbind = em.current_target == "aten.unbind.int"
    axis = (args[1] if unbind else args[2]) if len(args) > (1 if unbind else 2) else kwargs.get("dim", 0)
    axis %= x.type.rank
    parts, start = [], 0
    for piece in val:
        length = 1 if unbind else piece.shape[axis]
        size = em.dim(length)
        node = em.op("slice", [x], {"axis": axis, "start": start, "end": start + size, "step": 1})
        parts.append(em.reshape(node, em.shape_of(piece)))
        start = start + size
    return parts


@converts("aten.gather.default")
def _gather(em, args, kwargs, val):
    if kwargs.get("sparse_grad") or (len(args) > 3 and args[3]):
        raise em.unsupported("gather with sparse_grad")
    return em.op("gather", [args[0], args[2]], {"axis": args[1]})


@converts("aten.scatter.value", "aten.scatter_.value")
def _scatter_value(em, args, kwargs, val):
    """x with `value` written where `index` points along `dim`: where(any(index == position), value, x), the
    comparison made on a new axis of positions beside `dim` (a router marking its chosen groups)."""
    x, axis, index, value = args[:4]
    if kwargs.get("reduce") or len(args) > 4:
        raise em.unsupported("scatter with a reduction")
    rank = x.type.rank
    axis %= rank
    if any(not D.equal(a, b) for i, (a, b) in enumerate(zip(x.type.shape, index.type.shape)) if i != axis):
        raise em.unsupported("scatter with an index smaller than the tensor outside `dim`")
    size = x.type.shape[axis]
    beside = em.reshape(index, [*index.type.shape[:axis + 1], 1, *index.type.shape[axis + 1:]])
    positions = em.reshape(em.op("arange", [], {"end": size, "dtype": index.type.dtype}),
                           [1] * (axis + 1) + [size] + [1] * (rank - axis - 1))
    pointed = em.op("any", [em.op("equal", [beside, positions])], {"axes": [axis], "keepdims": False})
    return em.where(pointed, value, x, val)


@converts("aten.index.Tensor")
def _index(em, args, kwargs, val):
    """Advanced indexing: index tensors for the leading axes are `index`; one index tensor after whole slices
    (x[..., [-2], :], Falcon splitting its fused heads) is `take` along its axis, negative positions counted from
    the axis' end (take clips)."""
    x, indices = args[0], list(args[1])
    if all(i is not None for i in indices):
        return em.op("index", [x, *indices])
    given = [axis for axis, index in enumerate(indices) if index is not None]
    if len(given) != 1:
        raise em.unsupported("index with slices (None) among several index tensors")
    axis = given[0]
    positions = indices[axis]
    dtype = positions.type.dtype
    negative = em.op("less", [positions, em.constant(0, dtype)])
    from_end = em.op("add", [positions, em.constant(x.type.shape[axis], dtype)])
    return em.op("take", [x, em.op("where", [negative, from_end, positions])], {"axis": axis})


@converts("aten.diff.default")
def _diff(em, args, kwargs, val):
    names = ("self", "n", "dim", "prepend", "append")
    bound = dict(zip(names, args), **kwargs)
    if bound.get("n", 1) != 1:
        raise em.unsupported("diff with n != 1")
    axis = bound.get("dim", -1)
    parts = [p for p in (bound.get("prepend"), bound["self"], bound.get("append")) if p is not None]
    x = parts[0] if len(parts) == 1 else em.op("concat", parts, {"axis": axis})
    later = em.op("slice", [x], {"axis": axis, "start": 1, "end": 2 ** 63 - 1, "step": 1})
    earlier = em.op("slice", [x], {"axis": axis, "start": 0, "end": -1, "step": 1})
    return em.binary("subtract", later, earlier, val)


@converts("aten.tril.default", "aten.triu.default")
def _triangle(em, args, kwargs, val):
    x = args[0]
    diagonal = args[1] if len(args) > 1 else kwargs.get("diagonal", 0)
    rows, cols = x.type.shape[-2], x.type.shape[-1]
    row = em.reshape(em.op("arange", [], {"end": rows, "dtype": "int64"}), [rows, 1])
    col = em.reshape(em.op("arange", [], {"end": cols, "dtype": "int64"}), [1, cols])
    offset = em.binary("subtract", col, row, torch.empty((), dtype=torch.int64))
    compare = "less_equal" if em.current_target.startswith("aten.tril") else "greater_equal"
    keep = em.op(compare, [offset, em.constant(diagonal, "int64")])
    return em.where(keep, x, em.constant(0, x.type.dtype), val)


# ---- creation ------------------------------------------------------------------------------------

@converts("aten.arange.default", "aten.arange.start", "aten.arange.start_step")
def _arange(em, args, kwargs, val):
    values = list(args) + [kwargs[k] for k in ("start", "end", "step") if k in kwargs]
    if len(values) == 1:
        start, end, step = 0, values[0], 1
    else:
        start, end, step = (values + [1])[:3]
    dtype = torch_dtype(val.dtype)
    if not all(isinstance(v, int) or hasattr(v, "free_symbols") for v in (start, end, step)):
        raise em.unsupported("arange with floating-point bounds")
    return em.op("arange", [], {"start": start, "end": end, "step": step, "dtype": dtype})


@converts("aten.full.default", "aten.new_full.default", "aten.ones.default", "aten.zeros.default",
          "aten.new_ones.default", "aten.new_zeros.default", "aten.scalar_tensor.default",
          "aten.full_like.default", "aten.ones_like.default", "aten.zeros_like.default", "aten.new_empty.default",
          "aten.empty.memory_format")
def _full(em, args, kwargs, val):
    target = em.current_target
    if "ones" in target:
        value = 1
    elif "zeros" in target or "empty" in target:
        value = 0
    elif target.startswith("aten.scalar_tensor"):
        value = args[0]
    elif target.startswith("aten.new_full"):
        value = args[2]
    else:
        value = args[1] if len(args) > 1 else kwargs["fill_value"]
    return em.op("full", [], {"shape": em.shape_of(val), "value": _python_scalar(value),
                              "dtype": torch_dtype(val.dtype)})


def _python_scalar(value: Any) -> Any:
    if isinstance(value, (bool, int, float)):
        return value
    raise TypeError(f"fill value {value!r} is not a constant")
