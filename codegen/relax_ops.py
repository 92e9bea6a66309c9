"""The lowering table: one function per IR op that emits it as Relax (ops or TE).

Each entry takes the lowering context, the node and its operands as Relax expressions
and returns the Relax expression of the result. Most ops map onto a Relax op; `linear`
is written in TE so it reads the weight in its stored (out, in) layout instead of
transposing it on every call, and `paged_attention` calls the paged KV cache's builtin.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
from tvm import relax, te, tirx

from llmc.ir import Node
from llmc.ir import dims as D
from llmc.ir.ops.attention import attention_scale
from llmc.ir.ops.shape import slice_bounds
from llmc.ir.quant_formats import GROUP, input_count
from llmc.ir.kv_storage import geometry, kv_storage
from llmc.ir.types import KVCacheType, TensorType, numpy_dtype
from llmc.targets import Kernel, OwnKVCache, Target

from .prim import SymbolTable

Lowering = Callable[["LowerContext", Node, list], relax.Expr]
TABLE: dict[str, Lowering] = {}


class LowerContext:
    def __init__(self, bb: relax.BlockBuilder, symbols: SymbolTable, target: Target, kernels: dict[str, relax.GlobalVar],
                 own_cache: OwnKVCache | None = None):
        self.bb = bb
        self.symbols = symbols
        self.target = target
        self.own_cache = own_cache
        self._kernels = kernels

    def call_kernel(self, kernel: Kernel, args: list, out_shape: list, dtype: str, name: str,
                    inplace: int | None = None) -> relax.Expr:
        """Call the target's hand-written kernel (added to the module once per distinct kernel); with
        `inplace`, the kernel writes its result into argument `inplace` instead of a new tensor."""
        if kernel.name not in self._kernels:
            self._kernels[kernel.name] = self.bb.add_func(kernel.func.with_attr("global_symbol", kernel.name),
                                                          kernel.name)
        out = relax.TensorType(out_shape, dtype)
        call = (relax.call_tir(self._kernels[kernel.name], args, out) if inplace is None
                else relax.call_tir_inplace(self._kernels[kernel.name], args, [inplace], out))
        return self.emit(call, name)

    def dtype(self, dtype: str) -> str:
        """The dtype the target keeps tensors of `dtype` in."""
        return self.target.tensor_dtype(dtype)

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
    "floor": relax.op.floor,
    "erf": relax.op.erf, "sigmoid": relax.op.sigmoid, "silu": relax.op.nn.silu, "gelu": relax.op.nn.gelu,
    "gelu_tanh": relax.op.nn.gelu_tanh, "where": relax.op.where, "matmul": relax.op.matmul,
}.items():
    TABLE[_ir] = _simple(_fn)


@lowers("all_reduce")
def _all_reduce(cx, node, args):
    """The sum over the shards, as NCCL computes it inside TVM's disco session (runtime.disco.allreduce)."""
    return cx.emit(relax.op.ccl.allreduce(args[0], "sum"), node.name)


@lowers("cast")
def _cast(cx, node, args):
    return cx.emit(relax.op.astype(args[0], cx.dtype(node.attrs["dtype"])), node.name)


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
    return cx.emit(relax.op.cumsum(args[0], node.attrs["axis"], cx.dtype(node.type.dtype)), node.name)


def _top_k_by_rank(x, k: int, output: str, index_dtype: str):
    """The k largest of x's last axis by rank: an element's rank counts the elements before it (larger, or equal
    and earlier), and output j is the element of rank j. Quadratic in the axis (a router's few experts), with no
    sort, so every target compiles it, and equal values keep their order as the IR's reference does."""
    size = x.shape[-1]
    other = te.reduce_axis((0, size), name="other")

    def rank(*index):
        mine, theirs = x[index], x[index[:-1] + (other,)]
        before = tirx.any(theirs > mine, tirx.all(theirs == mine, other.var < index[-1]))
        return te.sum(tirx.Select(before, tirx.const(1, "int32"), tirx.const(0, "int32")), axis=other)

    ranks = te.compute(x.shape, rank, name="topk_rank")
    pick = te.reduce_axis((0, size), name="pick")

    def chosen(*index):
        hit = ranks[index[:-1] + (pick,)] == index[-1].astype("int32")
        if output == "indices":
            return te.sum(tirx.Select(hit, pick.var.astype(index_dtype), tirx.const(0, index_dtype)), axis=pick)
        return te.sum(tirx.Select(hit, x[index[:-1] + (pick,)], tirx.const(0, x.dtype)), axis=pick)

    return te.compute(tuple(x.shape[:-1]) + (k,), chosen, name="topk")


@lowers("topk")
def _topk(cx, node, args):
    """Along the last axis; another axis is swapped with the last one before and after."""
    rank, attrs = node.inputs[0].type.rank, node.attrs
    axis = attrs["axis"] % rank
    swap = list(range(rank))
    swap[axis], swap[-1] = swap[-1], swap[axis]
    x = args[0] if axis == rank - 1 else cx.emit(relax.op.permute_dims(args[0], swap), node.name + "_in")
    top = cx.emit_te(lambda values: _top_k_by_rank(values, attrs["k"], attrs["output"], cx.dtype("int64")), x,
                     name="topk")
    return top if axis == rank - 1 else cx.emit(relax.op.permute_dims(top, swap), node.name)


def _as_rank3(cx, node: Node, value, name: str):
    """`value` (of `node`'s type) as a (batch, seq, features) tensor, the layout matmul kernels take."""
    shape = node.type.shape
    if len(shape) == 3:
        return value
    rows = cx.symbols.prim(D.product(shape[:-1]))
    return cx.emit(relax.op.reshape(value, [1, rows, cx.symbols.prim(shape[-1])]), name)


def _call_matmul_kernel(cx, node: Node, kernel: Kernel, x, weights: list, residual) -> relax.Expr:
    """x (..., K) -> (..., N) through a target kernel taking (x, weights..., [residual]) on rank-3 activations."""
    args = [_as_rank3(cx, node.inputs[0], x, node.name + "_x")] + weights
    if residual is not None:
        args.append(_as_rank3(cx, node, residual, node.name + "_residual"))
    shape = node.type.shape
    if len(shape) == 3:
        return cx.call_kernel(kernel, args, cx.symbols.shape(shape), node.type.dtype, node.name)
    rows = cx.symbols.prim(D.product(shape[:-1]))
    out = cx.call_kernel(kernel, args, [1, rows, cx.symbols.prim(shape[-1])], node.type.dtype, node.name + "_out")
    return cx.emit(relax.op.reshape(out, cx.symbols.shape(shape)), node.name)


def _matmul_te(x, weight, bias, residual, name: str):
    """x (..., K) times weight (N, K) transposed, plus bias (N) and residual (..., N) when given, in TE."""
    k = te.reduce_axis((0, weight.shape[1]), name="k")
    product = te.compute(tuple(x.shape[:-1]) + (weight.shape[0],),
                         lambda *i: te.sum(x[i[:-1] + (k,)] * weight[i[-1], k].astype(x.dtype), axis=k), name=name)
    if bias is None and residual is None:
        return product

    def epilogue(*i):
        value = product[i]
        if bias is not None:
            value = value + bias[i[-1]]
        if residual is not None:
            value = value + residual[i]
        return value
    return te.compute(product.shape, epilogue, name=name + "_epilogue")


@lowers("linear")
def _linear(cx, node, args):
    x, weight, bias, residual = args
    kernel = cx.target.kernel(node)
    if kernel is not None:
        return _call_matmul_kernel(cx, node, kernel, x, [weight] + ([bias] if bias is not None else []), residual)

    has_bias, has_residual = bias is not None, residual is not None

    def compute(x, weight, *extra):
        return _matmul_te(x, weight, extra[0] if has_bias else None, extra[-1] if has_residual else None, "linear")

    return cx.emit_te(compute, x, weight, *[a for a in (bias, residual) if a is not None], name="linear")


@lowers("expert_linear")
def _expert_linear(cx, node, args):
    x, weight, experts = args
    kernel = cx.target.kernel(node)
    if kernel is not None:
        return cx.call_kernel(kernel, args, cx.symbols.shape(node.type.shape), node.type.dtype, node.name)

    def compute(x, weight, experts):
        k = te.reduce_axis((0, weight.shape[2]), name="k")
        return te.compute((x.shape[0], weight.shape[1]),
                          lambda t, n: te.sum(x[t, k] * weight[experts[t], n, k], axis=k), name="expert_linear")

    return cx.emit_te(compute, x, weight, experts, name="expert_linear")


def _code_byte(codes, row, index, words: bool, signed: bool):
    """Byte `index` of a row of codes; with `words`, cut out of the little-endian 32-bit word that holds it
    and kept 32 bits wide (sign-extended when `signed`)."""
    if not words:
        return codes[row, index]
    byte = (codes[row, index // 4] >> (index % 4 * 8).astype("uint32")) & tirx.const(255, "uint32")
    if not signed:
        return byte
    return byte.astype("int32") - tirx.if_then_else(byte >= tirx.const(128, "uint32"), 256, 0)


def _dequantized_value(codes, scales, mins, bits: int, group: int, row, k, words: bool):
    """The float weight at (row, k) that grouped quantized codes stand for (ir/quant_formats.py)."""
    scale = scales[row, k // group].astype("float32")
    if bits == 8:
        code = _code_byte(codes, row, k, words, signed=True).astype("float32")
    else:
        block, position = k // GROUP, k % GROUP
        byte = _code_byte(codes, row, block * (GROUP // 2) + position % (GROUP // 2), words, signed=False)
        dtype = "uint32" if words else "uint8"
        nibble = tirx.if_then_else(position < GROUP // 2, byte & tirx.const(15, dtype), byte >> tirx.const(4, dtype))
        code = nibble.astype("float32") - (8.0 if mins is None else 0.0)
    value = code * scale
    return value if mins is None else value + mins[row, k // group].astype("float32")


def _group(node: Node, codes_index: int) -> int:
    """Inputs per scale of a quantized weight: K over the number of scale columns."""
    codes, scales = node.inputs[codes_index].type, node.inputs[codes_index + 1].type
    return input_count(codes.shape, node.attrs["bits"]) // scales.shape[1]


def _dequantized(codes, scales, mins, bits: int, group: int, words: bool, name: str):
    rows, groups = scales.shape
    return te.compute((rows, groups * group),
                      lambda n, k: _dequantized_value(codes, scales, mins, bits, group, n, k, words), name=name)


def _code_words(cx, codes_node: Node, codes, name: str):
    """The codes as the target reads them: as they are, or viewed as 32-bit words when it has no 8-bit types."""
    if not cx.target.bytes_as_words:
        return codes
    rows, width = codes_node.type.shape
    return cx.emit(relax.op.memory.view(codes, relax.ShapeExpr([rows, width // 4]), "uint32"), name)


@lowers("quantized_linear")
def _quantized_linear(cx, node, args):
    x, codes, scales, mins, bias, residual = args
    bits = node.attrs["bits"]
    kernel = cx.target.kernel(node)
    if kernel is not None:
        weights = [codes, scales] + [a for a in (mins, bias) if a is not None]
        return _call_matmul_kernel(cx, node, kernel, x, weights, residual)
    has_mins, has_bias, has_residual = mins is not None, bias is not None, residual is not None
    words, group = cx.target.bytes_as_words, _group(node, 1)
    codes = _code_words(cx, node.inputs[1], codes, node.name + "_codes")

    def compute(x, codes, scales, *extra):
        extra = list(extra)
        weight = _dequantized(codes, scales, extra.pop(0) if has_mins else None, bits, group, words, "dequantized")
        bias = extra.pop(0) if has_bias else None
        residual = extra.pop(0) if has_residual else None
        return _matmul_te(x, weight, bias, residual, "quantized_linear")

    operands = [a for a in (mins, bias, residual) if a is not None]
    return cx.emit_te(compute, x, codes, scales, *operands, name="quantized_linear")


@lowers("quantized_take")
def _quantized_take(cx, node, args):
    codes, scales, mins, indices = args
    bits, group = node.attrs["bits"], _group(node, 0)
    words = cx.target.bytes_as_words
    codes = _code_words(cx, node.inputs[0], codes, node.name + "_codes")

    def compute(codes, scales, *rest):
        mins, indices = (rest[0], rest[1]) if len(rest) == 2 else (None, rest[0])
        groups = scales.shape[1]
        return te.compute(tuple(indices.shape) + (groups * group,),
                          lambda *i: _dequantized_value(codes, scales, mins, bits, group, indices[i[:-1]], i[-1],
                                                        words),
                          name="quantized_take")

    operands = ([mins] if mins is not None else []) + [indices]
    return cx.emit_te(compute, codes, scales, *operands, name="quantized_take")


@lowers("rms_norm")
def _rms_norm(cx, node, args):
    x, weight = args
    eps = node.attrs["eps"]

    def compute(x, weight=None):
        width = x.shape[-1]
        k = te.reduce_axis((0, width), name="k")
        squares = te.compute(tuple(x.shape[:-1]), lambda *i: te.sum(x[i + (k,)] * x[i + (k,)], axis=k),
                             name="sum_of_squares")

        def normalize(*i):
            value = x[i] * tirx.rsqrt(squares[i[:-1]] / width.astype(x.dtype) + tirx.const(eps, x.dtype))
            return value * weight[i[-1]] if weight is not None else value
        return te.compute(x.shape, normalize, name="rms_norm")

    return cx.emit_te(compute, x, *([weight] if weight is not None else []), name="rms_norm")


@lowers("take")
def _take(cx, node, args):
    # "clip" rather than TVM's unchecked "fast": the runtime validates token ids, and a bad index must
    # never read outside the table.
    return cx.emit(relax.op.take(args[0], args[1], node.attrs["axis"], mode="clip"), node.name)


@lowers("gather")
def _gather(cx, node, args):
    return cx.emit(relax.op.gather_elements(args[0], args[1], node.attrs["axis"]), node.name)


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
    return cx.emit(relax.op.arange(prim(attrs["start"]), prim(attrs["end"]), prim(attrs["step"]),
                                   cx.dtype(attrs["dtype"])), node.name)


def _scalar(cx, node) -> relax.Constant:
    dtype = cx.dtype(node.type.dtype)
    return relax.const(np.array(node.attrs["value"], dtype=numpy_dtype(dtype)), dtype)


@lowers("full")
def _full(cx, node, args):
    return cx.emit(relax.op.full(cx.symbols.shape(node.type.shape), _scalar(cx, node), cx.dtype(node.type.dtype)),
                   node.name)


@lowers("constant")
def _constant(cx, node, args):
    return _scalar(cx, node)


@lowers("attention")
def _attention(cx, node, args):
    q, k, v, mask = args
    q_type: TensorType = node.inputs[0].type
    group = q_type.shape[1] // node.inputs[1].type.shape[1]
    if group > 1:
        k = cx.emit(relax.op.repeat(k, group, axis=1), node.name + "_k")
        v = cx.emit(relax.op.repeat(v, group, axis=1), node.name + "_v")
    scale = attention_scale(node.attrs["scale"], q_type.shape[3])
    dtype = q_type.dtype
    scores = relax.op.multiply(relax.op.matmul(q, relax.op.permute_dims(k, [0, 1, 3, 2])), relax.const(scale, dtype))
    scores = cx.emit(scores, node.name + "_scores")
    if node.attrs["softcap"] is not None:
        cap = relax.const(node.attrs["softcap"], dtype)
        scores = cx.emit(relax.op.multiply(relax.op.tanh(relax.op.divide(scores, cap)), cap), node.name + "_capped")
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
    if cx.own_cache is not None:
        return cx.own_cache.attend(cx, node, args)
    q, k, v, cache = args
    cache_type: KVCacheType = node.inputs[3].type
    tokens = cx.symbols.prim(node.type.shape[1])
    dim = cache_type.head_dim

    def rows(x, heads):
        return relax.op.reshape(x, [tokens, heads, dim])

    # TVM's runtime tells the kernels nothing of the layer but its scale: llmc's kernels read a negative one as
    # "this layer is windowed" (targets/cpu_kernels/attention.py).
    scale = -float(node.attrs["scale"]) if node.attrs["windowed"] else float(node.attrs["scale"])

    def attend(qkv, heads: int, width: int, dtype: str) -> relax.Expr:
        return cx.emit(relax.call_dps_packed(
            "vm.builtin.attention_kv_cache_attention_with_fused_qkv",
            [cache, relax.prim_value(node.attrs["layer"]), relax.prim_value(scale), qkv],
            out_ty=relax.TensorType((tokens, heads, width), dtype)), node.name + "_out")

    q, k, v = rows(q, cache_type.num_q_heads), rows(k, cache_type.num_kv_heads), rows(v, cache_type.num_kv_heads)
    if cache_type.storage == "f32":
        out = attend(cx.emit(relax.op.concat([q, k, v], axis=1), node.name + "_qkv"), cache_type.num_q_heads, dim,
                     cache_type.dtype)
    else:
        # The runtime cache takes rows of its storage (ir/kv_storage.py): the target's kernels pack and unpack them.
        shape = geometry(kv_storage(cache_type.storage), cache_type.num_q_heads, cache_type.num_kv_heads, dim)
        pack, unpack = cx.target.kv_row_kernels(cache_type)
        qkv = cx.call_kernel(pack, [cx.emit(x, node.name + part) for x, part in zip((q, k, v), ("_q", "_k", "_v"))],
                             [tokens, shape.q_heads + 2 * shape.kv_heads, shape.width], shape.dtype, node.name + "_qkv")
        out = cx.call_kernel(unpack, [attend(qkv, shape.q_heads, shape.width, shape.dtype)],
                             [tokens, cache_type.num_q_heads, dim], "float32", node.name + "_unpacked")
    return cx.emit(relax.op.reshape(out, [1, tokens, cache_type.num_q_heads, dim]), node.name)


def lower_node(cx: LowerContext, node: Node, args: list[Any]) -> relax.Expr:
    return TABLE[node.op](cx, node, args)
