"""Weight-only quantization: `linear` on float weights becomes `quantized_linear` on grouped
4-bit (Q4_1) or 8-bit (Q8_0) weights; see ir/quant_formats.py.

The output head may use its own format (by default 8-bit, as llama.cpp's Q4 files keep
it, since logits are the most sensitive matmul), or stay float. When the embedding table
is the head's weight (tied embeddings), lookups read the quantized head through
`quantized_take`, so the package holds one copy of that table.
"""

from __future__ import annotations

from llmc.ir import PARAM, GraphBuilder, Module, Node, TensorType
from llmc.ir.quant_formats import GROUP, quantize

from .rewrite import Rule, op, rewrite, var

FORMATS = {"q4": 4, "q8": 8, "f32": None}


def _weight(node: Node) -> str | None:
    return node.attrs["weight"] if node.op == PARAM else None


def quantize_module(module: Module, layers: str, head: str) -> Module:
    vocab = {g.outputs[0].type.shape[-1] for g in module.functions.values()}
    weights = dict(module.weights)
    made: dict[str, tuple[str, str, str | None, int]] = {}

    def bits_for(name: str) -> int | None:
        weight = module.weights[name]
        if weight.ndim != 2 or weight.shape[1] % GROUP or weight.dtype.name != "float32":
            return None
        return FORMATS[head if weight.shape[0] in vocab else layers]

    def quantized(builder: GraphBuilder, name: str, bits: int) -> list[Node | None]:
        if name not in made:
            q = quantize(module.weights[name], bits)
            names = (f"{name}.q{bits}.codes", f"{name}.q{bits}.scales", f"{name}.q{bits}.mins" if bits == 4 else None)
            for key, array in zip(names, (q.codes, q.scales, q.mins)):
                if key is not None:
                    weights[key] = array
            made[name] = (*names, bits)
        codes, scales, mins, _ = made[name]
        return [builder.param(n, TensorType(tuple(weights[n].shape), weights[n].dtype.name)) if n else None
                for n in (codes, scales, mins)]

    def on_linear(builder: GraphBuilder, m: dict[str, Node]) -> Node | None:
        node = m["linear"]
        name = _weight(node.inputs[1])
        bits = bits_for(name) if name else None
        if bits is None:
            return None
        x, _, bias, residual = node.inputs
        return builder.op("quantized_linear", [x, *quantized(builder, name, bits), bias, residual], {"bits": bits},
                          name=node.name, source=node.source)

    def on_take(builder: GraphBuilder, m: dict[str, Node]) -> Node | None:
        node = m["take"]
        name = _weight(node.inputs[0])
        if name not in made or node.attrs["axis"] != 0:
            return None
        codes, scales, mins, bits = made[name]
        return builder.op("quantized_take", [*quantized(builder, name, bits), node.inputs[1]], {"bits": bits},
                          name=node.name, source=node.source)

    linear_rule = Rule("quantize linear", op("linear", var(), var(), name="linear"), on_linear)
    take_rule = Rule("read embeddings from the quantized head", op("take", var(), var(), name="take"), on_take)
    functions = {name: rewrite(graph, [linear_rule], max_rounds=1) for name, graph in module.functions.items()}
    functions = {name: rewrite(graph, [take_rule], max_rounds=1) for name, graph in functions.items()}
    used = {n.attrs["weight"] for g in functions.values() for n in g.params()}
    return Module(functions, {k: v for k, v in weights.items() if k in used},
                  {**module.metadata, "quantization": {"layers": layers, "head": head}})
