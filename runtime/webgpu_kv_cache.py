"""The paged KV cache of the vulkan runtime: page pools on the GPU, page tables in Python.

It is a `KVPages` (runtime/kv_pages.py) like the CPU's `PagedKVCache`, so the engine and the scheduler drive
both alike; it cannot fork. Each layer has one pool of pages (pages, 2, kv_heads, page_size,
row width), keys at 0 and values at 1, in the package's storage format (`pool_row`), written by the kernels.
`begin` gives the new tokens their pages and computes the step's tensors that the kernels read
(targets/webgpu/kv_cache.py): each new token's pool slot, its sequence's row in the page table, how many keys
it sees, and the page table.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from llmc.errors import LlmcError

from .kv_pages import KVPages
from .webgpu_plan import STEP_FIELDS, pool_name


def pool_row(layout: dict[str, Any]) -> tuple[str, int]:
    """The element type and the width of a pool's rows: float rows (f32, f16 storage) hold head_dim values,
    quantized ones (q8, q4) their bytes as 32-bit words, as many as `bytes_per_token` gives a row."""
    storage, head_dim = layout.get("storage", "f32"), int(layout["head_dim"])
    if storage in ("f32", "f16"):
        return layout["dtype"] if storage == "f32" else "float16", head_dim
    row_bytes = int(layout["bytes_per_token"]) // (2 * int(layout["num_layers"]) * int(layout["num_kv_heads"]))
    return "int32", row_bytes // 4


class WebGPUKVCache(KVPages):
    def __init__(self, device: Any, layout: dict[str, Any], max_batch_size: int, max_total_tokens: int,
                 prefill_chunk: int):
        import wgpu

        super().__init__(max_batch_size, max_total_tokens, prefill_chunk, int(layout["page_size"]))
        dtype, width = pool_row(layout)
        self.pool_shape = (self.total_pages(), 2, int(layout["num_kv_heads"]), self.page_size, width)
        size = int(np.prod(self.pool_shape)) * np.dtype(dtype).itemsize
        self.pools = [device.create_buffer(size=size, usage=wgpu.BufferUsage.STORAGE)
                      for _ in range(int(layout["num_layers"]))]
        self._pages: dict[int, list[int]] = {}
        self._free = list(range(self.total_pages() - 1, -1, -1))
        self._step: dict[str, np.ndarray] = {}

    def add_sequence(self) -> int:
        if len(self.lengths) >= self.max_batch_size:
            raise LlmcError(f"the KV cache holds at most {self.max_batch_size} sequences at once")
        seq_id = self._new_id()
        self.lengths[seq_id] = 0
        self._pages[seq_id] = []
        return seq_id

    def remove_sequence(self, seq_id: int) -> None:
        self._free.extend(reversed(self._pages.pop(seq_id)))
        del self.lengths[seq_id]

    def truncate(self, seq_id: int, length: int) -> None:
        if length < self.lengths[seq_id]:
            self.lengths[seq_id] = length
            pages = self._pages[seq_id]
            while len(pages) > self.pages_for(length):
                self._free.append(pages.pop())

    def free_pages(self) -> int:
        return len(self._free)

    def begin(self, seq_ids: Sequence[int], counts: Sequence[int]) -> None:
        wanted = sum(max(0, self.pages_for(self.lengths[s] + c) - len(self._pages[s])) for s, c in zip(seq_ids, counts))
        if wanted > len(self._free):
            raise LlmcError(f"the KV cache is full: the step needs {wanted} more pages, {len(self._free)} are free")
        slots, rows, lengths = [], [], []
        for row, (seq_id, count) in enumerate(zip(seq_ids, counts)):
            pages = self._pages[seq_id]
            start = self.lengths[seq_id]
            while len(pages) < self.pages_for(start + count):
                pages.append(self._free.pop())
            for position in range(start, start + count):
                slots.append(pages[position // self.page_size] * self.page_size + position % self.page_size)
                rows.append(row)
                lengths.append(position + 1)
        table = np.zeros((len(seq_ids), max(len(self._pages[s]) for s in seq_ids)), dtype=np.int32)
        for row, seq_id in enumerate(seq_ids):
            table[row, :len(self._pages[seq_id])] = self._pages[seq_id]
        self._step = dict(zip(STEP_FIELDS, (np.array(slots, np.int32), np.array(rows, np.int32),
                                            np.array(lengths, np.int32), table)))

    def end(self, seq_ids: Sequence[int], counts: Sequence[int]) -> None:
        self._step = {}
        super().end(seq_ids, counts)

    def tensors(self) -> dict[str, Any]:
        """The cache's inputs of the step between `begin` and `end`: (buffer, shape) for each layer's pool
        (`pages.<layer>`), arrays for the step's tensors."""
        pools = {pool_name(layer): (pool, self.pool_shape) for layer, pool in enumerate(self.pools)}
        return {**pools, **self._step}
