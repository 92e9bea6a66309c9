"""Prompt lookup: draft the tokens that followed the last occurrence of a sequence's latest n-gram.

Whenever an answer repeats its context (an edit, a summary, code, retrieved text), the tokens
after the sequence's last few tokens are likely those that followed the same few tokens earlier
in its prompt or output. The n-grams are indexed as the sequence grows, so a lookup is a few
dictionary reads, however long the sequence; longer n-grams are tried first, since they
predict better.
"""

from __future__ import annotations

from typing import Sequence

NGRAM_SIZES = (4, 3, 2)


class NgramDrafter:
    def __init__(self):
        self._seen = 0
        self._after: dict[tuple[int, ...], int] = {}  # n-gram -> the position just after its latest occurrence

    def _index(self, tokens: Sequence[int]) -> None:
        """Index the n-grams that gained a following token since the last call."""
        for end in range(max(self._seen, 1), len(tokens)):
            for n in NGRAM_SIZES:
                if end >= n:
                    self._after[tuple(tokens[end - n:end])] = end
        self._seen = len(tokens)

    def propose(self, tokens: Sequence[int], limit: int) -> list[int]:
        """Up to `limit` tokens that may follow `tokens` (none when its ending never occurred before)."""
        self._index(tokens)
        if limit <= 0:
            return []
        for n in NGRAM_SIZES:
            if len(tokens) > n:
                start = self._after.get(tuple(tokens[-n:]))
                if start is not None:
                    return list(tokens[start:start + limit])
        return []

    def close(self) -> None:
        """Nothing to free: the index is plain Python."""
