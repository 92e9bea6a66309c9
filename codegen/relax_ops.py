"""The lowering table: one function per IR op that emits it as Relax (ops or TE).

Each entry takes the lowering context, the node and its operands as Relax expressions
and returns the Relax expression of the result. Most ops map onto a Relax op; `linear`
is written in TE so it reads the weight in its stored (out, in) layout instead of
transposing it on every call, and `paged_attention` calls the paged KV cache's builtin.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
from tvm import relax, te, tirx

from llmc.ir import Node
from llmc.ir.ops.shape import slice_bounds
from llmc.ir.types import KVCacheType, TensorType, numpy_dtype

from .prim import SymbolTable

Lowering = Callable[["LowerContext", Node, list], relax.Expr]
TABLE: dict[str, Lowering] = {}


class LowerContext:
    def __init__(self, bb: relax.BlockBuilder, symbols: SymbolTable):
        self.bb = bb
        self.symbols = symbols

    def emit(self, expr: relax.Expr, name: str) -> relax.Expr:
        return self.bb.emit(expr, name_hint=name)

    def emit_te(self, fn, *args, name: str) -> relax.Expr:
        return self.bb.emit_te(fn, *args, primfunc_name_hint=name)


def lowers(*names: str):
    def register(fn: Lowering) -> Lowering:
        for name in names:
            TABLE[name] = fn
        return fn
    return register


def _simple(relax_fn: Callable) -> Lowering:
    def lower(cx: LowerContext, node: Node, args: list) -> relax.Expr:
        return cx.emit(relax_fn(*args), node.name)
    return lower


for _ir, _fn in {
    "add": relax.op.add, "subtract": relax.op.subtract, "multiply": relax.op.multiply, "divide": relax.op.divide,
    "power": relax.op.power, "maximum": relax.op.maximum, "minimum": relax.op.minimum,
    "floor_divide": relax.op.floor_divide, "remainder": relax.op.floor_mod,
    "equal": relax.op.equal, "not_equal": relax.op.not_equal, "less": relax.op.less,
    "less_equal": relax.op.less_equal, "greater": relax.op.greater, "greater_equal": relax.op.greater_equal,
    "logical_and": relax.op.logical_and, "logical_or": relax.op.logical_or, "logical_not": relax.op.logical_not,
    "negative": relax.op.negative, "exp": relax.op.exp, "log": relax.op.log, "sqrt": relax.op.sqrt,
    "rsqrt": relax.op.rsqrt, "sin": relax.op.sin, "cos": relax.op.cos, "tanh": relax.op.tanh, "abs": relax.op.abs,
    "erf": relax.op.erf, "sigmoid": relax.op.sigmoid, "silu": relax.op.nn.silu, "gelu": relax.op.nn.gelu,
    "gelu_tanh": relax.op.nn.gelu_tanh, "where": relax.op.where, "matmul": relax.op.matmul,
}.items():
    TABLE[_ir] = _simple(_fn)


@lowers("cast")
def _cast(cx, node, args):
    return cx.emit(relax.op.astype(args[0], node.attrs["dtype"]), node.name)


def _reduce(relax_fn):
    def lower(cx, node, args):
        return cx.emit(relax_fn(args[0], node.attrs["axes"], node.attrs["keepdims"]), node.name)
    return lower


for _ir, _fn in {"sum": relax.op.sum, "mean": relax.op.mean, "max": relax.op.max, "min": relax.op.min}.items():
    TABLE[_ir] = _reduce(_fn)


@lowers("any")
def _any(cx, node, args):
    counts = relax.op.sum(relax.op.astype(args[0], "int32"), node.attrs["axes"], node.attrs["keepdims"])
    return cx.emit(relax.op.greater(counts, relax.const(0, "int32")), node.name)


@lowers("softmax")
def _softmax(cx, node, args):
    return cx.emit(relax.op.nn.softmax(args[0], node.attrs["axis"]), node.name)


@lowers("log_softmax")
def _log_softmax(cx, node, args):
    return cx.emit(relax.op.nn.log_softmax(args[0], node.attrs["axis"]), node.name)


@lowers("cumsum")
def _cumsum(cx, node, args):
    return cx.emit(relax.op.cumsum(args[0], node.attrs["axis"], node.type.dtype), node.name)


@lowers("linear")
def _linear(cx, node, args):
    x, weight, bias = args

    def compute(x, weight, *rest):
        k = te.reduce_axis((0, weight.shape[1]), name="k")
        product = te.compute(
            tuple(x.shape[:-1]) + (weight.shape[0],),
            lambda *i: te.sum(x[i[:-1] + (k,)] * weight[i[-1], k], axis=k), name="linear")
        if not rest:
            return product
        return te.compute(product.shape, lambda *i: product[i] + rest[0][i[-1]], name="linear_bias")

    operands = [x, weight] + ([bias] if bias is not None else [])
    return cx.emit_te(compute, *operands, name="linear")


@lowers("take")
def _take(cx, node, args):
    # "clip" rather than TVM's unchecked "fast": the runtime validates token ids, and a bad index must
    # never read outside the table.
    return cx.emit(relax.op.take(args[0], args[1], node.attrs["axis"], mode="clip"), node.name)


@lowers("index")
def _index(cx, node, args):
    return cx.emit(relax.op.index_tensor(args[0], list(args[1:])), node.name)


@lowers("reshape")
def _reshape(cx, node, args):
    return cx.emit(relax.op.reshape(args[0], cx.symbols.shape(node.type.shape)), node.name)


@lowers("permute")
def _permute(cx, node, args):
    return cx.emit(relax.op.permute_dims(args[0], node.attrs["axes"]), node.name)


@lowers("broadcast_to")
def _broadcast_to(cx, node, args):
    return cx.emit(relax.op.broadcast_to(args[0], cx.symbols.shape(node.type.shape)), node.name)


@lowers("concat")
def _concat(cx, node, args):
    return cx.emit(relax.op.concat(args, node.attrs["axis"]), node.name)


@lowers("slice")
def _slice(cx, node, args):
    source: Node = node.inputs[0]
    axis = node.attrs["axis"] % source.type.rank
    start, end, step = slice_bounds(node.attrs["start"], node.attrs["end"], node.attrs["step"],
                                    source.type.shape[axis])
    prim = cx.symbols.prim
    return cx.emit(relax.op.strided_slice(args[0], [axis], [prim(start)], [prim(end)], [step], assume_inbound=True),
                   node.name)


@lowers("arange")
def _arange(cx, node, args):
    prim = cx.symbols.prim
    attrs = node.attrs
    return cx.emit(relax.op.arange(prim(attrs["start"]), prim(attrs["end"]), prim(attrs["step"]), attrs["dtype"]),
                   node.name)


@lowers("full")
def _full(cx, node, args):
    value = relax.const(np.array(node.attrs["value"], dtype=numpy_dtype(node.type.dtype)), node.type.dtype)
    return cx.emit(relax.op.full(cx.symbols.shape(node.type.shape), value, node.type.dtype), node.name)


@lowers("constant")
def _constant(cx, node, args):
    return relax.const(np.array(node.attrs["value"], dtype=numpy_dtype(node.type.dtype)), node.type.dtype)


@lowers("attention")
def _attention(cx, node, args):
    q, k, v, mask = args
    q_type: TensorType = node.inputs[0].type
    group = q_type.shape[1] // node.inputs[1].type.shape[1]
    if group > 1:
        k = cx.emit(relax.op.repeat(k, group, axis=1), node.name + "_k")
        v = cx.emit(relax.op.repeat(v, group, axis=1), node.name + "_v")
    scale = node.attrs["scale"] if node.attrs["scale"] is not None else 1.0 / math.sqrt(q_type.shape[3])
    dtype = q_type.dtype
    scores = relax.op.multiply(relax.op.matmul(q, relax.op.permute_dims(k, [0, 1, 3, 2])), relax.const(scale, dtype))
    scores = cx.emit(scores, node.name + "_scores")
    low = relax.const(-np.inf, dtype)
    if mask is not None:
        if node.inputs[3].type.dtype == "bool":
            scores = cx.emit(relax.op.where(mask, scores, low), node.name + "_masked")
        else:
            scores = cx.emit(relax.op.add(scores, mask), node.name + "_masked")
    if node.attrs["causal"]:
        rows = cx.symbols.prim(q_type.shape[2])
        cols = cx.symbols.prim(node.inputs[1].type.shape[2])
        causal = cx.emit_te(lambda: te.compute((rows, cols), lambda i, j: j <= i, name="causal"), name="causal_mask")
        scores = cx.emit(relax.op.where(causal, scores, low), node.name + "_causal")
    probs = cx.emit(relax.op.nn.softmax(scores, -1), node.name + "_probs")
    return cx.emit(relax.op.matmul(probs, v), node.name)


@lowers("paged_attention")
def _paged_attention(cx, node, args):
    q, k, v, cache = args
    cache_type: KVCacheType = node.inputs[3].type
    tokens = cx.symbols.prim(node.type.shape[2])
    dim = cache_type.head_dim

    def token_major(x, heads):
        return relax.op.reshape(relax.op.permute_dims(x, [0, 2, 1, 3]), [tokens, heads, dim])

    qkv = cx.emit(relax.op.concat([token_major(q, cache_type.num_q_heads), token_major(k, cache_type.num_kv_heads),
                                   token_major(v, cache_type.num_kv_heads)], axis=1), node.name + "_qkv")
    out = cx.emit(relax.call_dps_packed(
        "vm.builtin.attention_kv_cache_attention_with_fused_qkv",
        [cache, relax.prim_value(node.attrs["layer"]), relax.prim_value(float(node.attrs["scale"])), qkv],
        out_ty=relax.TensorType((tokens, cache_type.num_q_heads, dim), cache_type.dtype)), node.name + "_out")
    return cx.emit(relax.op.permute_dims(relax.op.reshape(out, [1, tokens, cache_type.num_q_heads, dim]),
                                         [0, 2, 1, 3]), node.name)


def lower_node(cx: LowerContext, node: Node, args: list[Any]) -> relax.Expr:
    return TABLE[node.op](cx, node, args)
