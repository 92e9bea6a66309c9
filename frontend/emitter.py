"""The helper that ATen converters build IR with.

It wraps a `GraphBuilder` and adds what PyTorch semantics need: Python scalars become
typed constants, binary ops cast their operands to the dtype PyTorch's promotion gives
(read from the FX node's fake result), and PyTorch's symbolic sizes become IR dims.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import sympy
import torch

from llmc.ir import GraphBuilder, LlmcError, Node
from llmc.ir import dims as D

from .diagnostics import UnsupportedPattern

_DTYPES = {
    torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.int64: "int64",
    torch.int32: "int32", torch.int8: "int8", torch.uint8: "uint8", torch.bool: "bool",
}


def torch_dtype(dtype: torch.dtype) -> str:
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise LlmcError(f"llmc does not support tensors of dtype {dtype}") from None


class Emitter:
    def __init__(self, builder: GraphBuilder, rename: Callable[[sympy.Expr], D.Dim]):
        self.builder = builder
        self._rename = rename
        self.current_target = ""
        self.current_name = ""
        self.current_source: str | None = None

    # -- nodes ---------------------------------------------------------------------------------
    def op(self, op: str, inputs: Sequence[Node | None], attrs: Mapping[str, Any] | None = None) -> Node:
        return self.builder.op(op, inputs, attrs, name=self.current_name, source=self.current_source)

    def constant(self, value: Any, dtype: str) -> Node:
        return self.op("constant", [], {"value": value, "dtype": dtype})

    def cast(self, x: Node, dtype: str) -> Node:
        return x if x.type.dtype == dtype else self.op("cast", [x], {"dtype": dtype})

    def reshape(self, x: Node, shape: Sequence[Any]) -> Node:
        shape = [self.dim(d) for d in shape]
        if len(shape) == x.type.rank and all(D.equal(a, b) for a, b in zip(shape, x.type.shape)):
            return x
        return self.op("reshape", [x], {"shape": shape})

    def broadcast(self, x: Node, shape: Sequence[D.Dim]) -> Node:
        if len(shape) == x.type.rank and all(D.equal(a, b) for a, b in zip(shape, x.type.shape)):
            return x
        return self.op("broadcast_to", [x], {"shape": list(shape)})

    def binary(self, op: str, x: Any, y: Any, val: Any) -> Node:
        """`op` on tensors or scalars, computed in the dtype PyTorch promotes them to."""
        compute = self.compute_dtype(x, y)
        result = self.op(op, [self.operand(x, compute), self.operand(y, compute)])
        expected = torch_dtype(val.dtype)
        return self.cast(result, expected)

    def where(self, condition: Any, x: Any, y: Any, val: Any) -> Node:
        dtype = torch_dtype(val.dtype)
        return self.op("where", [self.operand(condition, "bool"), self.operand(x, dtype), self.operand(y, dtype)])

    def operand(self, value: Any, dtype: str) -> Node:
        if isinstance(value, Node):
            return self.cast(value, dtype)
        if isinstance(value, (bool, int, float)):
            return self.constant(value, dtype)
        raise UnsupportedPattern(f"operand {value!r} is neither a tensor nor a constant")

    def compute_dtype(self, x: Any, y: Any) -> str:
        return torch_dtype(torch.result_type(_promotion_stand_in(x), _promotion_stand_in(y)))

    # -- shapes --------------------------------------------------------------------------------
    def dim(self, value: Any) -> D.Dim:
        if isinstance(value, torch.SymInt):
            return self._rename(value.node.expr)
        if isinstance(value, sympy.Expr):
            return D.normalize(value)
        return int(value)

    def shape_of(self, val: Any) -> list[D.Dim]:
        return [self.dim(d) for d in val.shape]

    def unsupported(self, what: str) -> UnsupportedPattern:
        return UnsupportedPattern(f"{self.current_target} at {self.current_name}: {what} is not supported")


def _promotion_stand_in(value: Any) -> Any:
    """Something `torch.result_type` ranks like `value`: a tensor of its dtype and rank class, or the scalar."""
    if isinstance(value, Node):
        dtype = {v: k for k, v in _DTYPES.items()}[value.type.dtype]
        return torch.empty((1,) if value.type.rank else (), dtype=dtype)
    return value
