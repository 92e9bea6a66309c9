"""The reference interpreter: runs a graph on NumPy, op by op, with each op's reference code.

It is the ground truth every pass is checked against. Symbolic dims are bound from the
shapes of the actual inputs; symbolic attributes (a reshape to `[1, seq, 9, 64]`) are
evaluated with those bindings before the op runs.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
import sympy

from . import dims as D
from . import ops
from .errors import IRError
from .graph import INPUT, PARAM, Graph, Module, Node
from .types import TensorType


def bind_dims(graph: Graph, inputs: Mapping[str, Any]) -> dict[str, int]:
    """Symbol bindings implied by the inputs' shapes; raises on a mismatch."""
    bindings: dict[str, int] = {}
    for node in graph.inputs:
        if node.name not in inputs:
            raise IRError(f"function {graph.name} needs input {node.name!r}")
        if not isinstance(node.type, TensorType):
            continue
        value = np.asarray(inputs[node.name])
        if value.ndim != node.type.rank:
            raise IRError(f"input {node.name!r} must have rank {node.type.rank} ({node.type}), got shape {value.shape}")
        for dim, size in zip(node.type.shape, value.shape):
            if isinstance(dim, sympy.Symbol):
                if bindings.setdefault(dim.name, size) != size:
                    raise IRError(f"input {node.name!r}: dim {dim.name} is {bindings[dim.name]} elsewhere, {size} here")
        for dim, size in zip(node.type.shape, value.shape):
            try:
                expected = D.evaluate(dim, bindings)
            except ValueError:
                continue
            if expected != size:
                raise IRError(f"input {node.name!r} must have shape {node.type}, got {value.shape}")
    return bindings


def _concrete(value: Any, bindings: Mapping[str, int]) -> Any:
    if isinstance(value, sympy.Expr):
        return D.evaluate(value, bindings)
    if isinstance(value, (list, tuple)):
        return type(value)(_concrete(v, bindings) for v in value)
    if isinstance(value, dict):
        return {k: _concrete(v, bindings) for k, v in value.items()}
    return value


def run_graph(graph: Graph, inputs: Mapping[str, Any], weights: Mapping[str, np.ndarray],
              observe: Callable[[Node, Any], None] | None = None) -> list[Any]:
    """The graph's outputs. Each value is dropped after its last use, so a long prompt through a deep model
    holds a few layers' values, not all of them; `observe` (when given) sees every node's value as it is made."""
    bindings = bind_dims(graph, inputs)
    last_use = {id(source): index for index, node in enumerate(graph.nodes) for source in node.inputs
                if source is not None}
    kept = {id(n) for n in graph.outputs}
    values: dict[int, Any] = {}
    for index, node in enumerate(graph.nodes):
        if node.op == INPUT:
            values[id(node)] = inputs[node.name]
        elif node.op == PARAM:
            values[id(node)] = weights[node.attrs["weight"]]
        else:
            args = [values[id(v)] if v is not None else None for v in node.inputs]
            attrs = _concrete(node.attrs, bindings)
            out_shape = node.type.concrete_shape(bindings) if isinstance(node.type, TensorType) else ()
            result = ops.get(node.op).reference(args, attrs, out_shape)
            if isinstance(node.type, TensorType) and tuple(np.shape(result)) != out_shape:
                raise IRError(f"function {graph.name}, node %{node.name} ({node.op}): reference gave shape "
                              f"{np.shape(result)}, type says {out_shape}")
            values[id(node)] = result
            for source in {id(v) for v in node.inputs if v is not None}:
                if last_use[source] == index and source not in kept:
                    del values[source]
        if observe is not None:
            observe(node, values[id(node)])
    return [values[id(n)] for n in graph.outputs]


def run(module: Module, function: str, inputs: Mapping[str, Any]) -> list[Any]:
    return run_graph(module.functions[function], inputs, module.weights)
