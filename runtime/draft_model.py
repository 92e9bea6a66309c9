"""Drafting with a smaller compiled model that shares the target's tokenizer (`--speculate draft:PKG`).

The draft model keeps its own paged KV cache, one sequence per target sequence. To draft, it
rolls its sequence back to the longest prefix it shares with the target's tokens (what the
target rejected last step is dropped), runs the tokens it lacks, then decodes greedily, one
token a step. A draft model that fails (its cache is full, say) drafts nothing: the target
decodes as if there were no drafter, and the draft model rests for a while. Drafts end at the
first token past the target's vocabulary (a padded one).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .model import CompiledModel

REST_AFTER_FAILURE = 64  # proposals skipped after the draft model fails


class DraftModelDrafter:
    def __init__(self, model: CompiledModel, target_vocab_size: int):
        self.model = model
        self.cache = model.cache
        self.target_vocab_size = target_vocab_size
        self._seq_id: int | None = None
        self._tokens: list[int] = []  # what the draft model's KV holds
        self._resting = 0

    def _sync(self, tokens: Sequence[int]) -> np.ndarray:
        """Make the draft KV hold `tokens` (reusing the prefix it has); the logits after the last of them."""
        if self._seq_id is None:
            self._seq_id = self.cache.add_sequence()
        common = 0
        for have, want in zip(self._tokens, tokens[:-1]):
            if have != want:
                break
            common += 1
        self.cache.truncate(self._seq_id, common)
        self._tokens = list(tokens[:common])
        logits = None
        for start in range(common, len(tokens), self.cache.prefill_chunk):
            logits = self.model.step([self._seq_id], [list(tokens[start:start + self.cache.prefill_chunk])])
        self._tokens = list(tokens)
        return logits[0]

    def propose(self, tokens: Sequence[int], limit: int) -> list[int]:
        if self._resting > 0:
            self._resting -= 1
            return []
        if limit <= 0 or len(tokens) + limit > self.model.context_length:
            return []
        try:
            logits = self._sync(tokens)
            drafts = [int(np.argmax(logits))]
            while len(drafts) < limit and drafts[-1] < self.target_vocab_size:
                logits = self.model.step([self._seq_id], [[drafts[-1]]])[0]
                self._tokens.append(drafts[-1])
                drafts.append(int(np.argmax(logits)))
        except Exception:  # TVM's own errors too (no free page): start over later, draft nothing now
            self.close()
            self._resting = REST_AFTER_FAILURE
            return []
        return drafts[:next((i for i, t in enumerate(drafts) if t >= self.target_vocab_size), len(drafts))]

    def close(self) -> None:
        if self._seq_id is not None:
            self.cache.remove_sequence(self._seq_id)
            self._seq_id, self._tokens = None, []
