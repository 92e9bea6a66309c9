"""Lower an llmc `Module` to a TVM IRModule of Relax functions.

Each IR function becomes a Relax function whose parameters are the function's inputs
followed by one tuple holding every weight, in the order `weight_order` returns (the
runtime passes them in that order). A module whose functions take a KV cache also gets
`create_kv_cache`, which builds TVM's paged KV cache with TIR attention kernels for
the target, unless the target keeps a KV cache of its own (tensors its runtime fills).
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx
from tvm.relax.frontend.nn.llm.kv_cache import RopeMode, TIRPagedKVCache

from llmc.ir import INPUT, PARAM, Graph, KVCacheType, LlmcError, Module, TensorType
from llmc.ir.kv_storage import geometry, kv_storage
from llmc.targets import OwnKVCache, Target

from .native_stderr import silenced_native_stderr
from .prim import SymbolTable
from .relax_ops import TABLE, LowerContext, lower_node

CREATE_KV_CACHE = "create_kv_cache"
# TVM's paged-attention kernels are built for one page size (their default); the runtime must use it.
PAGE_SIZE = 16


def weight_order(module: Module) -> list[str]:
    return sorted(module.weights)


def _relax_type(t, symbols: SymbolTable, target: Target, own_cache: OwnKVCache | None):
    if isinstance(t, KVCacheType):
        return own_cache.relax_type(t, symbols) if own_cache is not None else relax.ObjectType()
    return relax.TensorType(symbols.shape(t.shape), target.tensor_dtype(t.dtype))


def _lower_function(bb: relax.BlockBuilder, graph: Graph, weight_types: list[TensorType], weight_index: dict[str, int],
                    target: Target, kernels: dict, own_cache: OwnKVCache | None) -> None:
    symbols = SymbolTable()
    inputs = [relax.Var(n.name, _relax_type(n.type, symbols, target, own_cache)) for n in graph.inputs]
    params = relax.Var("params", relax.TupleType([_relax_type(t, symbols, target, own_cache) for t in weight_types]))
    cx = LowerContext(bb, symbols, target, kernels, own_cache)
    with bb.function(graph.name, inputs + [params]):
        with bb.dataflow():
            values: dict[int, relax.Expr] = {}
            for var, node in zip(inputs, graph.inputs):
                values[id(node)] = var
            for node in graph.nodes:
                if node.op == INPUT:
                    continue
                if node.op == PARAM:
                    values[id(node)] = bb.emit(relax.TupleGetItem(params, weight_index[node.attrs["weight"]]),
                                               name_hint=node.name)
                    continue
                if node.op not in TABLE:
                    raise LlmcError(f"codegen has no lowering for op {node.op} (node %{node.name})")
                args = [values[id(v)] if v is not None else None for v in node.inputs]
                values[id(node)] = lower_node(cx, node, args)
            results = [values[id(n)] for n in graph.outputs]
            output = bb.emit_output(results[0] if len(results) == 1 else relax.Tuple(results))
        bb.emit_func_output(output)


def _kv_cache_creator(cache: KVCacheType, tvm_target) -> tvm.IRModule:
    """`create_kv_cache` and its TIR kernels: TVM's paged KV cache, described in the rows of the cache's storage
    (ir/kv_storage.py). Building it parses TVM's kernel templates (seconds), so a compile reuses the module an
    earlier compile in the process built for the same cache and target; TVM's IR is immutable, so sharing is safe."""
    key = (cache, str(tvm_target))
    if key not in _CREATORS:
        if len(_CREATORS) >= _CREATORS_KEPT:
            _CREATORS.pop(next(iter(_CREATORS)))
        _CREATORS[key] = _build_kv_cache_creator(cache, tvm_target)
    return _CREATORS[key]


_CREATORS: dict[tuple, tvm.IRModule] = {}
_CREATORS_KEPT = 8


def _build_kv_cache_creator(cache: KVCacheType, tvm_target) -> tvm.IRModule:
    shape = geometry(kv_storage(cache.storage), cache.num_q_heads, cache.num_kv_heads, cache.head_dim)
    names = ("max_batch_size", "max_total_seq_len", "prefill_chunk_size", "page_size", "support_sliding_window")
    sizes = {n: tirx.Var(n, "int64") for n in names}
    params = [relax.Var(n + "_shape", relax.ShapeType([sizes[n]])) for n in names]
    bb = relax.BlockBuilder()
    with bb.function(CREATE_KV_CACHE, params), silenced_native_stderr():
        kv = TIRPagedKVCache(
            attn_kind="mha", **sizes, layer_partition=relax.ShapeExpr([0, cache.num_layers]),
            num_hidden_layers=cache.num_layers, num_attention_heads=shape.q_heads,
            num_key_value_heads=shape.kv_heads, qk_head_dim=shape.width, v_head_dim=shape.width,
            mla_original_qk_head_dim=0, mla_original_v_head_dim=0,
            # The graph applies its own rotary embedding (positions are a graph input), so the cache stores
            # keys as given and never rotates them.
            rope_mode=RopeMode.NONE, rope_scale=1, rope_theta=10000, rope_scaling={},
            rope_ext_factors=relax.prim_value(0), rotary_dim=shape.width, enable_disaggregation=False,
            dtype=shape.dtype if cache.storage != "f32" else cache.dtype, target=tvm_target)
        created = bb.emit(kv._expr, name_hint="kv_cache")
        bb.emit_func_output(created)
    return bb.get()


def _kernel_variants(cache: KVCacheType) -> list[str]:
    """What the cache's attention does beyond plain causal attention, in words."""
    variants = []
    if cache.softcap is not None:
        variants.append(f"soft-caps its scores at {cache.softcap:g} (as Gemma 2 does)")
    if cache.window is not None:
        variants.append(f"slides a window of {cache.window} tokens in some layers")
    return variants


def _stores(target: Target, own_cache: OwnKVCache | None, cache: KVCacheType) -> bool:
    """Whether the target's attention kernels read and write the cache's storage format."""
    if cache.storage == "f32":
        return True
    if own_cache is not None:
        return cache.storage in own_cache.storages
    return target.kv_row_kernels(cache) is not None


def lower_module(module: Module, target: Target) -> tvm.IRModule:
    weight_names = weight_order(module)
    types = module.param_types()
    weight_types = [types[n] for n in weight_names]
    weight_index = {n: i for i, n in enumerate(weight_names)}
    refused = [(n, t.dtype) for n, t in zip(weight_names, weight_types) if t.dtype in target.refused_weight_dtypes]
    if refused:
        name, dtype = refused[0]
        raise LlmcError(f"target {target.name} cannot hold {dtype} weights ({len(refused)} of them, {name} first): "
                        f"{target.refused_weight_dtypes[dtype]}. Compile with --quant f16, q8 or q4 (or f32)")
    refused_ops = [n for graph in module.functions.values() for n in graph.nodes if n.op in target.refused_ops]
    if refused_ops:
        node = refused_ops[0]
        raise LlmcError(f"target {target.name} does not run {target.refused_ops[node.op]}: node %{node.name}"
                        + (f" ({node.source})" if node.source else "") + ". Compile this model for another target")
    caches = {n.type for graph in module.functions.values() for n in graph.inputs if isinstance(n.type, KVCacheType)}
    if len(caches) > 1:
        raise LlmcError("the module's functions disagree about the KV cache they use")
    own_cache = target.own_kv_cache(PAGE_SIZE)
    cache = next(iter(caches), None)
    if cache is not None and not _stores(target, own_cache, cache):
        raise LlmcError(f"target {target.name} cannot store the KV cache as {cache.storage} (llmc's quantized and "
                        "16-bit caches run on the cpu and vulkan targets so far); compile for it with --kv-cache f32")
    needs = _kernel_variants(cache) if cache is not None else []
    if needs and not target.attends_with_own_kernels(cache):
        raise LlmcError(f"target {target.name} cannot run this model's attention, which {' and '.join(needs)}: its "
                        "attention kernels are TVM's, which do not. llmc's own CPU kernels do (float32 activations, "
                        "head size a multiple of 8), and vulkan's")
    bb = relax.BlockBuilder()
    kernels: dict = {}
    for graph in module.functions.values():
        _lower_function(bb, graph, weight_types, weight_index, target, kernels, own_cache)
    if cache is None or own_cache is not None:
        return bb.get()
    irmodule = bb.get()
    for global_var, func in _kv_cache_creator(cache, target.tvm_target()).functions.items():
        irmodule[global_var] = func
    for name, func in target.kv_cache_kernels(cache, PAGE_SIZE).items():
        irmodule.update_func(irmodule.get_global_var(name), func.with_attr("global_symbol", name))
    return irmodule
