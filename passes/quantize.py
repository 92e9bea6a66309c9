"""Weight formats: `linear` becomes `quantized_linear`, and an embedding lookup `quantized_take`,
on grouped quantized weights (ir/quant_formats.py).

- auto (the default) keeps the checkpoint's formats: each weight that came as GGUF blocks
  runs in its own format (the file's codes and scales, read without loss by
  ir/ggml_formats.py; a Q4_K_M file keeps its Q4_K, Q5_0, Q6_K and Q8_0 tensors apart),
  and float weights stay float.
- q4 and q8 convert float weights to llmc's Q4_1 or Q8_0; f32 keeps them float.
The output head may take its own choice (by default 8-bit when the layers are q4 or q8, as
llama.cpp's Q4 files keep it, since logits are the most sensitive matmul). When the
embedding table is the head's weight (tied embeddings), lookups read the quantized head,
so the package holds one copy of that table. The pass runs before matmuls are
concatenated, so that each weight keeps its own format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from llmc.ir import PARAM, GraphBuilder, Module, Node, TensorType
from llmc.ir.quant_formats import GROUP, Quantized, quantize

from .rewrite import Rule, op, rewrite, var

FORMATS = {"auto": None, "q4": 4, "q8": 8, "f32": None}


@dataclass(frozen=True)
class SourceWeight:
    """A weight as the checkpoint stores it: its format's name (a GGUF type) and its IR form."""

    format: str
    quantized: Quantized


def _weight(node: Node) -> str | None:
    return node.attrs["weight"] if node.op == PARAM else None


def quantize_module(module: Module, layers: str, head: str, sources: Mapping[str, SourceWeight] | None = None
                    ) -> Module:
    vocab = {g.outputs[0].type.shape[-1] for g in module.functions.values()}
    sources = sources or {}
    weights = dict(module.weights)
    made: dict[str, tuple[str, str, str | None, int]] = {}
    formats: dict[str, str] = {}

    def chosen(name: str) -> tuple[str, Quantized] | None:
        """The format `name` gets, and its IR form, or None to keep it float."""
        weight = module.weights[name]
        choice = head if weight.shape[0] in vocab else layers
        if choice == "auto":
            source = sources.get(name)
            return (source.format, source.quantized) if source else None
        if choice == "f32" or weight.ndim != 2 or weight.shape[1] % GROUP or weight.dtype.name != "float32":
            return None
        return choice, quantize(weight, FORMATS[choice])

    def quantized(builder: GraphBuilder, name: str) -> tuple[list[Node | None], int] | None:
        if name not in made:
            form = chosen(name)
            if form is None:
                return None
            formats[name], q = form
            names = (f"{name}.codes", f"{name}.scales", f"{name}.mins" if q.mins is not None else None)
            for key, array in zip(names, (q.codes, q.scales, q.mins)):
                if key is not None:
                    weights[key] = array
            made[name] = (*names, q.bits)
        *names, bits = made[name]
        return [builder.param(n, TensorType(tuple(weights[n].shape), weights[n].dtype.name)) if n else None
                for n in names], bits

    def on_linear(builder: GraphBuilder, m: dict[str, Node]) -> Node | None:
        node = m["linear"]
        name = _weight(node.inputs[1])
        arrays = quantized(builder, name) if name else None
        if arrays is None:
            return None
        x, _, bias, residual = node.inputs
        return builder.op("quantized_linear", [x, *arrays[0], bias, residual], {"bits": arrays[1]},
                          name=node.name, source=node.source)

    def on_take(builder: GraphBuilder, m: dict[str, Node]) -> Node | None:
        node = m["take"]
        name = _weight(node.inputs[0])
        # llmc's own formats quantize a table only for the head it also is; a checkpoint's format is kept.
        if name is None or node.attrs["axis"] != 0 or (name not in made and name not in sources):
            return None
        arrays = quantized(builder, name)
        if arrays is None:
            return None
        return builder.op("quantized_take", [*arrays[0], node.inputs[1]], {"bits": arrays[1]},
                          name=node.name, source=node.source)

    linear_rule = Rule("quantize linear", op("linear", var(), var(), name="linear"), on_linear)
    take_rule = Rule("read embeddings in their format", op("take", var(), var(), name="take"), on_take)
    functions = {name: rewrite(graph, [linear_rule], max_rounds=1) for name, graph in module.functions.items()}
    functions = {name: rewrite(graph, [take_rule], max_rounds=1) for name, graph in functions.items()}
    used = {n.attrs["weight"] for g in functions.values() for n in g.params()}
    return Module(functions, {k: v for k, v in weights.items() if k in used},
                  {**module.metadata, "quantization": {"layers": layers, "head": head, "formats": formats}})
