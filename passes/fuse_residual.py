"""Fold a residual add into the matmul before it: `linear(x, W) + r` becomes `linear(x, W, residual=r)`
(and the same for `quantized_linear`).

Every transformer block ends its attention and its MLP with such an add; computing it
in the matmul's epilogue saves a pass over the activations and a kernel launch.
"""

from __future__ import annotations

from llmc.ir import GraphBuilder, Module, Node

from .rewrite import Rule, op, rewrite_module, var

_NO_RESIDUAL = lambda node: node.inputs[-1] is None  # noqa: E731


def _build(builder: GraphBuilder, m: dict[str, Node]) -> Node | None:
    linear, residual = m["linear"], m["residual"]
    if not residual.type.same_as(linear.type):
        return None
    return builder.op(linear.op, [*linear.inputs[:-1], residual], linear.attrs, name=linear.name,
                      source=linear.source)


RULES = [Rule(f"residual into {name}", op("add", op(name, var(), var(), name="linear", where=_NO_RESIDUAL),
                                          var("residual")), _build, single_use=("linear",))
         for name in ("linear", "quantized_linear")]


def fuse_residual(module: Module) -> Module:
    return rewrite_module(module, RULES)
