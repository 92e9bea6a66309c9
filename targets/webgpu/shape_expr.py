"""Size expressions of the vulkan package written from TVM expressions at compile time.

The tree form and its evaluation belong to the package format (runtime/webgpu_plan.py);
this module turns TVM's integer expressions into those trees.
"""

from __future__ import annotations

from typing import Callable

from tvm import tirx

from llmc.runtime.webgpu_plan import SizeExpr

_TVM_OPERATORS = {tirx.Add: "+", tirx.Sub: "-", tirx.Mul: "*", tirx.FloorDiv: "//", tirx.FloorMod: "%",
                  tirx.Min: "min", tirx.Max: "max"}


def from_tvm(expr, leaf: Callable[[object], SizeExpr]) -> SizeExpr:
    """The tree of a TVM integer expression; `leaf` turns each variable into a tree."""
    if isinstance(expr, int):
        return expr
    if isinstance(expr, tirx.IntImm):
        return int(expr.value)
    if isinstance(expr, tirx.Var):
        return leaf(expr)
    if isinstance(expr, tirx.Cast) and expr.dtype.startswith(("int", "uint")):
        return from_tvm(expr.value, leaf)
    for kind, name in _TVM_OPERATORS.items():
        if isinstance(expr, kind):
            return [name, from_tvm(expr.a, leaf), from_tvm(expr.b, leaf)]
    raise ValueError(f"the size expression {expr} uses {type(expr).__name__}, which the vulkan runtime cannot evaluate")
