"""Collective ops: what the graphs of a model's tensor-parallel shards exchange.

Each shard runs the same graph over its own slice of the weights; `all_reduce` is where
their partial results meet. The reference interpreter runs it only with all the shards
together (`run_sharded`), so that a shard is never run alone on a partial sum.
"""

from __future__ import annotations

from ..errors import IRError
from . import rules
from .registry import REQUIRED, define


def _all_reduce_infer(types, attrs):
    x = rules.tensor(types[0], "all_reduce")
    if not isinstance(attrs["shards"], int) or attrs["shards"] < 1:
        raise IRError(f"op all_reduce: shards must be a positive count, got {attrs['shards']!r}")
    return x


def _all_reduce_reference(values, attrs, out_shape):
    if attrs["shards"] != 1:
        raise IRError(f"op all_reduce sums a value over {attrs['shards']} shards; run the shards' graphs together "
                      f"(llmc.ir.run_sharded)")
    return values[0]


define("all_reduce", ("x",), _all_reduce_infer, _all_reduce_reference,
       "The sum of x over the `shards` tensor-parallel shards of a model, which every shard receives: where a "
       "row-parallel matmul's partial products meet (Megatron-LM). The interpreter runs it in run_sharded.",
       attrs={"shards": REQUIRED})
