"""ONNX converters for computation: elementwise math, reductions, matmuls and the fused LLM ops
of opset 23 (Attention, RotaryEmbedding, RMSNormalization).

Each converter maps one ONNX op type onto IR ops. Fused ONNX ops are spelled out the way
PyTorch models write them (RMSNorm as `weight * (x * rsqrt(mean(x ** 2) + eps))`, rotary
embedding as slices, multiplies and a concat) so the passes that recognise those forms
in torch exports recognise them here too; `Attention` becomes the IR's `attention`. A
MatMul by a 2-D weight becomes `linear` with the weight stored transposed, as PyTorch
stores it, so the passes that work on linear layers see ONNX models the same way.
"""

from __future__ import annotations

import numpy as np

from llmc.ir import Node

from .onnx_context import OnnxContext, Value, converts
from .onnx_shape_ops import axes_argument, positive_axis
from .onnx_values import Known, compare, extremum, integer_divide, is_integer, known

# ---- elementwise ---------------------------------------------------------------------------------

_ARITHMETIC = {"Add": ("add", np.add), "Sub": ("subtract", np.subtract), "Mul": ("multiply", np.multiply)}


def _is_symbolic(*values: Value) -> bool:
    return all(isinstance(v, Known) for v in values) and any(v.symbolic for v in values)


def _arithmetic(ir_op: str, fn):
    def convert(cx: OnnxContext, inputs, attrs):
        a, b = inputs
        if _is_symbolic(a, b):
            return cx.known(fn(a.array.astype(object), b.array.astype(object)), a.dtype)
        if ir_op == "multiply":
            silu = _silu(cx, a, b)
            if silu is not None:
                return silu
        return cx.binary(ir_op, a, b)
    return convert


def _silu(cx: OnnxContext, a: Value, b: Value) -> Value | None:
    """x * sigmoid(x) is SiLU: one op, as PyTorch exports it."""
    for x, gate in ((a, b), (b, a)):
        if isinstance(gate, Node) and gate.op == "sigmoid" and gate.inputs[0] is x:
            return cx.op("silu", [x])
    return None


for _onnx_name, (_ir_name, _fn) in _ARITHMETIC.items():
    converts(_onnx_name)(_arithmetic(_ir_name, _fn))


@converts("Div")
def _div(cx, inputs, attrs):
    a, b = inputs
    if is_integer(cx.dtype(a)):
        if isinstance(a, Known) and isinstance(b, Known):
            return cx.known(integer_divide(a.array, b.array), a.dtype)
        # ONNX truncates and the IR floors; they agree on the non-negative sizes LLM graphs divide.
        return cx.binary("floor_divide", a, b)
    if (isinstance(b, Node) and b.op == "sqrt" and isinstance(a, Known) and a.array.size == 1
            and a.array.ndim <= b.type.rank and float(a.array.reshape(())) == 1.0):
        return cx.op("rsqrt", [b.inputs[0]])  # 1 / sqrt(x): how PyTorch's rsqrt exports
    return cx.binary("divide", a, b)


@converts("Pow")
def _pow(cx, inputs, attrs):
    base, exponent = inputs
    return cx.binary("power", base, cx.cast(exponent, cx.dtype(base)))


@converts("Mod")
def _mod(cx, inputs, attrs):
    if attrs.get("fmod", 0):
        raise cx.unsupported("Mod with fmod=1")
    a, b = inputs
    if _is_symbolic(a, b):
        return cx.known(np.mod(a.array.astype(object), b.array.astype(object)), a.dtype)
    return cx.binary("remainder", a, b)


def _extremum(kind: str, ir_op: str):
    def convert(cx, inputs, attrs):
        result = inputs[0]
        for other in inputs[1:]:
            if _is_symbolic(result, other):
                result = cx.known(extremum(kind, result.array, other.array), result.dtype)
            else:
                result = cx.binary(ir_op, result, other)
        return result
    return convert


converts("Max")(_extremum("max", "maximum"))
converts("Min")(_extremum("min", "minimum"))

_COMPARISONS = {"Equal": "equal", "Less": "less", "LessOrEqual": "less_equal", "Greater": "greater",
                "GreaterOrEqual": "greater_equal"}


def _comparison(ir_op: str):
    def convert(cx, inputs, attrs):
        a, b = inputs
        if _is_symbolic(a, b):
            return cx.known(compare(ir_op, a.array, b.array, f"{cx.op_type} node {cx.node_name}"), "bool")
        return cx.binary(ir_op, a, b)
    return convert


for _onnx_name, _ir_name in _COMPARISONS.items():
    converts(_onnx_name)(_comparison(_ir_name))

for _onnx_name, _ir_name in {"And": "logical_and", "Or": "logical_or", "Xor": "not_equal"}.items():
    converts(_onnx_name)(lambda cx, inputs, attrs, _ir_name=_ir_name: cx.binary(_ir_name, *inputs))

_UNARY = {"Exp": "exp", "Log": "log", "Sqrt": "sqrt", "Sin": "sin", "Cos": "cos", "Tanh": "tanh", "Erf": "erf", "Floor": "floor",
          "Sigmoid": "sigmoid", "Abs": "abs", "Not": "logical_not"}

for _onnx_name, _ir_name in _UNARY.items():
    converts(_onnx_name)(lambda cx, inputs, attrs, _ir_name=_ir_name: cx.op(_ir_name, [inputs[0]]))


@converts("Neg")
def _neg(cx, inputs, attrs):
    x = inputs[0]
    if _is_symbolic(x):
        return cx.known(-x.array, x.dtype)
    return cx.op("negative", [x])


@converts("Reciprocal")
def _reciprocal(cx, inputs, attrs):
    x = inputs[0]
    if isinstance(x, Node) and x.op == "sqrt":  # ONNX has no rsqrt; PyTorch's rsqrt exports as 1/sqrt
        return cx.op("rsqrt", [x.inputs[0]])
    return cx.binary("divide", cx.scalar(1, cx.dtype(x)), x)


@converts("Relu")
def _relu(cx, inputs, attrs):
    return cx.binary("maximum", inputs[0], cx.scalar(0, cx.dtype(inputs[0])))


@converts("IsNaN")
def _is_nan(cx, inputs, attrs):
    return cx.binary("not_equal", inputs[0], inputs[0])


@converts("Gelu")
def _gelu(cx, inputs, attrs):
    return cx.op("gelu_tanh" if attrs.get("approximate", "none") == "tanh" else "gelu", [inputs[0]])


@converts("Clip")
def _clip(cx, inputs, attrs):
    x = inputs[0]
    if len(inputs) > 1 and inputs[1] is not None:
        x = cx.binary("maximum", x, inputs[1])
    if len(inputs) > 2 and inputs[2] is not None:
        x = cx.binary("minimum", x, inputs[2])
    return x


@converts("Where")
def _where(cx, inputs, attrs):
    condition, x, y = inputs
    if _is_symbolic(*inputs):
        return cx.known(np.where(condition.array, x.array.astype(object), y.array.astype(object)), x.dtype)
    return cx.elementwise("where", [condition, x, y])


# ---- reductions ----------------------------------------------------------------------------------

def _reduction(ir_op: str | None, fold):
    """A reduction over `axes`; on known shape values (and for ReduceProd, which the IR lacks) it is folded."""
    def convert(cx, inputs, attrs):
        x = inputs[0]
        axes = axes_argument(cx, inputs, attrs, 1)
        keepdims = bool(attrs.get("keepdims", 1))
        if axes is None and attrs.get("noop_with_empty_axes", 0):
            return x
        if isinstance(x, Known) and fold is not None and (x.symbolic or ir_op is None):
            return cx.known(fold(x.array, axis=None if axes is None else tuple(axes), keepdims=keepdims), x.dtype)
        if ir_op is None:
            raise cx.unsupported(f"{cx.op_type} of a tensor computed at run time")
        return cx.op(ir_op, [x], {"axes": axes, "keepdims": keepdims})
    return convert


for _onnx_name, (_ir_name, _fold) in {"ReduceMean": ("mean", None), "ReduceSum": ("sum", np.sum),
                                      "ReduceMax": ("max", None), "ReduceMin": ("min", None),
                                      "ReduceProd": (None, np.prod)}.items():
    converts(_onnx_name)(_reduction(_ir_name, _fold))


@converts("Softmax", "LogSoftmax")
def _softmax(cx, inputs, attrs):
    return cx.op("softmax" if cx.op_type == "Softmax" else "log_softmax", [inputs[0]], {"axis": attrs.get("axis", -1)})


@converts("CumSum")
def _cumsum(cx, inputs, attrs):
    if attrs.get("exclusive", 0) or attrs.get("reverse", 0):
        raise cx.unsupported("CumSum with exclusive or reverse")
    axis = int(cx.require_known(inputs[1], "the axis").array)
    return cx.op("cumsum", [inputs[0]], {"axis": axis})


# ---- linear algebra ------------------------------------------------------------------------------

def _transposed(weight: Known) -> Known:
    return known(np.ascontiguousarray(weight.array.T), weight.dtype, weight.name)


@converts("MatMul")
def _matmul(cx, inputs, attrs):
    a, b = inputs
    if len(cx.shape(a)) < 2 or len(cx.shape(b)) < 2:
        raise cx.unsupported("MatMul of a 1-D operand")
    if isinstance(a, Node) and isinstance(b, Known) and len(b.shape) == 2:
        return cx.op("linear", [a, _transposed(b)])
    return cx.op("matmul", [a, b])


@converts("Gemm")
def _gemm(cx, inputs, attrs):
    a, b = inputs[:2]
    c = inputs[2] if len(inputs) > 2 else None
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    if attrs.get("transA", 0):
        a = cx.op("permute", [a], {"axes": [1, 0]})
    bias = c if isinstance(c, Known) and len(c.shape) == 1 and beta == 1.0 and alpha == 1.0 else None
    if isinstance(b, Known):
        y = cx.op("linear", [a, b if attrs.get("transB", 0) else _transposed(b), bias])
    else:
        y = cx.op("matmul", [a, cx.op("permute", [b], {"axes": [1, 0]}) if attrs.get("transB", 0) else b])
    if alpha != 1.0:
        y = cx.binary("multiply", y, cx.scalar(alpha, cx.dtype(y)))
    if c is not None and bias is None:
        y = cx.binary("add", y, cx.binary("multiply", c, cx.scalar(beta, cx.dtype(y))) if beta != 1.0 else c)
    return y


# ---- normalization -------------------------------------------------------------------------------

def _normalized_axes(attrs: dict, rank: int) -> list[int]:
    axis = positive_axis(attrs.get("axis", -1), rank)
    return [-1] if axis == rank - 1 else list(range(axis, rank))


def _stash(cx: OnnxContext, x: Value, attrs: dict) -> Value:
    """Normalizations compute in float32 when stash_type is 1 (the default)."""
    return cx.cast(x, "float32") if attrs.get("stash_type", 1) == 1 else x


@converts("RMSNormalization")
def _rms_normalization(cx, inputs, attrs):
    x, scale = inputs
    wide = _stash(cx, x, attrs)
    axes = _normalized_axes(attrs, len(cx.shape(x)))
    squares = cx.binary("power", wide, cx.scalar(2.0, cx.dtype(wide)))
    variance = cx.op("mean", [squares], {"axes": axes, "keepdims": True})
    eps = cx.scalar(attrs.get("epsilon", 1e-5), cx.dtype(wide))
    normalized = cx.cast(cx.binary("multiply", wide, cx.op("rsqrt", [cx.binary("add", variance, eps)])), cx.dtype(x))
    return cx.binary("multiply", scale, normalized)


@converts("LayerNormalization")
def _layer_normalization(cx, inputs, attrs):
    x, scale = inputs[:2]
    bias = inputs[2] if len(inputs) > 2 else None
    wide = _stash(cx, x, attrs)
    axes = _normalized_axes(attrs, len(cx.shape(x)))
    centered = cx.binary("subtract", wide, cx.op("mean", [wide], {"axes": axes, "keepdims": True}))
    variance = cx.op("mean", [cx.binary("multiply", centered, centered)], {"axes": axes, "keepdims": True})
    eps = cx.scalar(attrs.get("epsilon", 1e-5), cx.dtype(wide))
    y = cx.cast(cx.binary("multiply", centered, cx.op("rsqrt", [cx.binary("add", variance, eps)])), cx.dtype(x))
    y = cx.binary("multiply", y, scale)
    return cx.binary("add", y, bias) if bias is not None else y


# ---- attention -----------------------------------------------------------------------------------

def _last(cx: OnnxContext, x: Value, start, end, step: int = 1) -> Value:
    return cx.op("slice", [x], {"axis": len(cx.shape(x)) - 1, "start": start, "end": end, "step": step})


@converts("RotaryEmbedding")
def _rotary_embedding(cx, inputs, attrs):
    x, cos, sin = inputs[:3]
    positions = inputs[3] if len(inputs) > 3 else None
    shape = cx.shape(x)
    if len(shape) == 3:
        heads = attrs.get("num_heads", 0)
        if not heads:
            raise cx.unsupported("a 3-D RotaryEmbedding without num_heads")
        x = cx.reshape(x, [shape[0], shape[1], heads, shape[2] // heads])
    head_dim = cx.shape(x)[-1]
    rotary = attrs.get("rotary_embedding_dim", 0) or head_dim
    if positions is not None:
        cos, sin = (cx.op("take", [table, positions], {"axis": 0}) for table in (cos, sin))
    heads_axis = 1 if len(shape) == 4 else 2  # cos/sin are (batch, seq, rotary/2): add the heads axis
    cos, sin = (cx.reshape(t, [*cx.shape(t)[:heads_axis], 1, *cx.shape(t)[heads_axis:]]) for t in (cos, sin))
    rotated = _last(cx, x, 0, rotary) if rotary != head_dim else x
    if attrs.get("interleaved", 0):
        x1, x2 = _last(cx, rotated, 0, rotary, 2), _last(cx, rotated, 1, rotary, 2)
    else:
        x1, x2 = _last(cx, rotated, 0, rotary // 2), _last(cx, rotated, rotary // 2, rotary)
    real = cx.binary("subtract", cx.binary("multiply", cos, x1), cx.binary("multiply", sin, x2))
    imaginary = cx.binary("add", cx.binary("multiply", sin, x1), cx.binary("multiply", cos, x2))
    if attrs.get("interleaved", 0):
        pairs = [cx.reshape(t, [*cx.shape(t), 1]) for t in (real, imaginary)]
        out = cx.reshape(cx.op("concat", pairs, {"axis": -1}), [*cx.shape(real)[:-1], rotary])
    else:
        out = cx.op("concat", [real, imaginary], {"axis": -1})
    if rotary != head_dim:
        out = cx.op("concat", [out, _last(cx, x, rotary, head_dim)], {"axis": -1})
    return cx.reshape(out, shape)


def _heads_first(cx: OnnxContext, x: Value, heads: int) -> Value:
    """(batch, seq, heads * dim) -> (batch, heads, seq, dim), as the 3-D form of Attention implies."""
    batch, seq, hidden = cx.shape(x)
    return cx.op("permute", [cx.reshape(x, [batch, seq, heads, hidden // heads])], {"axes": [0, 2, 1, 3]})


@converts("Attention")
def _attention(cx, inputs, attrs):
    q, k, v = inputs[:3]
    mask = inputs[3] if len(inputs) > 3 else None
    if any(past is not None for past in inputs[4:]):
        raise cx.unsupported("Attention with past key/value inputs (export the model without a KV cache)")
    if attrs.get("softcap", 0.0):
        raise cx.unsupported("Attention with softcap")
    three_d = len(cx.shape(q)) == 3
    if three_d:
        q = _heads_first(cx, q, attrs["q_num_heads"])
        k, v = (_heads_first(cx, t, attrs["kv_num_heads"]) for t in (k, v))
    out = cx.op("attention", [q, k, v, mask], {"scale": attrs.get("scale"), "causal": bool(attrs.get("is_causal", 0))})
    if three_d:
        batch, heads, seq, dim = cx.shape(out)
        out = cx.reshape(cx.op("permute", [out], {"axes": [0, 2, 1, 3]}), [batch, seq, heads * dim])
    return out
