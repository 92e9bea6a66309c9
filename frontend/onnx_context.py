"""The helper ONNX converters build IR with, and the table they register in.

`OnnxContext` wraps a `GraphBuilder`. It turns known values into IR when an op needs them
as tensors (a few elements become constants; larger ones become weights, one per distinct
content, so tied and duplicated initializers are stored once), folds an op whose inputs
are all known by running the IR op's own reference implementation, and names each IR
node after the ONNX node it comes from. Converters register one function per ONNX op type
in `TABLE`; each takes the context, the op's inputs (IR nodes, `Known` values, or None for
an absent optional input) and its attributes, and returns one value or a list of them.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Mapping, Sequence, Union

import numpy as np

from llmc.ir import GraphBuilder, Node, TensorType, ops
from llmc.ir import dims as D
from llmc.ir.types import DTYPES

from .diagnostics import UnsupportedPattern
from .onnx_values import Known, has_symbols, ir_dtype, known

Value = Union[Node, Known]
Converter = Callable[["OnnxContext", list, dict], Any]

TABLE: dict[str, Converter] = {}

# Known tensors of at most this many elements become IR constants; larger ones become weights.
CONSTANT_LIMIT = 16
# An op on known inputs is folded unless its result is larger than this and than every input:
# folding a transposed weight is free, but a static (4096, 4096) mask is better computed at run time.
FOLD_LIMIT = 1 << 16


def converts(*op_types: str) -> Callable[[Converter], Converter]:
    def register(fn: Converter) -> Converter:
        for op_type in op_types:
            TABLE[op_type] = fn
        return fn
    return register


class OnnxContext:
    def __init__(self, builder: GraphBuilder):
        self.builder = builder
        self.weights: dict[str, np.ndarray] = {}
        self._weight_nodes: dict[tuple, Node] = {}
        self._materialized: dict[int, tuple[Known, Node]] = {}  # holding the Known keeps its id unique
        self.op_type = ""
        self.node_name = ""
        self.source: str | None = None
        self.output_names: list[str] = []

    def begin(self, op_type: str, node_name: str, output_names: Sequence[str], source: str | None) -> None:
        """Start converting one ONNX node: new IR nodes are named and sourced after it."""
        self.op_type, self.node_name, self.source = op_type, node_name, source
        self.output_names = list(output_names)

    def unsupported(self, what: str) -> UnsupportedPattern:
        return UnsupportedPattern(f"{self.op_type} node {self.node_name}: {what} is not supported")

    # -- values --------------------------------------------------------------------------------
    @staticmethod
    def shape(value: Value) -> tuple[D.Dim, ...]:
        return value.type.shape if isinstance(value, Node) else value.shape

    @staticmethod
    def dtype(value: Value) -> str:
        return value.type.dtype if isinstance(value, Node) else value.dtype

    def known(self, values: Any, dtype: str) -> Known:
        """A known result of the node being converted."""
        return known(values, dtype, self.output_names[0] if self.output_names else self.node_name)

    def require_known(self, value: Value | None, what: str) -> Known:
        if not isinstance(value, Known):
            raise self.unsupported(f"{what} computed from tensor data (llmc needs it known at import time)")
        return value

    def tensor(self, value: Value) -> Node:
        """`value` as an IR node: known values become constants, or weights when large."""
        if isinstance(value, Node):
            return value
        if id(value) not in self._materialized:
            dtype = ir_dtype(value.dtype, f"ONNX value {value.name!r}")
            if value.symbolic:
                node = self._symbolic_tensor(value, dtype)
            elif value.array.size <= CONSTANT_LIMIT:
                array = value.array.astype(np.float32) if dtype == "bfloat16" else value.array
                node = self.builder.op("constant", [], {"value": array.tolist(), "dtype": dtype}, name=value.name)
            else:
                node = self._weight(value, dtype)
            self._materialized[id(value)] = (value, node)
        return self._materialized[id(value)][1]

    def _symbolic_tensor(self, value: Known, dtype: str) -> Node:
        """A small tensor of dims, each symbolic entry as a one-element `arange` (codegen evaluates it)."""
        pieces = []
        for entry in value.array.reshape(-1):
            attrs = ({"value": [entry], "dtype": dtype} if isinstance(entry, int) else
                     {"start": entry, "end": entry + 1, "step": 1, "dtype": dtype})
            pieces.append(self.builder.op("constant" if isinstance(entry, int) else "arange", [], attrs,
                                          name=value.name))
        flat = pieces[0] if len(pieces) == 1 else self.builder.op("concat", pieces, {"axis": 0}, name=value.name)
        return self.builder.op("reshape", [flat], {"shape": list(value.shape)}, name=value.name)

    def _weight(self, value: Known, dtype: str) -> Node:
        array = np.ascontiguousarray(value.array)
        key = (dtype, array.shape, hashlib.sha256(array.reshape(-1).view(np.uint8)).digest())
        if key not in self._weight_nodes:
            name, counter = value.name, 1
            while name in self.weights:
                name, counter = f"{value.name}_{counter}", counter + 1
            self.weights[name] = array
            self._weight_nodes[key] = self.builder.param(name, TensorType(array.shape, dtype))
        return self._weight_nodes[key]

    # -- ops -----------------------------------------------------------------------------------
    def op(self, op: str, inputs: Sequence[Value | None], attrs: Mapping[str, Any] | None = None) -> Value:
        """IR op `op` on `inputs`, folded into a known value when all of them are known."""
        opdef = ops.get(op)
        inputs = list(inputs)
        if not opdef.variadic:
            inputs += [None] * (len(opdef.inputs) - len(inputs))  # absent trailing optional inputs
        folded = self._fold(opdef, inputs, attrs or {})
        if folded is not None:
            return folded
        nodes = [self.tensor(v) if v is not None else None for v in inputs]
        return self.builder.op(op, nodes, attrs, name=self.node_name, source=self.source)

    def _fold(self, opdef: ops.OpDef, inputs: list[Value | None], attrs: Mapping[str, Any]) -> Known | None:
        present = [v for v in inputs if v is not None]
        if not all(isinstance(v, Known) and not v.symbolic and v.dtype in DTYPES for v in present):
            return None
        if has_symbols(list(attrs.values())):
            return None
        full_attrs = opdef.complete_attrs(attrs)
        types = [TensorType(v.shape, v.dtype) if v is not None else None for v in inputs]
        out = opdef.infer(types, full_attrs)
        largest = max([FOLD_LIMIT] + [v.array.size for v in present])
        if not isinstance(out, TensorType) or not out.is_static or int(np.prod(out.shape)) > largest:
            return None
        result = opdef.reference([v.array if v is not None else None for v in inputs], full_attrs, out.shape)
        return self.known(result, out.dtype)

    def binary(self, op: str, a: Value, b: Value) -> Value:
        return self.elementwise(op, [a, b])

    def elementwise(self, op: str, inputs: Sequence[Value]) -> Value:
        """A broadcasting op; one-element known operands that do not widen the result become scalars
        (ONNX exporters write scalars as shape [1]; IR patterns look for scalar constants)."""
        rank = max((v.type.rank for v in inputs if isinstance(v, Node)), default=0)
        return self.op(op, [known(v.array.reshape(()), v.dtype, v.name)
                            if isinstance(v, Known) and v.array.size == 1 and 0 < v.array.ndim <= rank else v
                            for v in inputs])

    def cast(self, value: Value, dtype: str) -> Value:
        if self.dtype(value) == dtype:
            return value
        if isinstance(value, Known) and value.symbolic and dtype.startswith("int"):
            return known(value.array, dtype, value.name)
        return self.op("cast", [value], {"dtype": dtype})

    def reshape(self, value: Value, shape: Sequence[D.Dim]) -> Value:
        shape = [D.normalize(d) for d in shape]
        if isinstance(value, Known):
            if not all(isinstance(d, int) for d in shape):
                raise self.unsupported(f"reshaping the known value {value.name} to a symbolic shape {shape}")
            return known(value.array.reshape(shape), value.dtype, value.name)
        if len(shape) == value.type.rank and all(D.equal(a, b) for a, b in zip(shape, value.type.shape)):
            return value
        return self.op("reshape", [value], {"shape": shape})

    def broadcast(self, value: Value, shape: Sequence[D.Dim]) -> Value:
        shape = [D.normalize(d) for d in shape]
        if len(shape) == len(self.shape(value)) and all(D.equal(a, b) for a, b in zip(shape, self.shape(value))):
            return value
        if isinstance(value, Known) and value.symbolic and all(isinstance(d, int) for d in shape):
            return known(np.broadcast_to(value.array, shape), value.dtype, value.name)
        return self.op("broadcast_to", [value], {"shape": shape})

    def scalar(self, number: Any, dtype: str) -> Known:
        return known(np.asarray(number), dtype, f"{self.output_names[0] if self.output_names else 'c'}_scalar")

