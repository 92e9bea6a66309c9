"""Concatenate the weights of matmuls that read the same input: q/k/v projections, gate/up.

`linear(x, Wq)`, `linear(x, Wk)`, `linear(x, Wv)` become one `linear(x, [Wq; Wk; Wv])`
whose output is sliced back into the three results. One larger matmul streams the
input once, runs one kernel instead of three, and parallelises better. The fused
weight is named after its parts (`...self_attn.{q,k,v}_proj.weight`), so every function
of the module (prefill and decode) shares it.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from llmc.ir import PARAM, GraphBuilder, Module, Node, TensorType

from .rewrite import Rule, op, rewrite, var


def fused_name(names: Sequence[str]) -> str:
    """'a.q_proj.weight', 'a.k_proj.weight' -> 'a.{q,k}_proj.weight'."""
    prefix = os.path.commonprefix(list(names))
    suffix = os.path.commonprefix([n[len(prefix):][::-1] for n in names])[::-1]
    middles = [n[len(prefix):len(n) - len(suffix)] for n in names]
    return f"{prefix}{{{','.join(middles)}}}{suffix}"


def _weight(node: Node | None) -> str | None:
    return node.attrs["weight"] if node is not None and node.op == PARAM else None


Member = tuple[str, "str | None"]  # (weight name, bias name)


def _groups(module: Module) -> list[tuple[Member, ...]]:
    """(weight, bias) names of the linears that share an input, by (input, dtype, bias or not)."""
    groups: set[tuple[Member, ...]] = set()
    for graph in module.functions.values():
        users = graph.users()
        for node in graph.nodes:
            by_kind: dict[tuple, list[Member]] = {}
            for user in users[id(node)]:
                if user.op != "linear" or user.inputs[0] is not node:
                    continue
                weight, bias = _weight(user.inputs[1]), _weight(user.inputs[2])
                if weight and user.inputs[3] is None and (user.inputs[2] is None or bias):
                    by_kind.setdefault((user.type.dtype, bias is None), []).append((weight, bias))
            groups.update(tuple(members) for members in by_kind.values() if len(members) > 1)
    return sorted(groups, key=str)


def _concatenated(weights: dict[str, np.ndarray], names: Sequence[str], builder: GraphBuilder) -> Node:
    name = fused_name(names)
    if name not in weights:
        weights[name] = np.concatenate([weights[n] for n in names], axis=0)
    return builder.param(name, TensorType(tuple(weights[name].shape), weights[name].dtype.name))


def concat_linears(module: Module) -> Module:
    weights = dict(module.weights)
    group_of: dict[str, tuple[Member, ...]] = {}
    for group in _groups(module):
        if not any(weight in group_of for weight, _ in group):
            group_of.update((weight, group) for weight, _ in group)
    fused: dict[tuple[int, tuple[Member, ...]], Node] = {}

    def build(builder: GraphBuilder, m: dict[str, Node]) -> Node | None:
        linear = m["linear"]
        own = _weight(linear.inputs[1])
        group = group_of.get(own or "")
        if group is None or linear.inputs[3] is not None:
            return None
        key = (id(linear.inputs[0]), group)
        if key not in fused:
            weight = _concatenated(weights, [w for w, _ in group], builder)
            bias = _concatenated(weights, [b for _, b in group], builder) if group[0][1] else None
            fused[key] = builder.op("linear", [linear.inputs[0], weight, bias, None], name="fused_linear",
                                    source=linear.source)
        names = [w for w, _ in group]
        start = sum(module.weights[n].shape[0] for n in names[:names.index(own)])
        return builder.op("slice", [fused[key]], {"axis": -1, "start": start,
                                                  "end": start + module.weights[own].shape[0], "step": 1},
                          name=linear.name, source=linear.source)

    rules = [Rule("concatenate linears", op("linear", var(), var(), name="linear"), build)]
    functions = {name: rewrite(graph, rules, max_rounds=1) for name, graph in module.functions.items()}
    used = {n.attrs["weight"] for g in functions.values() for n in g.params()}
    return Module(functions, {k: v for k, v in weights.items() if k in used}, module.metadata)
