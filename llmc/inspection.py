"""`llmc inspect`: a summary of a model's IR (functions, symbolic inputs, op counts, weights and
each weight's format), or one IR op's signature and documentation (`--op NAME`).

It reads a compiled package's graph, or imports a model (without compiling it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llmc.ir import IRError, Module, module_from_json, print_module
from llmc.ir import dims as D
from llmc.ir.ops import all_ops
from llmc.ir.quant_formats import SIXTEEN_BIT_SUFFIX
from llmc.ir.types import TensorType, numpy_dtype
from llmc.runtime.package import GRAPH_FILE, Package, is_package


def load_ir(model: str) -> Module:
    """The IR of a package (of its first shard, for a tensor-parallel one), or of a model imported."""
    if is_package(model):
        package = Package.open(model)
        shards = (package.metadata.get("tensor_parallel") or {}).get("packages")
        if shards:
            return load_ir(str(Path(model) / shards[0]))
        tensors = package.metadata["weights"]["tensors"]
        arrays = {entry["name"]: array.view(numpy_dtype(entry["dtype"]))
                  for entry, array in zip(tensors, package.weights())}
        return module_from_json(package.verified(GRAPH_FILE).read_text(), arrays)
    from llmc.frontend.checkpoint import load_torch_model, resolve_model
    from llmc.frontend.onnx_importer import import_onnx_file
    from llmc.frontend.torch_export import import_torch_model

    source = resolve_model(model)
    if source.kind == "onnx":
        return import_onnx_file(source.path)
    return import_torch_model(load_torch_model(source))


def describe_op(name: str) -> str:
    """The op's signature, then its documentation."""
    ops = all_ops()
    if name not in ops:
        raise IRError(f"llmc's IR has no op {name!r}; its ops are {', '.join(sorted(ops))}")
    return f"{ops[name].signature()}\n\n{ops[name].doc}"


def _size(count: float) -> str:
    for unit in ("", "K", "M", "G"):
        if count < 1000:
            return f"{count:.1f}{unit}" if unit else f"{count:.0f}"
        count /= 1000
    return f"{count:.1f}T"


def describe(module: Module, full_ir: bool = False) -> str:
    if full_ir:
        return print_module(module)
    lines = []
    types = module.param_types()
    elements = sum(int(np.prod(t.shape)) for t in types.values())
    nbytes = sum(int(np.prod(t.shape)) * numpy_dtype(t.dtype).itemsize for t in types.values())
    lines.append(f"parameters: {len(types)} tensors, {_size(elements)} elements, {_size(nbytes)}B")
    symbols = sorted({s for g in module.functions.values() for n in g.inputs if isinstance(n.type, TensorType)
                      for d in n.type.shape for s in D.free_symbols(d)})
    lines.append(f"symbolic dims: {', '.join(symbols) or 'none'}")
    for graph in module.functions.values():
        inputs = ", ".join(f"{n.name}: {n.type}" for n in graph.inputs)
        outputs = ", ".join(str(n.type) for n in graph.outputs)
        lines.append(f"\nfunction {graph.name}({inputs}) -> {outputs}")
        counts = graph.op_counts()
        counts.pop("input", None)
        counts.pop("param", None)
        lines.append(f"  {sum(counts.values())} ops: " + ", ".join(f"{op} {n}" for op, n in counts.items()))
    cache = module.metadata.get("kv_cache")
    if cache:
        f32_bytes = 2 * cache["num_layers"] * cache["num_kv_heads"] * cache["head_dim"] * 4
        per_token = cache.get("bytes_per_token", f32_bytes)
        lines.append(f"\nkv cache: {cache.get('storage', 'f32')}, {cache['num_layers']} layers x "
                     f"{cache['num_kv_heads']} key/value heads x {cache['head_dim']} (queries: {cache['num_q_heads']} heads), "
                     f"{per_token:,} bytes per token ({per_token / f32_bytes:.3f}x f32)"
                     + (f", scores soft-capped at {cache['softcap']:g}" if cache.get("softcap") else "")
                     + (f", a sliding window of {cache['window']} tokens in windowed layers" if cache.get("window")
                        else ""))
    lines += pruning_summary(module.metadata.get("pruning"))
    sharding = module.metadata.get("tensor_parallel")
    if sharding:
        lines.append(f"\ntensor parallel: shard {sharding['shard']} of {sharding['shards']} (its heads and MLP "
                     f"channels; all_reduce sums the partial products of the output and down projections)")
    lines.append("\nweights (name, format):")
    lines += [f"  {name}  {form}" for name, form in sorted(weight_formats(module).items())]
    return "\n".join(lines)


def pruning_summary(pruning: dict | None) -> list[str]:
    """What `--prune` removed, as the pruning passes recorded it."""
    if not pruning:
        return []
    lines = ["\npruned:"]
    if "layers" in pruning:
        removed = pruning["layers"]["removed"]
        lines.append(f"  decoder layers: {len(removed)} of {pruning['layers']['of']} removed "
                     f"({', '.join(map(str, removed))})")
    if "heads" in pruning:
        heads = pruning["heads"]
        (groups, kept_groups), (q_heads, kept_heads) = heads["kv_groups"], heads["q_heads"]
        lines.append(f"  attention: {groups - kept_groups} of {groups} KV groups removed per layer ({q_heads} -> "
                     f"{kept_heads} query heads, {groups} -> {kept_groups} key/value heads)")
        lines.append("    groups removed by layer: " + "; ".join(f"{layer}: {', '.join(map(str, removed))}"
                                                           for layer, removed in heads["removed"].items()))
    if "mlp" in pruning:
        widths = sorted({tuple(w) for w in pruning["mlp"].values()})
        lines.append("  MLP channels: " + ", ".join(f"{old} -> {new} ({(old - new) / old:.1%} removed)"
                                                     for old, new in widths) + f" in {len(pruning['mlp'])} MLPs")
    return lines


# The arrays that hold a weight in its format.
STORAGE_SUFFIXES = (".codes", ".scales", ".mins", *SIXTEEN_BIT_SUFFIX.values())


def weight_formats(module: Module) -> dict[str, str]:
    """Each weight's format: the quantized ones as the quantize pass recorded them (by their
    checkpoint names), the others as their dtype."""
    formats = dict(module.metadata.get("quantization", {}).get("formats", {}))
    for name, param in module.param_types().items():
        if not name.endswith(STORAGE_SUFFIXES):
            formats[name] = param.dtype
    return formats
