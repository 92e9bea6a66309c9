"""The paged KV cache as the runtime drives it on the CPU and CUDA.

The cache object itself (pages, page tables, attention kernels) is created by the
compiled library's `create_kv_cache` and lives in TVM's runtime; this class keeps the
Python side (runtime/kv_pages.py: sequences, lengths, the begin/end protocol around each
forward step) and passes each call to TVM's cache, forks included (a sequence that starts
as the first tokens of another, sharing its pages; runtime/prefix_cache.py).
"""

from __future__ import annotations

from typing import Any, Sequence

from llmc.errors import LlmcError

from .kv_pages import KVPages
from .tvm_runtime import Shape, global_func

_BUILTIN = "vm.builtin."


def _builtin(name: str):
    return global_func(_BUILTIN + name)


class PagedKVCache(KVPages):
    can_fork = True

    def __init__(self, vm: Any, max_batch_size: int, max_total_tokens: int, prefill_chunk: int, page_size: int):
        super().__init__(max_batch_size, max_total_tokens, prefill_chunk, page_size)
        self.handle = vm["create_kv_cache"](Shape([max_batch_size]), Shape([max_total_tokens]),
                                            Shape([prefill_chunk]), Shape([page_size]), Shape([0]))
        self._add = _builtin("kv_state_add_sequence")
        self._remove = _builtin("kv_state_remove_sequence")
        self._begin = _builtin("kv_state_begin_forward")
        self._end = _builtin("kv_state_end_forward")
        self._popn = _builtin("kv_state_popn")
        self._fork = _builtin("kv_state_fork_sequence")
        self._free_pages = _builtin("attention_kv_cache_get_num_available_pages")

    def add_sequence(self) -> int:
        seq_id = self._new_id()
        self._add(self.handle, seq_id)
        self.lengths[seq_id] = 0
        return seq_id

    def fork(self, parent: int, length: int) -> int:
        seq_id = self._new_id()
        self._fork(self.handle, parent, seq_id, length)
        self.lengths[seq_id] = length
        return seq_id

    def remove_sequence(self, seq_id: int) -> None:
        self._remove(self.handle, seq_id)
        del self.lengths[seq_id]

    def truncate(self, seq_id: int, length: int) -> None:
        drop = self.lengths[seq_id] - length
        if drop > 0:
            self._popn(self.handle, seq_id, drop)
            self.lengths[seq_id] = length

    def free_pages(self) -> int:
        return int(self._free_pages(self.handle))

    def begin(self, seq_ids: Sequence[int], counts: Sequence[int]) -> None:
        if len(seq_ids) > self.max_batch_size:
            raise LlmcError(f"the KV cache runs at most {self.max_batch_size} sequences in a step")
        self._begin(self.handle, Shape(list(seq_ids)), Shape(list(counts)), None)

    def end(self, seq_ids: Sequence[int], counts: Sequence[int]) -> None:
        self._end(self.handle)
        super().end(seq_ids, counts)
