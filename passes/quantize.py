"""Weight formats: `linear` becomes `quantized_linear`, and an embedding lookup `quantized_take`,
on grouped quantized weights (ir/quant_formats.py), or keeps its op on a 16-bit float weight.

- auto (the default) keeps the checkpoint's formats: each weight that came as GGUF blocks
  runs in its own format (the file's codes and scales, read without loss by
  ir/ggml_formats.py; a Q4_K_M file keeps its Q4_K, Q5_0, Q6_K and Q8_0 tensors apart),
  16-bit weights stay 16-bit (F16 or BF16) and float32 ones float32.
- q4 and q8 convert float weights to llmc's Q4_1 or Q8_0, f16 to float16; f32 keeps them.
The output head may take its own choice (by default 8-bit when the layers are q4 or q8, as
llama.cpp's Q4 files keep it, since logits are the most sensitive matmul). When the
embedding table is the head's weight (tied embeddings), lookups read the quantized head,
so the package holds one copy of that table. The pass runs before matmuls are
concatenated, so that each weight keeps its own format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from llmc.ir import PARAM, GraphBuilder, Module, Node, TensorType
from llmc.ir.quant_formats import GROUP, SIXTEEN_BIT_SUFFIX, Quantized, input_count, quantize

from .rewrite import Rule, op, rewrite_once, var

FORMATS = {"auto": None, "q4": 4, "q8": 8, "f16": 16, "f32": None}
F16, BF16 = "F16", "BF16"
# The 16-bit float formats (safetensors' and GGUF's names) kept as they are, and the IR dtype of each.
SIXTEEN_BIT_FORMATS = {F16: "float16", BF16: "bfloat16"}


@dataclass(frozen=True)
class SourceWeight:
    """A weight as the checkpoint stores it: its format's name (a GGUF type, F16 or BF16) and its IR
    form (a grouped quantized weight, or a float16 or bfloat16 array)."""

    format: str
    data: Quantized | np.ndarray


def _fitted(source: SourceWeight | None, weight: np.ndarray) -> SourceWeight | None:
    """`source`, or where pruning has cut the weight since, the cut weight in llmc's format of the same width:
    exact for Q4_1 and Q8_0 sources (llmc's q4 and q8 are their forms, and requantizing their dequantized values
    gives back their codes) and 16-bit ones; other formats are rounded a second time into q4 or q8."""
    if source is None:
        return None
    data = source.data
    if isinstance(data, np.ndarray):
        return source if data.shape == weight.shape else SourceWeight(source.format, weight.astype(data.dtype))
    if (data.codes.shape[0], input_count(data.codes.shape, data.bits)) == weight.shape:
        return source
    if weight.shape[1] % GROUP:
        return None
    format = "q4" if data.bits == 4 else "q8"
    return SourceWeight(format, quantize(weight, FORMATS[format]))


def _weight(node: Node) -> str | None:
    return node.attrs["weight"] if node.op == PARAM else None


def _router_weights(module: Module) -> set[str]:
    """The weights of the linears that score experts for a top-k choice (mixture-of-experts routers). They are
    small and decide which weights a token reads, so they keep their format, as llama.cpp keeps its
    `ffn_gate_inp` in float32."""
    found: set[str] = set()
    for graph in module.functions.values():
        frontier = [n.inputs[0] for n in graph.nodes if n.op == "topk"]
        seen: set[int] = set()
        while frontier:
            node = frontier.pop()
            if node is None or id(node) in seen or node.op == PARAM:
                continue
            seen.add(id(node))
            if node.op == "linear":
                found.update(filter(None, [_weight(node.inputs[1])]))
            else:
                frontier.extend(node.inputs)
    return found


def quantize_module(module: Module, layers: str, head: str, sources: Mapping[str, SourceWeight] | None = None
                    ) -> Module:
    vocab = {g.outputs[0].type.shape[-1] for g in module.functions.values()}
    routers = _router_weights(module)
    sources = sources or {}
    weights = dict(module.weights)
    made: dict[str, tuple[list[str], int | None]] = {}
    formats: dict[str, str] = {}

    def chosen(name: str, table_only: bool = False) -> tuple[str, Quantized | np.ndarray] | None:
        """The format `name` gets, and its IR form, or None to keep it as it is. A table read only by lookups
        (an untied embedding) is no head: it keeps the checkpoint's form. Experts' weights (experts, rows,
        inputs) are stored as one row per expert, which a gather dequantizes whole."""
        weight = module.weights[name]
        experts = weight.ndim == 3
        if experts:
            weight = weight.reshape(weight.shape[0], -1)
        choice = "auto" if table_only else layers if experts else head if weight.shape[0] in vocab else layers
        if choice == "auto" and experts:
            return None
        if choice == "auto":
            source = _fitted(sources.get(name), weight)
            return (source.format, source.data) if source else None
        if choice == "f32" or weight.ndim != 2 or weight.dtype.name != "float32":
            return None
        if choice == "f16":
            return F16, weight.astype(np.float16)
        return (choice, quantize(weight, FORMATS[choice])) if weight.shape[1] % GROUP == 0 else None

    def stored(builder: GraphBuilder, name: str, table_only: bool = False
               ) -> tuple[list[Node | None], int | None] | None:
        """The parameters holding `name` in its chosen format, and the code bits (None for 16-bit floats)."""
        if name not in made:
            form = chosen(name, table_only)
            if form is None:
                return None
            formats[name], data = form
            if isinstance(data, np.ndarray):
                arrays = {name + SIXTEEN_BIT_SUFFIX[data.dtype.name]: data}
            else:
                arrays = {f"{name}.codes": data.codes, f"{name}.scales": data.scales}
                arrays.update({f"{name}.mins": data.mins} if data.mins is not None else {})
            weights.update(arrays)
            made[name] = (list(arrays), None if isinstance(data, np.ndarray) else data.bits)
        names, bits = made[name]
        params = [builder.param(n, TensorType(tuple(weights[n].shape), weights[n].dtype.name)) for n in names]
        return (params + [None] * (3 - len(params)) if bits else params), bits

    def on_linear(builder: GraphBuilder, m: dict[str, Node]) -> Node | None:
        node = m["linear"]
        name = _weight(node.inputs[1])
        found = stored(builder, name) if name and name not in routers else None
        if found is None:
            return None
        (params, bits), (x, _, bias, residual) = found, node.inputs
        if bits is None:
            return builder.op("linear", [x, params[0], bias, residual], name=node.name, source=node.source)
        return builder.op("quantized_linear", [x, *params, bias, residual], {"bits": bits},
                          name=node.name, source=node.source)

    def on_take(builder: GraphBuilder, m: dict[str, Node]) -> Node | None:
        node = m["take"]
        name = _weight(node.inputs[0])
        # llmc's own formats change a table only for the head it also is; a checkpoint's format is kept.
        if name is None or node.attrs["axis"] != 0 or (name not in made and name not in sources):
            return None
        found = stored(builder, name, table_only=name not in made)
        if found is None:
            return None
        params, bits = found
        if bits is None:
            rows = builder.op("take", [params[0], node.inputs[1]], {"axis": 0}, name=node.name + "_16bit",
                              source=node.source)
            return builder.op("cast", [rows], {"dtype": "float32"}, name=node.name, source=node.source)
        return builder.op("quantized_take", [*params, node.inputs[1]], {"bits": bits},
                          name=node.name, source=node.source)

    def on_expert_gather(builder: GraphBuilder, m: dict[str, Node]) -> Node | None:
        """Each token's chosen experts' weights, gathered by index (transformers' batched experts): read in
        their format, as rows of a table of one row per expert."""
        node = m["index"]
        name = _weight(node.inputs[0])
        if name is None or module.weights[name].ndim != 3:
            return None
        found = stored(builder, name)
        if found is None:
            return None
        params, bits = found
        if bits is None:
            rows = builder.op("cast", [builder.op("take", [params[0], node.inputs[1]], {"axis": 0},
                                                  name=node.name + "_16bit")], {"dtype": "float32"})
        else:
            rows = builder.op("quantized_take", [*params, node.inputs[1]], {"bits": bits}, name=node.name + "_rows")
        return builder.op("reshape", [rows], {"shape": list(node.type.shape)}, name=node.name, source=node.source)

    linear_rule = Rule("quantize linear", op("linear", var(), var(), name="linear"), on_linear)
    experts_rule = Rule("gather experts' weights in their format", op("index", var(), var(), name="index"),
                        on_expert_gather)
    take_rule = Rule("read embeddings in their format", op("take", var(), var(), name="take"), on_take)
    functions = {name: rewrite_once(graph, [linear_rule, experts_rule])
                 for name, graph in module.functions.items()}
    functions = {name: rewrite_once(graph, [take_rule]) for name, graph in functions.items()}
    used = {n.attrs["weight"] for g in functions.values() for n in g.params()}
    return Module(functions, {k: v for k, v in weights.items() if k in used},
                  {**module.metadata, "quantization": {"layers": layers, "head": head, "formats": formats}})
