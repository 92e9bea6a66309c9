"""Depth pruning: whole decoder layers are removed from the stateless graph, the least influential first.

A decoder layer is found as the residual adds its weights feed (passes/decoder_structure.py).
The stream before and after the layer gives its block influence (ShortGPT:
1 - cos(h_in, h_out), averaged over the calibration tokens; passes/pruning_importance.py).
Removing a layer makes each of its residual adds its stream input, so the branch falls
away; KV-cache lowering, which runs next, then gives the cache one layer fewer.
"""

from __future__ import annotations

from llmc.ir import Module, Node

from .decoder_structure import residual_adds
from .pruning_options import Amount, PruningError
from .rewrite import Rule, op, rewrite_once, var


def prune_layers(module: Module, influence: dict[int, float], amount: Amount) -> Module:
    """`module` (before KV-cache lowering) without the `amount` layers of least block influence."""
    graph = module.functions["forward"]
    adds = residual_adds(graph)
    layers = sorted({r.layer for r in adds})
    if not layers:
        raise PruningError("--prune layers: llmc finds no decoder layers in this model (residual adds around "
                           "weights named with a layer index, as `layers.7.`)")
    removed = sorted(sorted(layers, key=lambda layer: (influence[layer], layer))[:amount.count(len(layers), "layers")])
    bypass = {r.node.name: r.node.inputs.index(r.stream) for r in adds if r.layer in removed}

    def skip(builder, m: dict[str, Node]) -> Node | None:
        node = m["add"]
        return node.inputs[bypass[node.name]] if node.name in bypass else None

    pruned = rewrite_once(graph, [Rule("remove a decoder layer", op("add", var(), var(), name="add"), skip)])
    used = {n.attrs["weight"] for n in pruned.params()}
    pruning = {**module.metadata.get("pruning", {}), "layers": {"removed": removed, "of": len(layers)}}
    return Module({"forward": pruned}, {k: v for k, v in module.weights.items() if k in used},
                  {**module.metadata, "pruning": pruning})
