"""The reference interpreter: runs a graph on NumPy, op by op, with each op's reference code.

It is the ground truth every pass is checked against. Symbolic dims are bound from the
shapes of the actual inputs; symbolic attributes (a reshape to `[1, seq, 9, 64]`) are
evaluated with those bindings before the op runs.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

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


class _Run:
    """One graph being run: its values, each dropped after its last use."""

    def __init__(self, graph: Graph, inputs: Mapping[str, Any], weights: Mapping[str, np.ndarray]):
        self.graph, self.inputs, self.weights = graph, inputs, weights
        self.bindings = bind_dims(graph, inputs)
        self.last_use = {id(source): index for index, node in enumerate(graph.nodes) for source in node.inputs
                         if source is not None}
        self.kept = {id(n) for n in graph.outputs}
        self.values: dict[int, Any] = {}

    def argument(self, index: int, position: int) -> Any:
        return self.values[id(self.graph.nodes[index].inputs[position])]

    def compute(self, index: int) -> Any:
        node = self.graph.nodes[index]
        if node.op == INPUT:
            return self.inputs[node.name]
        if node.op == PARAM:
            return self.weights[node.attrs["weight"]]
        args = [self.values[id(v)] if v is not None else None for v in node.inputs]
        attrs = _concrete(node.attrs, self.bindings)
        out_shape = node.type.concrete_shape(self.bindings) if isinstance(node.type, TensorType) else ()
        result = ops.get(node.op).reference(args, attrs, out_shape)
        if isinstance(node.type, TensorType) and tuple(np.shape(result)) != out_shape:
            raise IRError(f"function {self.graph.name}, node %{node.name} ({node.op}): reference gave shape "
                          f"{np.shape(result)}, type says {out_shape}")
        return result

    def keep(self, index: int, value: Any) -> None:
        node = self.graph.nodes[index]
        self.values[id(node)] = value
        for source in {id(v) for v in node.inputs if v is not None}:
            if self.last_use[source] == index and source not in self.kept:
                del self.values[source]

    def outputs(self) -> list[Any]:
        return [self.values[id(n)] for n in self.graph.outputs]


def run_graph(graph: Graph, inputs: Mapping[str, Any], weights: Mapping[str, np.ndarray],
              observe: Callable[[Node, Any], None] | None = None) -> list[Any]:
    """The graph's outputs. Each value is dropped after its last use, so a long prompt through a deep model
    holds a few layers' values, not all of them; `observe` (when given) sees every node's value as it is made."""
    state = _Run(graph, inputs, weights)
    for index, node in enumerate(graph.nodes):
        state.keep(index, state.compute(index))
        if observe is not None:
            observe(node, state.values[id(node)])
    return state.outputs()


def run_sharded(graphs: Sequence[Graph], inputs: Sequence[Mapping[str, Any]],
                weights: Sequence[Mapping[str, np.ndarray]]) -> list[list[Any]]:
    """The outputs of each tensor-parallel shard of one model (the same nodes over each shard's inputs and
    weights), run op by op together: `all_reduce` gives every shard the sum of its input over all of them."""
    if len({tuple((n.name, n.op) for n in g.nodes) for g in graphs}) != 1:
        raise IRError("the shards of a model must run graphs of the same nodes")
    if not len(graphs) == len(inputs) == len(weights):
        raise IRError(f"{len(graphs)} shards need as many input sets and weight sets, got {len(inputs)} and "
                      f"{len(weights)}")
    states = [_Run(graph, shard_inputs, shard_weights)
              for graph, shard_inputs, shard_weights in zip(graphs, inputs, weights)]
    for index, node in enumerate(graphs[0].nodes):
        if node.op == "all_reduce":
            if node.attrs["shards"] != len(graphs):
                raise IRError(f"node %{node.name} sums over {node.attrs['shards']} shards, {len(graphs)} run")
            total = sum(state.argument(index, 0) for state in states)
            results = [np.asarray(total, dtype=state.argument(index, 0).dtype) for state in states]
        else:
            results = [state.compute(index) for state in states]
        for state, result in zip(states, results):
            state.keep(index, result)
    return [state.outputs() for state in states]


def run(module: Module, function: str, inputs: Mapping[str, Any]) -> list[Any]:
    return run_graph(module.functions[function], inputs, module.weights)
