"""Attention ops: stateless `attention` (PyTorch's scaled_dot_product_attention, GQA
aware) and `paged_attention`, which reads and appends a paged KV cache.

`paged_attention` is what KV-cache lowering turns `attention` into. Its reference
implementation works on `ReferenceKVCache`, a NumPy model of the runtime's cache, so
the lowered graph can be checked by the interpreter like any other.
"""

from __future__ import annotations

import math

import numpy as np

from .. import dims as D
from ..errors import IRError
from ..types import KVCacheType, TensorType
from . import rules
from .reduction import softmax_reference
from .registry import REQUIRED, as_dtype, define


def _attention_infer(types, attrs):
    q, k, v = (rules.tensor(t, "attention") for t in types[:3])
    rules.same_dtype("attention", [q, k, v])
    if q.rank != 4 or k.rank != 4 or v.rank != 4:
        raise IRError(f"op attention: q, k, v must be (batch, heads, seq, head_dim), got {q}, {k}, {v}")
    q_heads, kv_heads = q.shape[1], k.shape[1]
    if not (isinstance(q_heads, int) and isinstance(kv_heads, int) and q_heads % kv_heads == 0):
        raise IRError(f"op attention: {q_heads} query heads are not a multiple of {kv_heads} key/value heads")
    if not D.equal(q.shape[3], k.shape[3]) or not D.equal(k.shape[2], v.shape[2]):
        raise IRError(f"op attention: q {q}, k {k}, v {v} do not fit together")
    if types[3] is not None:
        mask = rules.tensor(types[3], "attention", "mask")
        rules.broadcast_shapes("attention", mask.shape, q.shape[:3] + (k.shape[2],))
    return q.with_shape(q.shape[:3] + (v.shape[3],))


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None, scale: float,
           softcap: float | None = None) -> np.ndarray:
    """Softmax attention on (..., heads, seq, dim) arrays, key/value heads shared by groups of query heads; scores
    soft-capped to (-softcap, softcap) by cap * tanh(s / cap) when softcap is given."""
    group = q.shape[-3] // k.shape[-3]
    wide = np.float32 if q.dtype.name in ("float16", "bfloat16") else q.dtype
    k = np.repeat(k.astype(wide), group, axis=-3)
    v = np.repeat(v.astype(wide), group, axis=-3)
    scores = np.matmul(q.astype(wide), np.swapaxes(k, -1, -2)) * np.asarray(scale, dtype=wide)
    if softcap is not None:
        cap = np.asarray(softcap, dtype=wide)
        scores = np.tanh(scores / cap) * cap
    if mask is not None:
        scores = np.where(mask, scores, -np.inf) if mask.dtype == np.bool_ else scores + mask.astype(wide)
    with np.errstate(invalid="ignore"):
        return as_dtype(np.matmul(softmax_reference(scores, -1), v), q.dtype.name)


def attention_scale(scale: float | None, head_dim: int) -> float:
    """An attention's scale: its `scale` attribute, or 1 / sqrt(head_dim) when that is None (PyTorch's default)."""
    return scale if scale is not None else 1.0 / math.sqrt(head_dim)


def _attention_reference(values, attrs, out_shape):
    q, k, v, mask = values
    scale = attention_scale(attrs["scale"], q.shape[-1])
    if attrs["causal"]:
        causal = np.tril(np.ones((q.shape[-2], k.shape[-2]), dtype=bool))
        mask = causal if mask is None else (mask & causal if mask.dtype == np.bool_ else np.where(causal, mask, -np.inf))
    return attend(q, k, v, mask, scale, attrs["softcap"])


define("attention", ("q", "k", "v", "mask?"), _attention_infer, _attention_reference,
       "softmax(q @ k^T * scale + mask) @ v over (batch, heads, seq, head_dim); a bool mask keeps True "
       "entries, a float mask is added; `causal` adds PyTorch's top-left causal mask; key/value heads "
       "are shared by groups of query heads; `softcap` soft-caps the scaled scores s to "
       "softcap * tanh(s / softcap) before the mask (Gemma 2).",
       attrs={"scale": None, "causal": False, "softcap": None})


def _paged_attention_infer(types, attrs):
    q, k, v = (rules.tensor(t, "paged_attention") for t in types[:3])
    cache = types[3]
    if not isinstance(cache, KVCacheType):
        raise IRError(f"op paged_attention: the 4th input must be the KV cache, got {cache}")
    if not 0 <= attrs["layer"] < cache.num_layers:
        raise IRError(f"op paged_attention: layer {attrs['layer']} is outside the cache's {cache.num_layers} layers")
    if attrs["windowed"] and cache.window is None:
        raise IRError(f"op paged_attention: layer {attrs['layer']} is windowed but the cache has no window")
    want_q = (1, q.shape[1], cache.num_q_heads, cache.head_dim)
    want_kv = (1, q.shape[1], cache.num_kv_heads, cache.head_dim)
    for t, want in ((q, want_q), (k, want_kv), (v, want_kv)):
        if t.rank != 4 or not all(D.equal(a, b) for a, b in zip(t.shape, want)) or t.dtype != cache.dtype:
            raise IRError(f"op paged_attention: got {t}, the cache needs {TensorType(want, cache.dtype)}")
    return q


def _paged_attention_reference(values, attrs, out_shape):
    q, k, v, cache = values
    heads_first = [np.ascontiguousarray(np.swapaxes(t, 1, 2)) for t in (q, k, v)]
    out = cache.attend(attrs["layer"], *heads_first, attrs["scale"], attrs["windowed"])
    return np.ascontiguousarray(np.swapaxes(out, 1, 2))


define("paged_attention", ("q", "k", "v", "cache"), _paged_attention_infer, _paged_attention_reference,
       "Causal attention of the tokens of the current batch (q, k, v of shape (1, tokens, heads, head_dim), "
       "token-major as the cache stores them, the tokens of all sequences packed one after another) over each "
       "sequence's cached keys and values; appends k and v to the cache of `layer` first. Scores are "
       "soft-capped when the cache type says so; a `windowed` layer sees only the keys fewer than the cache's "
       "`window` positions behind each query.",
       attrs={"layer": REQUIRED, "scale": REQUIRED, "windowed": False})
