"""A compiled package loaded onto a device: one forward step over a batch of sequences.

`CompiledModel.step` runs the tokens of several sequences at once (chunks of prompt
for some, single tokens for others), appending to the paged KV cache, and returns the
logits of the last token of each sequence, or of every token when asked. Batches whose
sequences all add one token go to the `decode` entry point; the rest to `prefill`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import tvm
from tvm import relax

from llmc.ir import LlmcError
from llmc.targets import get_target

from .kv_cache import PagedKVCache
from .package import Package


@dataclass(frozen=True)
class CacheSettings:
    """How big the paged KV cache is: tokens in all sequences together, sequences, prefill chunk."""

    max_total_tokens: int
    max_batch_size: int = 16
    prefill_chunk: int = 512


class ContextOverflow(LlmcError):
    """More tokens than the model's context window."""


class CompiledModel:
    def __init__(self, package: Package, device: str = "cpu", cache: CacheSettings | None = None):
        self.package = package
        self.device_name = device
        target = get_target(device)
        self.device = target.device()
        meta = package.metadata
        self.vocab_size = int(meta["model"]["vocab_size"])
        self.context_length = int(meta["model"]["context_length"])
        try:
            library = tvm.runtime.load_module(str(package.library_path(device)))
            self.vm = relax.VirtualMachine(library, self.device)
        except LlmcError:
            raise
        except Exception as error:  # TVM raises TVMError for unloadable libraries
            raise LlmcError(f"cannot load the {device} library of {package.path}: {str(error).splitlines()[-1]}") from None
        weights = package.load_weights()
        self.params = [tvm.runtime.tensor(weights[name], self.device) for name in meta["weights"]["order"]]
        settings = cache or CacheSettings(max_total_tokens=self.context_length)
        self.cache = PagedKVCache(self.vm, settings.max_batch_size, settings.max_total_tokens,
                                  settings.prefill_chunk, int(meta["kv_cache"]["page_size"]))
        self._prefill = self.vm["prefill"]
        self._decode = self.vm["decode"]

    def _tensor(self, values: Sequence[int] | np.ndarray, shape: tuple[int, ...]) -> tvm.runtime.Tensor:
        return tvm.runtime.tensor(np.asarray(values, dtype=np.int64).reshape(shape), self.device)

    def check_tokens(self, tokens: Sequence[int]) -> None:
        bad = [t for t in tokens if not 0 <= t < self.vocab_size]
        if bad:
            raise LlmcError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")

    def step(self, seq_ids: Sequence[int], chunks: Sequence[Sequence[int]], all_logits: bool = False) -> np.ndarray:
        """Append `chunks[i]` to sequence `seq_ids[i]`; logits of each sequence's last token (rows, vocab),
        or of every token when `all_logits`."""
        counts = [len(c) for c in chunks]
        if min(counts) < 1:
            raise LlmcError("every sequence in a step needs at least one token")
        for seq_id, count in zip(seq_ids, counts):
            if self.cache.lengths[seq_id] + count > self.context_length:
                raise ContextOverflow(f"the sequence would reach {self.cache.lengths[seq_id] + count} tokens, more "
                                      f"than the model's context window of {self.context_length}")
        tokens = [t for c in chunks for t in c]
        self.check_tokens(tokens)
        positions = [p for seq_id, count in zip(seq_ids, counts)
                     for p in range(self.cache.lengths[seq_id], self.cache.lengths[seq_id] + count)]
        ids = self._tensor(tokens, (1, len(tokens)))
        pos = self._tensor(positions, (len(positions),))
        self.cache.begin(seq_ids, counts)
        try:
            if all(c == 1 for c in counts) and not all_logits:
                logits = self._decode(ids, pos, self.cache.handle, self.params)
            else:
                rows = np.arange(len(tokens)) if all_logits else np.cumsum(counts) - 1
                logits = self._prefill(ids, pos, self._tensor(rows, (len(rows),)), self.cache.handle, self.params)
        finally:
            self.cache.end(seq_ids, counts)
        return logits.numpy()

    def score(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits after every token of `tokens` (len, vocab), in a sequence of its own."""
        seq_id = self.cache.add_sequence()
        try:
            chunk = self.cache.prefill_chunk
            parts = [self.step([seq_id], [tokens[i:i + chunk]], all_logits=True) for i in range(0, len(tokens), chunk)]
        finally:
            self.cache.remove_sequence(seq_id)
        return np.concatenate(parts)


def open_model(path: str | Path, device: str = "cpu", cache: CacheSettings | None = None) -> CompiledModel:
    return CompiledModel(Package.open(path), device, cache)
