"""Fold transposes: cancel pairs of permutes, moving permutes up through the ops between them.

Attention projections are reshaped to (1, tokens, heads, dim), transposed to heads-first
for the rotary embedding, and transposed back to the token-major layout the paged KV
cache stores; the output goes the other way. Each transpose is a copy. This pass
composes `permute(permute(x))` (dropping it when it is the identity) and moves a
permute above elementwise ops, slices and concatenations when every input it would land
on either leads to a permute (so the two fold) or only moves size-1 axes (so it is a free
reshape), until the pair meets and disappears. Reshapes to the same shape are dropped.
"""

from __future__ import annotations

from typing import Sequence

from llmc.ir import GraphBuilder, Module, Node
from llmc.ir.ops.elementwise import ARITHMETIC, COMPARISON, LOGICAL, UNARY

from .rewrite import Rule, op, rewrite, var

ELEMENTWISE = set(ARITHMETIC) | set(COMPARISON) | set(LOGICAL) | set(UNARY) | {"cast", "where", "logical_not"}


def _compose(inner: Sequence[int], outer: Sequence[int]) -> list[int]:
    return [inner[axis] for axis in outer]


def _is_identity(axes: Sequence[int]) -> bool:
    return list(axes) == list(range(len(axes)))


def _moves_only_unit_axes(node: Node, axes: Sequence[int]) -> bool:
    shape = node.type.shape
    kept = [a for a in range(len(shape)) if shape[a] != 1]
    return [a for a in axes if shape[a] != 1] == kept


def _sinkable(node: Node) -> bool:
    return node.op in ELEMENTWISE or node.op in ("slice", "concat")


def _absorbs(node: Node, axes: Sequence[int], budget: int = 32) -> str | None:
    """How `permute(node, axes)` would end up: 'scalar' (nothing to permute), 'fold' (meets a permute,
    possibly after moving up through sinkable ops), 'reshape' (only moves size-1 axes), or None."""
    if node.type.rank == 0:
        return "scalar"
    if node.type.rank != len(axes):
        return None
    if node.op == "permute":
        return "fold"
    if budget > 0 and _sinkable(node):
        landings = [_absorbs(i, axes, budget - 1) for i in node.inputs if i is not None]
        if all(landings) and "fold" in landings:
            return "fold"
    return "reshape" if _moves_only_unit_axes(node, axes) else None


def _permuted(builder: GraphBuilder, node: Node, axes: list[int]) -> Node:
    landing = _absorbs(node, axes)
    if landing == "scalar":
        return node
    if landing == "fold":  # a permute on it, composed now or moved further up in the next round
        return _compose_onto(builder, node, axes)
    return builder.op("reshape", [node], {"shape": [node.type.shape[a] for a in axes]})


def _compose_onto(builder: GraphBuilder, node: Node, axes: list[int]) -> Node:
    if node.op != "permute":
        return builder.op("permute", [node], {"axes": axes})
    composed = _compose(node.attrs["axes"], axes)
    return node.inputs[0] if _is_identity(composed) else builder.op("permute", [node.inputs[0]], {"axes": composed})


def _sink(builder: GraphBuilder, m: dict[str, Node]) -> Node | None:
    outer, inner = m["outer"], m["inner"]
    axes = [a % outer.type.rank for a in outer.attrs["axes"]]
    if inner.op == "permute":
        return _compose_onto(builder, inner, axes)
    if not _sinkable(inner) or _absorbs(inner, axes) != "fold":
        return None
    attrs = dict(inner.attrs)
    if inner.op in ("slice", "concat"):
        attrs["axis"] = axes.index(attrs["axis"] % inner.type.rank)
    inputs = [_permuted(builder, i, axes) if i is not None else None for i in inner.inputs]
    return builder.op(inner.op, inputs, attrs, name=inner.name, source=inner.source)


def _drop_identity(builder: GraphBuilder, m: dict[str, Node]) -> Node | None:
    node = m["outer"]
    source = node.inputs[0]
    if node.op == "permute":
        return source if _is_identity([a % node.type.rank for a in node.attrs["axes"]]) else None
    return source if source.type.same_as(node.type) else None


RULES = [
    Rule("identity permute", op("permute", var(), name="outer"), _drop_identity),
    Rule("identity reshape", op("reshape", var(), name="outer"), _drop_identity),
    Rule("sink permute", op("permute", var("inner"), name="outer"), _sink, single_use=("inner",)),
]


def fold_transposes(module: Module) -> Module:
    functions = {name: rewrite(graph, RULES, max_rounds=24) for name, graph in module.functions.items()}
    return Module(functions, module.weights, module.metadata)
