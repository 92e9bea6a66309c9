"""The verifier: checks the rules every graph must keep, after import and after each pass.

Rules: every input of a node is defined before it (no cycles, no dangling values), node
names are unique, each node's stored type equals what its op's type rule infers, and
every param names a weight of the module with the same type.
"""

from __future__ import annotations

from . import ops
from .errors import IRError
from .graph import INPUT, PARAM, Graph, Module
from .types import TensorType


def verify_graph(graph: Graph, param_types: dict[str, TensorType] | None = None) -> None:
    defined: set[int] = set()
    names: set[str] = set()
    for node in graph.nodes:
        where = f"function {graph.name}, node %{node.name}"
        if node.name in names:
            raise IRError(f"{where}: the name is used twice")
        names.add(node.name)
        for value in node.inputs:
            if value is not None and id(value) not in defined:
                raise IRError(f"{where}: input %{value.name} is used before it is defined")
        if node.op == INPUT:
            if node not in graph.inputs:
                raise IRError(f"{where}: is an input node but not an input of the function")
        elif node.op == PARAM:
            weight = node.attrs.get("weight")
            if param_types is not None:
                if weight not in param_types:
                    raise IRError(f"{where}: names weight {weight!r}, which the module does not have")
                if not param_types[weight].same_as(node.type):
                    raise IRError(f"{where}: has type {node.type} but weight {weight!r} is {param_types[weight]}")
        else:
            opdef = ops.get(node.op)
            try:
                opdef.check_arity(len(node.inputs))
                inferred = opdef.infer([v.type if v is not None else None for v in node.inputs], node.attrs)
            except IRError as error:
                raise IRError(f"{where}: {error}") from None
            if str(inferred) != str(node.type):
                raise IRError(f"{where}: stored type {node.type} but op {node.op} infers {inferred}")
        defined.add(id(node))
    for output in graph.outputs:
        if id(output) not in defined:
            raise IRError(f"function {graph.name}: output %{output.name} is not defined")


def verify_module(module: Module) -> None:
    param_types = module.param_types()
    for graph in module.functions.values():
        verify_graph(graph, param_types)
