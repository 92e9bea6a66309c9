"""KV-cache lowering: turn the stateless `forward(input_ids) -> logits` into `prefill` and
`decode` entry points that work on a batch of sequences over a paged KV cache.

The imported graph computes attention over the whole sequence with a causal mask. This
pass finds every attention (whole, or spelled out: see attention_patterns), checks that
its mask is causal, or causal within a sliding window (probed also just past any
window-sized constant in its graph, just past the config's `sliding_window`, and at the
context's length up to 4096 tokens, where a window would show; the layers that slide get
`windowed` and the cache the window's size), takes K and V from before their grouped-query
expansion, and replaces it with `paged_attention`, which appends K and V to the cache of its
layer and attends over each sequence's cached tokens.
The tokens of all sequences in a step are packed along the sequence axis, so every other
op stays per-token (a graph that combines tokens elsewhere is refused: token_mixing.py),
and a running count along the sequence is read as the positions; the positions that
fed the rotary embedding (`arange` over the sequence) become an input that the runtime
fills with each token's position in its own sequence. `prefill` also takes the rows
whose logits are wanted and gathers them before the output head; `decode` is the same
step with one token per sequence, its token count renamed `batch`, so codegen can pick
GEMV schedules for it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from llmc.ir import (Graph, GraphBuilder, KVCacheType, LlmcError, Module, Node, TensorType, clone_with, run_graph,
                     verify_module)
from llmc.ir import dims as D
from llmc.ir.graph import substitute_dims
from llmc.ir.ops.attention import attention_scale
from llmc.ir.kv_storage import kv_storage

from . import attention_patterns
from .rewrite import Rule, builder_for, match, op, rewrite, rewrite_once, var
from .token_mixing import first_token_mixing

SWAP_HEADS_AND_TOKENS = [0, 2, 1, 3]
SEQ = "seq"
BATCH = D.DECODE_TOKENS
ROWS = "rows"
MASK_CHECK_LENGTHS = (1, 6, 17)
# The longest window the mask probes look for: a (length, length) mask just past it still evaluates in a second or
# two. Longer windows cap the package's context at the window instead (llmc/compiler.py).
MAX_WINDOW_PROBE = 4096
# Ops that act on each token's logits alone, which may follow the output head (casts, softcapping).
PER_TOKEN_TAIL_OPS = {"cast", "multiply", "divide", "add", "subtract", "tanh"}


class KVCacheLoweringError(LlmcError):
    """An attention the pass cannot lower, named with its node."""


def _where(node: Node) -> str:
    return f"%{node.name}" + (f" ({node.source})" if node.source else "")


def _unrepeated(node: Node) -> Node:
    """K or V before repeat_kv: reshape(broadcast_to(reshape(x))) that copies each head `group` times."""
    expansion = op("reshape", op("broadcast_to", op("reshape", var("x"))))
    bindings = match(expansion, node)
    if bindings is None:
        return node
    x = bindings["x"]
    inserted = x.type.shape[:2] + (1,) + x.type.shape[2:]
    inner = node.inputs[0].inputs[0]
    if x.type.rank != 4 or inner.type.rank != 5 or not all(D.equal(a, b) for a, b in zip(inner.type.shape, inserted)):
        return node
    return x


def _window_lengths(probe: Graph, context: int, config_window: int | None) -> list[int]:
    """Lengths just past the config's window and each integer constant in the mask's graph that could be a
    window's size (a sliding or local window is compared with position differences) and that fit in the context,
    up to MAX_WINDOW_PROBE tokens: at those lengths a windowed mask stops being causal, where the short probes
    cannot tell. A window as long as the context never binds."""
    sizes = {int(n.attrs["value"]) for n in probe.nodes if n.op == "constant" and not isinstance(n.attrs["value"], list)
             and float(n.attrs["value"]).is_integer()} | ({config_window} if config_window else set())
    return sorted({size + extra for size in sizes for extra in (1, 2)
                   if MASK_CHECK_LENGTHS[-1] <= size <= MAX_WINDOW_PROBE and size + extra <= context})


def _kept(probe: Graph, graph: Graph, attention: Node, weights: dict[str, np.ndarray],
          length: int) -> np.ndarray | None:
    """The (length, length) keys each query of the attention keeps at `length` tokens, or None if its mask is more
    than keep-or-drop (a bias) or differs between heads."""
    causal = np.tril(np.ones((length, length), dtype=bool))
    mask = attention.inputs[3]
    if mask is None:
        return causal if attention.attrs["causal"] else np.ones((length, length), dtype=bool)
    inputs = {n.name: np.zeros(n.type.concrete_shape({SEQ: length}), dtype=np.int64) for n in graph.inputs}
    value = np.asarray(run_graph(probe, inputs, weights)[0])
    keep = value if value.dtype == np.bool_ else value > -1e30
    if value.dtype != np.bool_ and np.any((value != 0) & keep):
        return None
    if attention.attrs["causal"]:
        keep = keep & causal
    if keep.shape[-2:] != (length, length):
        return None
    heads = keep.reshape(-1, length, length)
    return heads[0] if np.all(heads == heads[:1]) else None


def _sliding(length: int, window: int) -> np.ndarray:
    """Causal attention within a window: query i keeps key j when 0 <= i - j < window."""
    distance = np.arange(length)[:, None] - np.arange(length)[None, :]
    return (distance >= 0) & (distance < window)


def _mask_window(graph: Graph, attention: Node, weights: dict[str, np.ndarray], context: int,
                 config_window: int | None) -> int | None:
    """None if the attention's mask is the causal mask at every probed length; the window if it is causal within a
    sliding window (the keys the last query keeps, checked at two lengths past it); a KVCacheLoweringError for any
    other mask."""
    probe = Graph("mask_probe", graph.inputs, [attention.inputs[3]] if attention.inputs[3] is not None else [])
    lengths = sorted({*MASK_CHECK_LENGTHS, *_window_lengths(probe, context, config_window),
                      min(context, MAX_WINDOW_PROBE)})
    for length in lengths:
        keep = _kept(probe, graph, attention, weights, length)
        if keep is not None and np.array_equal(keep, _sliding(length, length)):
            continue
        window = int(keep[-1].sum()) if keep is not None else 0
        longer = min(2 * length + 1, context)
        if (window > 0 and np.array_equal(keep, _sliding(length, window))
                and np.array_equal(_kept(probe, graph, attention, weights, longer), _sliding(longer, window))):
            return window
        raise KVCacheLoweringError(f"attention {_where(attention)}: its mask is not the causal mask (nor causal "
                                   f"within a sliding window) at {length} token{'s' * (length > 1)}, so llmc cannot "
                                   "replace it with the KV cache's causal attention")
    return None


SCORE_OPS = {"add", "multiply", "divide", "cast", "where", "tanh"}


def _soft_capped_scores(graph: Graph) -> Node | None:
    """A softmax whose scores pass through tanh on their way from a matmul: attention-logit soft-capping."""
    for softmax in (n for n in graph.nodes if n.op == "softmax"):
        frontier = [(softmax.inputs[0], False)]
        while frontier:
            node, capped = frontier.pop()
            if node is None or node.op not in SCORE_OPS:
                continue
            capped = capped or node.op == "tanh"
            if capped and any(i is not None and i.op == "matmul" for i in node.inputs):
                return softmax
            frontier.extend((i, capped) for i in node.inputs)
    return None


def _attention_layers(graph: Graph, weights: dict[str, np.ndarray], seq: D.Dim, context: int,
                      config_window: int | None) -> tuple[set[str], KVCacheType]:
    """The names of the windowed attention nodes, and the KV cache that all the attention layers share."""
    attentions = [n for n in graph.nodes if n.op == "attention"]
    if not attentions:
        capped = _soft_capped_scores(graph)
        if capped is not None:
            raise KVCacheLoweringError(f"attention {_where(capped)} soft-caps its scores (tanh before the softmax) in "
                                       "a form llmc does not recognise: it knows cap * tanh(scores / cap), as Gemma 2 "
                                       "writes it")
        raise KVCacheLoweringError("the model has no attention llmc recognises (scaled_dot_product_attention or "
                                   "softmax(q @ k^T * scale + mask) @ v), so it cannot get a KV cache")
    shapes = set()
    window_of_mask: dict = {}
    windows: dict[int, int | None] = {}
    for node in attentions:
        q, k, v = node.inputs[0], _unrepeated(node.inputs[1]), _unrepeated(node.inputs[2])
        if q.type.shape[0] != 1 or not D.equal(q.type.shape[2], seq):
            raise KVCacheLoweringError(f"attention {_where(node)}: its queries {q.type} are not (1, heads, seq, dim)")
        if not (D.equal(k.type.shape[2], seq) and D.equal(v.type.shape[2], seq)):
            raise KVCacheLoweringError(f"attention {_where(node)} does not attend over the input sequence itself "
                                       f"(keys {k.type}); only causal self-attention can use a KV cache")
        if q.type.shape[1] % k.type.shape[1] or k.type.shape[1] != v.type.shape[1]:
            raise KVCacheLoweringError(f"attention {_where(node)}: {q.type.shape[1]} query heads cannot share "
                                       f"{k.type.shape[1]} key and {v.type.shape[1]} value heads")
        if q.type.shape[3] != v.type.shape[3]:
            raise KVCacheLoweringError(f"attention {_where(node)}: keys and values of different widths are not "
                                       "supported")
        mask_key = id(node.inputs[3]) if node.inputs[3] is not None else (None, node.attrs["causal"])
        if mask_key not in window_of_mask:
            window_of_mask[mask_key] = _mask_window(graph, node, weights, context, config_window)
        windows[id(node)] = window_of_mask[mask_key]
        shapes.add((q.type.shape[1], k.type.shape[1], q.type.shape[3], q.type.dtype))
    if len(shapes) != 1:
        raise KVCacheLoweringError(f"the attention layers differ in heads or head size ({sorted(shapes)}); "
                                   "llmc's paged KV cache needs them equal")
    caps = {node.attrs["softcap"] for node in attentions}
    if len(caps) != 1:
        raise KVCacheLoweringError(f"the attention layers soft-cap their scores differently ({sorted(caps, key=str)}); "
                                   "llmc's paged KV cache needs one cap for all layers")
    sizes = {w for w in windows.values() if w is not None}
    if len(sizes) > 1:
        raise KVCacheLoweringError(f"the attention layers slide windows of different sizes ({sorted(sizes)}); "
                                   "llmc's paged KV cache needs one size for all windowed layers")
    q_heads, kv_heads, head_dim, dtype = shapes.pop()
    cache_type = KVCacheType(len(attentions), q_heads, kv_heads, head_dim, dtype, softcap=caps.pop(),
                             window=sizes.pop() if sizes else None)
    return {node.name for node in attentions if windows[id(node)] is not None}, cache_type


def _step_graph(graph: Graph, cache_type: KVCacheType, windowed: set[str], builder: GraphBuilder,
                seq: D.Dim) -> Graph:
    """The forward graph over packed tokens, reading and appending the KV cache."""
    (input_ids,) = graph.inputs
    positions = builder.input("positions", TensorType((seq,), "int64"))
    cache = builder.input("kv_cache", cache_type)
    layers = iter(range(cache_type.num_layers))

    def paged(b: GraphBuilder, m: dict[str, Node]) -> Node:
        node = m["attention"]
        q = node.inputs[0]
        scale = attention_scale(node.attrs["scale"], q.type.shape[3])
        token_major = [b.op("permute", [x], {"axes": SWAP_HEADS_AND_TOKENS}, name=node.name + "_in")
                       for x in (q, _unrepeated(node.inputs[1]), _unrepeated(node.inputs[2]))]
        out = b.op("paged_attention", token_major + [cache],
                   {"layer": next(layers), "scale": float(scale), "windowed": node.name in windowed},
                   name=node.name, source=node.source)
        return b.op("permute", [out], {"axes": SWAP_HEADS_AND_TOKENS}, name=node.name + "_out")

    def position(b: GraphBuilder, m: dict[str, Node]) -> Node:
        node = m["arange"]
        if node.attrs["start"] != 0 or node.attrs["step"] != 1 or not D.equal(node.attrs["end"], seq):
            return None
        return positions if node.type.dtype == "int64" else b.op("cast", [positions], {"dtype": node.type.dtype})

    def running_count(b: GraphBuilder, m: dict[str, Node]) -> Node:
        """A cumulative sum of a constant along the sequence (OPT counts its positions so) is the constant times
        each token's position plus one."""
        node, fill = m["cumsum"], m["fill"]
        axis = node.attrs["axis"] % node.type.rank
        others = [d for i, d in enumerate(node.type.shape) if i != axis]
        if not D.equal(node.type.shape[axis], seq) or any(not D.equal(d, 1) for d in others):
            return None
        dtype = node.type.dtype
        count = b.op("add", [b.op("cast", [positions], {"dtype": dtype}),
                             b.op("constant", [], {"value": 1, "dtype": dtype})])
        total = b.op("multiply", [count, b.op("constant", [], {"value": fill.attrs["value"], "dtype": dtype})])
        return b.op("reshape", [total], {"shape": list(node.type.shape)}, name=node.name, source=node.source)

    rules = [Rule("paged_attention", op("attention", var(), var(), var(), name="attention"), paged),
             Rule("positions", op("arange", name="arange"), position),
             Rule("running_count", op("cumsum", op("full", name="fill"), name="cumsum"), running_count)]
    stepped = rewrite_once(graph, rules, builder)
    mixing = first_token_mixing(stepped, SEQ)
    if mixing is not None:
        node, why = mixing
        raise KVCacheLoweringError(f"node {_where(node)} does {why}: the model combines tokens outside attention, "
                                   "which llmc's batched KV-cache steps cannot run")
    return Graph(graph.name, [stepped.inputs[0], positions, cache], stepped.outputs)


def _head_chain(output: Node) -> list[Node]:
    """The output head `linear` and the per-token ops after it, head first; [] if there is none."""
    chain = []
    node = output
    while node.op in PER_TOKEN_TAIL_OPS:
        tensors = [i for i in node.inputs if i is not None and i.op != "constant"]
        if len(tensors) != 1:
            return []
        chain.append(node)
        node = tensors[0]
    return [node] + chain[::-1] if node.op == "linear" else []


def _prefill(step: Graph, builder: GraphBuilder) -> Graph:
    logits = step.outputs[0]
    rows = builder.input("logit_rows", TensorType((D.symbol(ROWS),), "int64"))
    chain = _head_chain(logits)
    if chain:
        hidden = chain[0].inputs[0]
        value = builder.op("take", [hidden, rows], {"axis": 1}, name="logit_hidden")
        previous = hidden
        for node in chain:
            previous, value = node, clone_with(node, [value if i is previous else i for i in node.inputs])
    else:
        value = builder.op("take", [logits, rows], {"axis": 1}, name="logit_rows_taken")
    vocab = logits.type.shape[-1]
    out = builder.op("reshape", [value], {"shape": [D.symbol(ROWS), vocab]}, name="logits")
    return Graph("prefill", [step.inputs[0], step.inputs[1], rows, step.inputs[2]], [out])


def _decode(step: Graph) -> Graph:
    renamed = substitute_dims(step, {SEQ: D.symbol(BATCH)}, name="decode")
    builder = builder_for(renamed)
    logits = renamed.outputs[0]
    out = builder.op("reshape", [logits], {"shape": [D.symbol(BATCH), logits.type.shape[-1]]}, name="logits")
    return Graph("decode", renamed.inputs, [out])


def lower_kv_cache(module: Module, storage: str = "f32") -> Module:
    """`forward(input_ids)` -> `prefill(input_ids, positions, logit_rows, kv_cache)` and
    `decode(input_ids, positions, kv_cache)`, both returning logits of shape (rows, vocab). The cache
    stores keys and values as `storage` says (ir/kv_storage.py)."""
    forward = module.functions.get("forward")
    if forward is None or len(forward.inputs) != 1 or not isinstance(forward.inputs[0].type, TensorType):
        raise KVCacheLoweringError("KV-cache lowering needs a module with forward(input_ids)")
    ids = forward.inputs[0].type
    seq = D.symbol(SEQ)
    if ids.rank != 2 or ids.shape[0] != 1 or not D.equal(ids.shape[1], seq) or ids.dtype not in ("int64", "int32"):
        raise KVCacheLoweringError(f"forward's input must be token ids of shape (1, seq), got {ids}")
    if len(forward.outputs) != 1 or forward.outputs[0].type.rank != 3:
        raise KVCacheLoweringError("forward must return one tensor of logits (1, seq, vocab)")
    graph = rewrite(forward, attention_patterns.RULES)
    context = module.metadata.get("context_length", MAX_WINDOW_PROBE)
    windowed, cache_type = _attention_layers(graph, module.weights, seq, context,
                                             module.metadata.get("config_window"))
    kv_storage(storage).check(cache_type.head_dim)
    cache_type = dataclasses.replace(cache_type, storage=storage)
    builder = builder_for(graph)
    step = _step_graph(graph, cache_type, windowed, builder, seq)
    functions = {"prefill": _prefill(step, builder), "decode": _decode(step)}
    used = {n.attrs["weight"] for g in functions.values() for n in g.params()}
    lowered = Module(functions, {k: v for k, v in module.weights.items() if k in used},
                     {**module.metadata, "kv_cache": kv_cache_metadata(cache_type)})
    verify_module(lowered)
    return lowered


def kv_cache_metadata(cache_type: KVCacheType) -> dict[str, Any]:
    """What a package records of its KV cache, and the bytes it keeps per token."""
    storage = cache_type.storage
    return {"num_layers": cache_type.num_layers, "num_q_heads": cache_type.num_q_heads,
            "num_kv_heads": cache_type.num_kv_heads, "head_dim": cache_type.head_dim, "dtype": cache_type.dtype,
            "storage": storage, "softcap": cache_type.softcap, "window": cache_type.window,
            "bytes_per_token": kv_storage(storage).bytes_per_token(cache_type.num_layers, cache_type.num_kv_heads,
                                                                   cache_type.head_dim)}
