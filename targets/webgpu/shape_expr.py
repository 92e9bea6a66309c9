"""Integer size expressions in the vulkan package: written from TVM expressions at compile
time, evaluated by the runtime at every step.

Buffer sizes and grid sizes depend on the symbolic dimensions of a step (tokens, rows,
pages). The package stores them as small JSON trees instead of code: an int is a
constant, a string names a dimension of the step, `["dim", p, d]` is dimension d of a
kernel function's parameter p, and `[op, a, b]` combines two trees.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence, Union

from tvm import tirx

Expr = Union[int, str, list]

_BINARY: dict[str, Callable[[int, int], int]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "//": lambda a, b: a // b,
    "%": lambda a, b: a % b,
    "min": min,
    "max": max,
}


def from_tvm(expr, leaf: Callable[[object], Expr]) -> Expr:
    """The tree of a TVM integer expression; `leaf` turns each variable into a tree."""
    operators = {tirx.Add: "+", tirx.Sub: "-", tirx.Mul: "*", tirx.FloorDiv: "//", tirx.FloorMod: "%",
                 tirx.Min: "min", tirx.Max: "max"}
    if isinstance(expr, int):
        return expr
    if isinstance(expr, tirx.IntImm):
        return int(expr.value)
    if isinstance(expr, tirx.Var):
        return leaf(expr)
    if isinstance(expr, tirx.Cast) and expr.dtype.startswith(("int", "uint")):
        return from_tvm(expr.value, leaf)
    for kind, name in operators.items():
        if isinstance(expr, kind):
            return [name, from_tvm(expr.a, leaf), from_tvm(expr.b, leaf)]
    raise ValueError(f"the size expression {expr} uses {type(expr).__name__}, which the vulkan runtime cannot evaluate")


def evaluate(expr: Expr, names: Mapping[str, int], dims: Sequence[Sequence[int]] = ()) -> int:
    """The value of `expr` given the step's dimensions by name and the shapes of a kernel's parameters."""
    if isinstance(expr, int):
        return expr
    if isinstance(expr, str):
        return names[expr]
    if expr[0] == "dim":
        return dims[expr[1]][expr[2]]
    return _BINARY[expr[0]](evaluate(expr[1], names, dims), evaluate(expr[2], names, dims))
