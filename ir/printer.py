"""A readable text form of modules and graphs (`llmc inspect --ir`).

Weights print as `@name` where they are used and as one declaration line each at the
top; nodes print as `%name = op(operands, attr=value) : type`.
"""

from __future__ import annotations

from typing import Any

import sympy

from .graph import INPUT, PARAM, Graph, Module, Node
from .serialize import IR_VERSION


def format_attr(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_attr(v) for v in value) + "]"
    if isinstance(value, sympy.Expr):
        return str(value)
    if isinstance(value, str):
        return repr(value)
    return repr(value)


def _operand(node: Node | None) -> str:
    if node is None:
        return "none"
    if node.op == PARAM:
        return "@" + node.attrs["weight"]
    return "%" + node.name


def print_graph(graph: Graph) -> str:
    params = ", ".join(f"%{n.name}: {n.type}" for n in graph.inputs)
    results = ", ".join(str(n.type) for n in graph.outputs)
    lines = [f"func {graph.name}({params}) -> ({results}) {{"]
    for node in graph.nodes:
        if node.op in (INPUT, PARAM):
            continue
        operands = [_operand(v) for v in node.inputs]
        attrs = [f"{k}={format_attr(v)}" for k, v in node.attrs.items()]
        lines.append(f"  %{node.name} = {node.op}({', '.join(operands + attrs)}) : {node.type}")
    lines.append("  return " + ", ".join(_operand(n) for n in graph.outputs))
    lines.append("}")
    return "\n".join(lines)


def print_module(module: Module) -> str:
    lines = [f"# llmc IR v{IR_VERSION}"]
    for name, t in module.param_types().items():
        lines.append(f"param @{name} : {t}")
    for graph in module.functions.values():
        lines.append("")
        lines.append(print_graph(graph))
    return "\n".join(lines) + "\n"
