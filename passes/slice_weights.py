"""Keep some rows or columns of weights and let every function follow: the step that head and MLP
pruning both end with.

The cut weights' parameters get their new shapes, reshapes that spell a head count out get
the new count, and an input may take a new type (the KV cache with fewer heads); every
node after them is typed again by the op registry. A matmul may also gain a bias term (what
its removed inputs gave on average), in its bias or in a new one. A node whose op cannot
take the new shapes (a norm over all heads at once, say) is reported with the pass that cut.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from llmc.ir import INPUT, PARAM, IRError, Module, Node, TensorType
from llmc.ir.types import Type
from llmc.ir import ops

from .pruning_options import PruningError
from .rewrite import Rule, op, rewrite_once


@dataclass(frozen=True)
class Cut:
    """The indices kept along `axis` of one weight."""

    axis: int
    kept: np.ndarray


def add_cut(cuts: dict[str, Cut], name: str, cut: Cut) -> None:
    """Record `cut`; a weight two functions cut must be cut alike."""
    if name in cuts and (cuts[name].axis != cut.axis or not np.array_equal(cuts[name].kept, cut.kept)):
        raise PruningError(f"weight {name} would be cut two different ways")
    cuts[name] = cut


def slice_weights(module: Module, cuts: Mapping[str, Cut], reshapes: Mapping[str, Mapping[str, list]],
                  input_types: Mapping[str, Type], metadata: Mapping[str, Any], what: str,
                  biases: Mapping[str, np.ndarray] | None = None) -> Module:
    """`module` over the cut weights, with `metadata`; `reshapes` gives per function the new shape of reshapes by
    name, `input_types` new types of inputs by name, `biases` what to add to the bias of the linears over the
    weights named. `what` names the pass in errors."""
    biases = biases or {}
    weights = dict(module.weights)
    for name, cut in cuts.items():
        weights[name] = np.ascontiguousarray(np.take(weights[name], cut.kept, axis=cut.axis))
    types = {name: TensorType(tuple(module.weights[name].shape[:cut.axis]) + (len(cut.kept),)
                              + tuple(module.weights[name].shape[cut.axis + 1:]), module.param_types()[name].dtype)
             for name, cut in cuts.items()}

    def cut_param(builder, m: dict[str, Node]) -> Node | None:
        node = m["param"]
        new = types.get(node.attrs["weight"])
        return Node(node.name, PARAM, (), node.attrs, new, node.source) if new is not None else None

    def retyped_input(builder, m: dict[str, Node]) -> Node | None:
        node = m["input"]
        return Node(node.name, INPUT, (), {}, input_types[node.name]) if node.name in input_types else None

    def with_bias(builder, m: dict[str, Node]) -> Node | None:
        node = m["linear"]
        weight = node.inputs[1]
        if weight.op != PARAM or weight.attrs["weight"] not in biases:
            return None
        addition = biases[weight.attrs["weight"]]
        bias = node.inputs[2]
        if bias is not None and bias.op == PARAM:
            name = bias.attrs["weight"]
            weights[name] = (module.weights[name].astype(np.float32) + addition).astype(module.weights[name].dtype)
            return None
        if bias is not None:
            raise PruningError(f"{what}: %{node.name} adds a bias that is no weight; llmc cannot fold the removed "
                               f"inputs' mean into it")
        name = weight.attrs["weight"].removesuffix(".weight") + ".bias"
        weights[name] = addition.astype(np.float32)
        inputs = [node.inputs[0], weight, builder.param(name, TensorType(addition.shape, "float32")), *node.inputs[3:]]
        return Node(node.name, "linear", inputs, node.attrs,
                    ops.get("linear").infer([i.type if i is not None else None for i in inputs], node.attrs),
                    node.source)

    functions = {}
    for name, graph in module.functions.items():
        shapes = reshapes.get(name, {})

        def reshaped(builder, m: dict[str, Node]) -> Node | None:
            node = m["reshape"]
            if node.name not in shapes:
                return None
            attrs = {**node.attrs, "shape": shapes[node.name]}
            return Node(node.name, "reshape", node.inputs, attrs,
                        ops.get("reshape").infer([node.inputs[0].type], attrs), node.source)

        rules = [Rule("cut weight", op(PARAM, name="param"), cut_param),
                 Rule("retype input", op(INPUT, name="input"), retyped_input),
                 Rule("respell head count", op("reshape", name="reshape"), reshaped),
                 Rule("add the removed inputs' mean", op("linear", name="linear"), with_bias)]
        try:
            functions[name] = rewrite_once(graph, rules)
        except IRError as error:
            raise PruningError(f"{what}: function {name} cannot take the pruned shapes: {error}") from None
    used = {n.attrs["weight"] for g in functions.values() for n in g.params()}
    return Module(functions, {k: v for k, v in weights.items() if k in used}, dict(metadata))
