"""Tensor parallelism: one module becomes N shards, Megatron-style, each for one device.

After KV-cache lowering, every layer's heads and every MLP's channels are split evenly:
- column-parallel: shard s keeps its KV groups' rows of the q, k and v projections (with
  their query heads, so GQA stays whole on each shard) and its block of the gate and up
  projections' rows;
- row-parallel: it keeps the matching columns of the output and down projections, whose
  partial products an `all_reduce` sums over the shards (a bias counts on shard 0 only: the
  other shards hold zeros, so that every shard runs the same graph).
Each shard's KV cache holds its own heads. Embeddings and the output head stay whole on
every shard. The shards run the same graph over their own weights: run together by the
interpreter (`llmc.ir.run_sharded`), they compute what the unsharded module does.
"""

from __future__ import annotations

import numpy as np

from llmc.ir import LlmcError, Module, Node

from .decoder_structure import Mlp, attention_projections, mlps, weight_of
from .kv_cache_lowering import kv_cache_metadata
from .prune_heads import group_cuts, kv_cache_type
from .prune_mlp import channel_cuts
from .rewrite import Rule, op, rewrite_once, var
from .slice_weights import slice_weights

PURPOSE = "--tensor-parallel"


class ShardingError(LlmcError):
    """A model that does not split evenly over the shards asked for."""


def _row_parallel(module: Module) -> set[str]:
    graph = module.functions["prefill"]
    return ({weight_of(layer.out) for layer in attention_projections(graph, PURPOSE)}
            | {weight_of(mlp.down) for mlp in mlps(graph)})


def _check_divisible(module: Module, shards: int) -> None:
    cache = kv_cache_type(module)
    if cache.num_kv_heads % shards:
        raise ShardingError(f"{PURPOSE} {shards}: the model's {cache.num_kv_heads} key/value heads (and "
                            f"{cache.num_q_heads} query heads) do not split evenly over {shards} shards")
    for mlp in mlps(module.functions["prefill"]):
        width = module.weights[weight_of(mlp.down)].shape[1]
        if width % shards:
            raise ShardingError(f"{PURPOSE} {shards}: the MLP of {weight_of(mlp.down)} has {width} channels, "
                                f"which do not split evenly over {shards} shards")


def _reduced(module: Module, row_parallel: set[str], shard: int, shards: int) -> Module:
    """Each row-parallel matmul's partial product summed over the shards; its bias zero but on shard 0."""
    weights = dict(module.weights)

    def reduce(builder, m: dict[str, Node]) -> Node | None:
        linear = m["linear"]
        if weight_of(linear) not in row_parallel:
            return None
        bias = weight_of(linear, 2)
        if bias is not None and shard:
            weights[bias] = np.zeros_like(module.weights[bias])
        partial = builder.op("linear", linear.inputs, linear.attrs, name=linear.name + "_partial",
                             source=linear.source)
        return builder.op("all_reduce", [partial], {"shards": shards}, name=linear.name, source=linear.source)

    rule = Rule("sum partial products", op("linear", var(), var(), name="linear"), reduce)
    functions = {name: rewrite_once(graph, [rule]) for name, graph in module.functions.items()}
    return Module(functions, weights, module.metadata)


def shard_module(module: Module, shards: int) -> list[Module]:
    """The `shards` shards of `module` (after KV-cache lowering, before fusion and quantization)."""
    if shards < 1:
        raise ShardingError(f"{PURPOSE} must be at least 1, got {shards}")
    _check_divisible(module, shards)
    row_parallel = _row_parallel(module)
    groups = kv_cache_type(module).num_kv_heads // shards
    result = []
    for shard in range(shards):
        def own_channels(mlp: Mlp, width: int, shard: int = shard) -> np.ndarray:
            return np.arange(shard * width // shards, (shard + 1) * width // shards)

        heads = group_cuts(module, lambda layer, shard=shard: np.arange(shard * groups, (shard + 1) * groups),
                           PURPOSE)
        cuts = {**heads.cuts, **channel_cuts(module, own_channels)}
        metadata = {**module.metadata, "kv_cache": kv_cache_metadata(heads.cache),
                    "tensor_parallel": {"shards": shards, "shard": shard}}
        sliced = slice_weights(module, cuts, heads.reshapes, heads.inputs, metadata, PURPOSE)
        result.append(_reduced(sliced, row_parallel, shard, shards))
    return result
