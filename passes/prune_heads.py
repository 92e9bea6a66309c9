"""Width pruning of attention: whole KV groups (a key/value head and the query heads that read it)
are removed from every layer, after KV-cache lowering.

Every layer loses the same number of groups, since one paged KV cache serves all layers;
which groups go is each layer's own choice: those whose query heads score lowest, a head's
score being the fluctuation (passes/pruning_importance.py) of the output projection's
columns it writes. The q, k and v projections lose the groups' rows (and biases), the
output projection their columns (and gains their mean contribution as a bias), and the
cache its heads; GQA stays consistent because a group goes whole. Query heads of group g are
g*G .. g*G+G-1, as repeat_kv lays them out.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np

from llmc.ir import KVCacheType, Module

from .decoder_structure import AttentionProjections, attention_projections, layer_of, weight_of
from .kv_cache_lowering import kv_cache_metadata
from .pruning_importance import Importance
from .pruning_options import Amount
from .slice_weights import Cut, add_cut, slice_weights


@dataclass
class GroupCuts:
    """What keeping some KV groups in every layer cuts: the weights, the reshapes that spell head counts out,
    the KV cache's new type (and the inputs that take it), and the output projections' removed columns."""

    cuts: dict[str, Cut]
    reshapes: dict[str, dict[str, list]]
    cache: KVCacheType
    inputs: dict[str, KVCacheType]
    removed_columns: dict[str, np.ndarray]


def kv_cache_type(module: Module) -> KVCacheType:
    return next(n.type for g in module.functions.values() for n in g.inputs if isinstance(n.type, KVCacheType))


def _respelled(shape: list, old: int, new: int, dim: int) -> list:
    """`shape` with `new` heads for `old`: in the axis before a head_dim axis, or in an axis of old * dim."""
    return [new if d == old and i + 1 < len(shape) and shape[i + 1] == dim else new * dim if d == old * dim else d
            for i, d in enumerate(shape)]


def group_cuts(module: Module, kept_groups: Callable[[AttentionProjections], np.ndarray], purpose: str) -> GroupCuts:
    """The cuts that keep, in each layer, the KV groups `kept_groups` names (sorted; as many in every layer)."""
    cache = kv_cache_type(module)
    heads, groups, dim = cache.num_q_heads, cache.num_kv_heads, cache.head_dim
    per_group = heads // groups
    cuts: dict[str, Cut] = {}
    reshapes: dict[str, dict[str, list]] = {}
    removed: dict[str, np.ndarray] = {}
    kept_count = None
    for name, graph in module.functions.items():
        spelled = reshapes.setdefault(name, {})
        for layer in attention_projections(graph, purpose):
            kept = kept_groups(layer)
            kept_count = len(kept)
            q_rows = (kept[:, None] * per_group * dim + np.arange(per_group * dim)).ravel()
            kv_rows = (kept[:, None] * dim + np.arange(dim)).ravel()
            for linear, rows in ((layer.q, q_rows), (layer.k, kv_rows), (layer.v, kv_rows)):
                for position in (1, 2):
                    if weight_of(linear, position) is not None:
                        add_cut(cuts, weight_of(linear, position), Cut(0, rows))
            add_cut(cuts, weight_of(layer.out), Cut(1, q_rows))
            removed[weight_of(layer.out)] = np.setdiff1d(np.arange(heads * dim), q_rows)
            kept_heads = kept_count * per_group
            for path, (old, new) in (("q", (heads, kept_heads)), ("kv", (groups, kept_count)),
                                     ("out", (heads, kept_heads))):
                for node in layer.paths[path]:
                    if node.op == "reshape":
                        spelled[node.name] = _respelled(node.attrs["shape"], old, new, dim)
    new_cache = dataclasses.replace(cache, num_q_heads=(kept_count or 0) * per_group, num_kv_heads=kept_count or 0)
    inputs = {n.name: new_cache for g in module.functions.values() for n in g.inputs if n.type == cache}
    return GroupCuts(cuts, reshapes, new_cache, inputs, removed)


def prune_heads(module: Module, importance: Importance, amount: Amount) -> Module:
    """`module` (after KV-cache lowering) with `amount` KV groups fewer in every layer."""
    cache = kv_cache_type(module)
    heads, groups = cache.num_q_heads, cache.num_kv_heads
    keep = groups - amount.count(groups, "heads")
    removed_groups: dict[int, list[int]] = {}  # by the layer's index in the checkpoint

    def most_important_groups(layer: AttentionProjections) -> np.ndarray:
        out = weight_of(layer.out)
        scores = importance.channel_scores(out, module.weights[out]).reshape(groups, -1).sum(axis=1)
        kept = np.sort(np.argsort(-scores, kind="stable")[:keep])
        original = layer_of(out)
        removed_groups[layer.layer if original is None else original] = sorted(set(range(groups)) - set(kept.tolist()))
        return kept

    found = group_cuts(module, most_important_groups, "--prune heads")
    biases = {name: importance.compensation(name, module.weights[name], columns)
              for name, columns in found.removed_columns.items() if columns.size}
    metadata = {**module.metadata, "kv_cache": kv_cache_metadata(found.cache),
                "pruning": {**module.metadata.get("pruning", {}),
                            "heads": {"removed": {str(k): v for k, v in sorted(removed_groups.items())},
                                      "kv_groups": [groups, keep], "q_heads": [heads, found.cache.num_q_heads]}}}
    return slice_weights(module, found.cuts, found.reshapes, found.inputs, metadata, "--prune heads", biases)
