"""Concatenate the weights of matmuls that read the same input: q/k/v projections, gate/up.

`linear(x, Wq)`, `linear(x, Wk)`, `linear(x, Wv)` become one `linear(x, [Wq; Wk; Wv])`
whose output is sliced back into the three results. One larger matmul streams the
input once, runs one kernel instead of three, and parallelises better. The fused
weight is named after its parts (`...self_attn.{q,k,v}_proj.weight`), so every function
of the module (prefill and decode) shares it. `quantized_linear`s are concatenated the
same way (codes, scales and minimums), when their weights have one form: a GGUF file may
store q and v in different formats, and then they stay apart.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from llmc.ir import PARAM, GraphBuilder, Module, Node, TensorType

from .rewrite import Rule, op, rewrite_once, var

# op -> (positions of its weight arrays, position of its bias, position of its residual)
LINEAR_OPS = {"linear": ((1,), 2, 3), "quantized_linear": ((1, 2, 3), 4, 5)}


def fused_name(names: Sequence[str]) -> str:
    """'a.q_proj.weight', 'a.k_proj.weight' -> 'a.{q,k}_proj.weight'."""
    prefix = os.path.commonprefix(list(names))
    suffix = os.path.commonprefix([n[len(prefix):][::-1] for n in names])[::-1]
    middles = [n[len(prefix):len(n) - len(suffix)] for n in names]
    return f"{prefix}{{{','.join(middles)}}}{suffix}"


def _weight(node: Node | None) -> str | None:
    return node.attrs["weight"] if node is not None and node.op == PARAM else None


Member = tuple["str | None", ...]  # names of the weight arrays (None for an absent optional one), then the bias


def _member(node: Node) -> Member | None:
    """The names of a matmul's weight arrays and bias, if every one present is a parameter and it has no residual."""
    arrays, bias, residual = LINEAR_OPS[node.op]
    names = tuple(_weight(node.inputs[i]) for i in (*arrays, bias))
    present = all(name is not None or node.inputs[i] is None for name, i in zip(names, (*arrays, bias)))
    return names if present and node.inputs[residual] is None and names[0] is not None else None


def _form(node: Node) -> tuple:
    """What must agree for matmuls to share one weight: the op, its attributes, and each input's dtype and the
    shape past its rows (None for an absent one)."""
    inputs = tuple((i.type.dtype, i.type.shape[1:]) if i is not None else None for i in node.inputs[1:])
    return node.op, tuple(sorted(node.attrs.items())), inputs[:len(LINEAR_OPS[node.op][0]) + 1], node.type.dtype


def _groups(module: Module) -> list[tuple[Member, ...]]:
    """Members of the matmuls that share an input and a form."""
    groups: set[tuple[Member, ...]] = set()
    for graph in module.functions.values():
        users = graph.users()
        for node in graph.nodes:
            by_form: dict[tuple, list[Member]] = {}
            for user in users[id(node)]:
                if user.op not in LINEAR_OPS or user.inputs[0] is not node:
                    continue
                member = _member(user)
                if member is not None:
                    by_form.setdefault(_form(user), []).append(member)
            groups.update(tuple(members) for members in by_form.values() if len(members) > 1)
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
        if not any(member[0] in group_of for member in group):
            group_of.update((member[0], group) for member in group)
    fused: dict[tuple[int, tuple[Member, ...]], Node] = {}

    def build(builder: GraphBuilder, m: dict[str, Node]) -> Node | None:
        linear = m["linear"]
        member = _member(linear) if linear.op in LINEAR_OPS else None
        group = group_of.get(member[0]) if member else None
        if group is None:
            return None
        key = (id(linear.inputs[0]), group)
        if key not in fused:
            arrays = [_concatenated(weights, [part[i] for part in group], builder) if group[0][i] else None
                      for i in range(len(member))]
            *parts, bias = arrays
            inputs = [linear.inputs[0], *parts, bias, None]
            fused[key] = builder.op(linear.op, inputs, linear.attrs, name="fused_linear", source=linear.source)
        rows = [module.weights[part[0]].shape[0] for part in group]
        start = sum(rows[:group.index(member)])
        return builder.op("slice", [fused[key]], {"axis": -1, "start": start, "end": start + rows[group.index(member)],
                                                  "step": 1}, name=linear.name, source=linear.source)

    rules = [Rule(f"concatenate {name}s", op(name, var(), var(), name="linear"), build) for name in LINEAR_OPS]
    functions = {name: rewrite_once(graph, rules) for name, graph in module.functions.items()}
    used = {n.attrs["weight"] for g in functions.values() for n in g.params()}
    return Module(functions, {k: v for k, v in weights.items() if k in used}, module.metadata)
