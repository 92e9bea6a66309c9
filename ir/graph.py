"""The graph IR: nodes that apply ops to other nodes, grouped into functions of a module.

Every value is a `Node`. Graph inputs are nodes of op `input`, weights are nodes of op
`param` that name a weight of the module (the weights themselves live beside the
graph, never inside it), and everything else applies a registered op. A `Graph` is one
function (its inputs, its outputs, its nodes in topological order); a `Module` holds
the functions of one model (`forward`, or `prefill` and `decode` after KV-cache
lowering), its weights and its metadata.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import sympy

from . import ops
from .errors import IRError
from .types import TensorType, Type

INPUT = "input"
PARAM = "param"


class Node:
    """One value: `op` applied to `inputs` (None for an absent optional input)."""

    __slots__ = ("name", "op", "inputs", "attrs", "type", "source")

    def __init__(self, name: str, op: str, inputs: Sequence["Node | None"], attrs: Mapping[str, Any], type: Type,
                 source: str | None = None):
        self.name = name
        self.op = op
        self.inputs = tuple(inputs)
        self.attrs = dict(attrs)
        self.type = type
        self.source = source

    def __repr__(self) -> str:
        return f"%{self.name} = {self.op}(...) : {self.type}"

    @property
    def is_leaf(self) -> bool:
        return self.op in (INPUT, PARAM)


class Graph:
    """One function: inputs, outputs and the nodes between, in topological order."""

    def __init__(self, name: str, inputs: Sequence[Node], outputs: Sequence[Node]):
        self.name = name
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.nodes = topological_order(self.inputs, self.outputs)

    def params(self) -> list[Node]:
        return [n for n in self.nodes if n.op == PARAM]

    def users(self) -> dict[int, list[Node]]:
        """id(node) -> the nodes that use it."""
        result: dict[int, list[Node]] = {id(n): [] for n in self.nodes}
        for node in self.nodes:
            for source in node.inputs:
                if source is not None:
                    result[id(source)].append(node)
        return result

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node in self.nodes:
            counts[node.op] = counts.get(node.op, 0) + 1
        return dict(sorted(counts.items()))


def topological_order(inputs: Sequence[Node], outputs: Sequence[Node]) -> list[Node]:
    """Inputs first, then every node the outputs depend on, each after its inputs."""
    order: list[Node] = list(inputs)
    seen = {id(n) for n in inputs}
    on_path: set[int] = set()
    for root in outputs:
        stack: list[tuple[Node, int]] = [(root, 0)]
        while stack:
            node, index = stack.pop()
            if index == 0:
                if id(node) in seen:
                    continue
                if id(node) in on_path:
                    raise IRError(f"the graph has a cycle through %{node.name}")
                on_path.add(id(node))
            if index < len(node.inputs):
                stack.append((node, index + 1))
                child = node.inputs[index]
                if child is not None and id(child) not in seen:
                    if id(child) in on_path:
                        raise IRError(f"the graph has a cycle through %{child.name}")
                    stack.append((child, 0))
            else:
                on_path.discard(id(node))
                seen.add(id(node))
                order.append(node)
    return order


@dataclass
class Module:
    """The functions of one model, the weights they share, and what is known of the model."""

    functions: dict[str, Graph]
    weights: dict[str, np.ndarray]
    metadata: dict[str, Any] = field(default_factory=dict)

    def param_types(self) -> dict[str, TensorType]:
        return {name: TensorType(tuple(w.shape), _dtype_name(w)) for name, w in self.weights.items()}


def _dtype_name(array: np.ndarray) -> str:
    return "bfloat16" if array.dtype.name == "bfloat16" else array.dtype.name


class GraphBuilder:
    """Creates nodes with unique names and types inferred by the op registry."""

    def __init__(self, reserved: Iterable[str] = ()):
        self._names: set[str] = set(reserved)
        self._params: dict[str, Node] = {}

    def unique(self, name: str) -> str:
        base = "".join(c if c.isalnum() or c in "_." else "_" for c in name) or "v"
        candidate, counter = base, 1
        while candidate in self._names:
            candidate = f"{base}_{counter}"
            counter += 1
        self._names.add(candidate)
        return candidate

    def input(self, name: str, type: Type) -> Node:
        if name in self._names:
            raise IRError(f"graph input name {name!r} is used twice")
        self._names.add(name)
        return Node(name, INPUT, (), {}, type)

    def param(self, name: str, type: TensorType) -> Node:
        """The node for weight `name` (one node per weight, shared by all uses)."""
        if name not in self._params:
            self._params[name] = Node(self.unique(name), PARAM, (), {"weight": name}, type)
        return self._params[name]

    def op(self, op: str, inputs: Sequence[Node | None], attrs: Mapping[str, Any] | None = None,
           name: str | None = None, source: str | None = None) -> Node:
        opdef = ops.get(op)
        opdef.check_arity(len(inputs))
        for index, value in enumerate(inputs):
            if value is None and not opdef.optional(index):
                raise IRError(f"op {op}: input {opdef.inputs[index]!r} is required")
        full_attrs = opdef.complete_attrs(attrs or {})
        out_type = opdef.infer([v.type if v is not None else None for v in inputs], full_attrs)
        return Node(self.unique(name or op), op, inputs, full_attrs, out_type, source)


def clone_with(node: Node, inputs: Sequence[Node | None]) -> Node:
    """The same op on new inputs (the type is re-inferred)."""
    if node.is_leaf or list(inputs) == list(node.inputs):
        return node
    opdef = ops.get(node.op)
    out_type = opdef.infer([v.type if v is not None else None for v in inputs], node.attrs)
    return Node(node.name, node.op, inputs, node.attrs, out_type, node.source)


def substitute_dims(graph: Graph, mapping: Mapping[str, Any], name: str | None = None) -> Graph:
    """A copy of `graph` with symbolic dims renamed or replaced (`seq` -> `batch`), in types and attributes."""
    from . import dims as D

    def convert(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return type(value)(convert(v) for v in value)
        if isinstance(value, sympy.Expr):
            return D.substitute(value, mapping)
        return value

    def convert_type(t: Type) -> Type:
        if isinstance(t, TensorType):
            return TensorType(tuple(D.substitute(d, mapping) for d in t.shape), t.dtype)
        return t

    copies: dict[int, Node] = {}
    for node in graph.nodes:
        inputs = [copies[id(i)] if i is not None else None for i in node.inputs]
        attrs = {k: convert(v) for k, v in node.attrs.items()}
        copies[id(node)] = Node(node.name, node.op, inputs, attrs, convert_type(node.type), node.source)
    return Graph(name or graph.name, [copies[id(n)] for n in graph.inputs], [copies[id(n)] for n in graph.outputs])
