"""Automatic prefix caching: KV pages are reused by every later sequence whose tokens begin the
same way, while the sequence that computed them runs and after it finishes.

Full KV pages are identified as vLLM identifies them: by a hash of the page's tokens chained
with the hash of the page before it, so equal hashes mean equal prefixes up to that page. The
index maps each hash to a sequence that holds the page: a running one (the scheduler reports
its pages as they are computed) or a finished one that the cache keeps. A new sequence takes the
longest run of indexed full pages of its tokens (all but its last token, whose logits it needs)
and is forked from the sequence holding them: TVM's paged KV cache shares the pages themselves,
counting references, so nothing is copied and a page lives while any sequence uses it.
Retained sequences are evicted least recently used first, when pages are short; evicting one
frees the pages that no running sequence shares. A running sequence also promises the full
pages of its tokens that it has yet to compute, so that a request that begins the same way can
wait for them (the scheduler holds it back) rather than compute them a second time. Caches
that cannot fork (vulkan's) run with the cache off: every sequence starts empty and is removed
when it ends.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import xxhash

from .kv_pages import KVPages


@dataclass(frozen=True)
class PrefixStats:
    """Prompt tokens looked up, how many of them came from the cache, and evicted sequences."""

    queried_tokens: int = 0
    cached_tokens: int = 0
    evictions: int = 0
    retained_sequences: int = 0

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / self.queried_tokens if self.queried_tokens else 0.0


@dataclass(frozen=True)
class Match:
    """The longest cached prefix of some tokens: a sequence holding it (running or kept), and its length;
    `promised` when a running sequence is computing the page after it."""

    seq_id: int | None
    length: int
    promised: bool = False


def page_hashes(tokens: Sequence[int], page_size: int, skip: int = 0, parent: int = 0) -> Iterator[int]:
    """The chained hash of each full page of `tokens` after the first `skip` pages (the last of which hashed
    to `parent`), computed as they are asked for."""
    ids = np.asarray(tokens, dtype=np.int64)
    for end in range((skip + 1) * page_size, len(ids) + 1, page_size):
        parent = xxhash.xxh3_64_intdigest(ids[end - page_size:end].tobytes(), seed=parent)
        yield parent


class PrefixCache:
    def __init__(self, cache: KVPages, enabled: bool = True):
        self.cache = cache
        self.enabled = enabled and self.can_fork
        self._index: dict[int, int] = {}  # page hash -> a sequence holding that page
        self._tokens: dict[int, list[int]] = {}  # indexed sequence -> the tokens of its indexed pages
        self._hashes: dict[int, list[int]] = {}  # indexed sequence -> the hashes of its full pages
        self._promised: dict[int, int] = {}  # page hash -> a running sequence that will compute that page
        self._promises: dict[int, list[int]] = {}  # running sequence -> the hashes of the pages it promised
        self._retained: OrderedDict[int, None] = OrderedDict()  # finished sequences kept; least recent first
        self._queried = self._cached = self._evictions = 0

    @property
    def can_fork(self) -> bool:
        """Whether the KV cache can start a sequence on another's pages (vulkan's cannot)."""
        return self.cache.can_fork

    @property
    def stats(self) -> PrefixStats:
        return PrefixStats(self._queried, self._cached, self._evictions, len(self._retained))

    def longest(self, tokens: Sequence[int]) -> Match:
        """The longest run of cached full pages that begins `tokens` and leaves at least its last token."""
        if not self.enabled:
            return Match(None, 0)
        page = self.cache.page_size
        found = Match(None, 0)
        for number, page_hash in enumerate(page_hashes(tokens[:len(tokens) - 1], page)):
            holder = self._index.get(page_hash)
            if holder is None:
                if page_hash in self._promised:
                    found = Match(found.seq_id, found.length, promised=True)
                break
            found = Match(holder, (number + 1) * page)
        if found.seq_id is not None and self._tokens[found.seq_id][:found.length] != list(tokens[:found.length]):
            return Match(None, 0)  # a hash collision: recompute rather than trust it
        return found

    def start(self, tokens: Sequence[int], match: Match | None = None) -> tuple[int, int]:
        """A new sequence for `tokens` (forked from `match`, by default the longest cached prefix) and the
        number of its tokens already in the cache."""
        match = self.longest(tokens) if match is None else match
        if self.enabled:
            self._queried += len(tokens)
            self._cached += match.length
        if match.seq_id is None:
            seq_id = self.cache.add_sequence()
        else:
            if match.seq_id in self._retained:
                self._retained.move_to_end(match.seq_id)
            seq_id = self.cache.fork(match.seq_id, match.length)
        if self.enabled:
            page = self.cache.page_size
            promises = list(page_hashes(tokens, page))[match.length // page:]
            self._promises[seq_id] = promises
            for page_hash in promises:
                self._promised.setdefault(page_hash, seq_id)
        return seq_id, match.length

    def computed(self, seq_id: int, tokens: Sequence[int]) -> None:
        """A running sequence's KV now holds `tokens`: its full pages can serve other sequences at once."""
        if not self.enabled:
            return
        page, known = self.cache.page_size, self._hashes.setdefault(seq_id, [])
        if len(tokens) // page <= len(known):
            return
        for page_hash in page_hashes(tokens, page, len(known), known[-1] if known else 0):
            known.append(page_hash)
            self._index.setdefault(page_hash, seq_id)
            self._promised.pop(page_hash, None)  # computed: nobody needs to wait for it any more
        self._tokens[seq_id] = list(tokens[:len(known) * page])

    def remove(self, seq_id: int) -> None:
        """Remove a sequence that is not kept (cancelled, failed, preempted) from the cache and the index."""
        self._unindex(seq_id)
        self.cache.remove_sequence(seq_id)

    def _unindex(self, seq_id: int) -> None:
        for page_hash in self._hashes.pop(seq_id, []):
            if self._index.get(page_hash) == seq_id:
                del self._index[page_hash]
        self._tokens.pop(seq_id, None)
        self._unpromise(seq_id)

    def _unpromise(self, seq_id: int) -> None:
        for page_hash in self._promises.pop(seq_id, []):
            if self._promised.get(page_hash) == seq_id:
                del self._promised[page_hash]

    def finish(self, seq_id: int, tokens: Sequence[int]) -> None:
        """A sequence whose KV holds `tokens` has ended: keep it for later prefixes (if it fills a page), or
        remove it."""
        if not self.enabled or len(tokens) < self.cache.page_size:
            self.remove(seq_id)
            return
        self.computed(seq_id, tokens)
        self._unpromise(seq_id)
        self._retained[seq_id] = None

    def evict_one(self) -> bool:
        """Remove the least recently used retained sequence; False if none is left."""
        if not self._retained:
            return False
        seq_id, _ = self._retained.popitem(last=False)
        self.remove(seq_id)
        self._evictions += 1
        return True

    def make_room(self, pages: int) -> None:
        """Evict until `pages` pages are free, or nothing is left to evict."""
        while pages > 0 and self.cache.free_pages() < pages and self.evict_one():
            pass

    def clear(self) -> None:
        while self.evict_one():
            pass
