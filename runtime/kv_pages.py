"""What every paged KV cache of the runtime shares, whoever holds the pages (TVM's cache for the CPU and
CUDA, runtime/kv_cache.py; llmc's own for vulkan, runtime/webgpu_kv_cache.py).

Both keep the same bookkeeping on the Python side: the live sequences and their lengths, page counts,
and the begin/end protocol around each step (`begin` before the step's kernels run, `end` after, which
adds the step's tokens to each sequence). The engine, the scheduler and the prefix cache drive a cache
only through this surface; `can_fork` says whether a sequence can start on another's pages.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence


class KVPages(ABC):
    """A paged KV cache for at most `max_batch_size` sequences in a step and `max_total_tokens` tokens."""

    can_fork = False

    def __init__(self, max_batch_size: int, max_total_tokens: int, prefill_chunk: int, page_size: int):
        self.max_batch_size = max_batch_size
        self.max_total_tokens = max_total_tokens
        self.prefill_chunk = prefill_chunk
        self.page_size = page_size
        self.lengths: dict[int, int] = {}
        self._next_id = 0

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def total_pages(self) -> int:
        return -(-self.max_total_tokens // self.page_size)

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    @abstractmethod
    def add_sequence(self) -> int:
        """A new, empty sequence's id."""

    @abstractmethod
    def remove_sequence(self, seq_id: int) -> None:
        """Forget the sequence and give back its pages (those no other sequence shares)."""

    @abstractmethod
    def truncate(self, seq_id: int, length: int) -> None:
        """Forget the tokens after the first `length` of a sequence."""

    @abstractmethod
    def free_pages(self) -> int:
        """Pages no sequence holds."""

    @abstractmethod
    def begin(self, seq_ids: Sequence[int], counts: Sequence[int]) -> None:
        """Prepare a step that appends `counts[i]` tokens to sequence `seq_ids[i]`."""

    def fork(self, parent: int, length: int) -> int:
        """A new sequence holding the first `length` tokens of `parent`, on the same pages (where `can_fork`)."""
        raise NotImplementedError(f"{type(self).__name__} cannot fork sequences")

    def end(self, seq_ids: Sequence[int], counts: Sequence[int]) -> None:
        """The step is done: each sequence is `counts[i]` tokens longer."""
        for seq_id, count in zip(seq_ids, counts):
            self.lengths[seq_id] += count
