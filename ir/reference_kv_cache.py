"""A NumPy model of the paged KV cache, for the IR interpreter.

It follows the runtime cache's protocol: sequences are added, each forward step names
the sequences it appends to and how many tokens each gets (`begin_forward`), the
tokens of those sequences are packed one after another, and every attention layer
appends its keys and values before attending causally over the sequence so far. Keys and
values are kept as the cache's storage format would give them back (ir/kv_storage.py), so a
quantized cache has an exact reference too.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import IRError
from .kv_storage import kv_storage
from .ops.attention import attend
from .types import KVCacheType


class ReferenceKVCache:
    def __init__(self, cache_type: KVCacheType):
        self.type = cache_type
        self.storage = kv_storage(cache_type.storage)
        self._keys: dict[int, list[np.ndarray]] = {}
        self._values: dict[int, list[np.ndarray]] = {}
        self._batch: list[tuple[int, int]] = []

    def add_sequence(self, seq_id: int) -> None:
        if seq_id in self._keys:
            raise IRError(f"sequence {seq_id} is already in the cache")
        empty = np.zeros((self.type.num_kv_heads, 0, self.type.head_dim), dtype=np.float32)
        self._keys[seq_id] = [empty] * self.type.num_layers
        self._values[seq_id] = [empty] * self.type.num_layers

    def remove_sequence(self, seq_id: int) -> None:
        del self._keys[seq_id], self._values[seq_id]

    def length(self, seq_id: int) -> int:
        return self._keys[seq_id][0].shape[1]

    def begin_forward(self, seq_ids: Sequence[int], append_lengths: Sequence[int]) -> None:
        self._batch = list(zip(seq_ids, append_lengths))

    def end_forward(self) -> None:
        self._batch = []

    def attend(self, layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float,
               windowed: bool = False) -> np.ndarray:
        """Append k and v to `layer` for the step's sequences and attend causally, within the cache's window if the
        layer is windowed."""
        out = np.empty_like(q)
        start = 0
        for seq_id, count in self._batch:
            span = slice(start, start + count)
            keys = np.concatenate([self._keys[seq_id][layer], self.storage.round_trip(k[0, :, span])], axis=1)
            values = np.concatenate([self._values[seq_id][layer], self.storage.round_trip(v[0, :, span])], axis=1)
            self._keys[seq_id][layer], self._values[seq_id][layer] = keys, values
            past = keys.shape[1] - count
            distance = past + np.arange(count)[:, None] - np.arange(keys.shape[1])[None, :]
            mask = (distance >= 0) & (distance < self.type.window) if windowed else distance >= 0
            out[0, :, span] = attend(q[0, :, span], keys.astype(q.dtype), values.astype(q.dtype), mask, scale,
                                     self.type.softcap)
            start += count
        if start != q.shape[2]:
            raise IRError(f"the forward step announced {start} tokens but the graph got {q.shape[2]}")
        return out
