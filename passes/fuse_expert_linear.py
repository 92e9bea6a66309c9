"""Fuse a gather of experts' weights and the batched matmul that uses them into `expert_linear`.

transformers' batched experts multiply each token's chosen experts' weights, gathered by index into a
(tokens x chosen, out, in) tensor, by the token as a column: matmul(index(weight, experts), x[..., None]).
That copies every chosen expert's weight before reading it again. `expert_linear` reads the weight rows in place,
which the CPU target runs as a GEMV kernel. Weights that the quantization pass has already turned into gathers of
their codes are left as they are.
"""

from __future__ import annotations

from llmc.ir import PARAM, GraphBuilder, Module, Node
from llmc.ir import dims as D

from .rewrite import Rule, op, rewrite_module, var


def _fused(builder: GraphBuilder, m: dict[str, Node]) -> Node | None:
    weight, experts, column, product = m["weight"], m["experts"], m["column"], m["product"]
    if weight.op != PARAM or weight.type.rank != 3 or experts.type.rank != 1 or column.type.rank != 3:
        return None
    rows, inputs, width = column.type.shape
    if not D.equal(width, 1):
        return None
    x = builder.op("reshape", [column], {"shape": [rows, inputs]}, name=product.name + "_rows")
    y = builder.op("expert_linear", [x, weight, experts], name=product.name + "_experts", source=product.source)
    return builder.op("reshape", [y], {"shape": list(product.type.shape)}, name=product.name, source=product.source)


RULES = [Rule("expert_linear", op("matmul", op("index", var("weight"), var("experts"), name="gather"), var("column"),
                                  name="product"), _fused, single_use=("gather",))]


def fuse_expert_linear(module: Module) -> Module:
    return rewrite_module(module, RULES)
