"""What `/metrics` reports about serving, in the Prometheus text format.

Requests running and waiting, KV pages used and total, preemptions, tokens generated, the
generation rate over the last seconds (a gauge, so a plain scrape shows tokens per second
without a `rate()` query), and the prefix cache: prompt tokens looked up and found, its hit
rate, the sequences it keeps and those it evicted.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from .scheduler import SchedulerStats

RATE_WINDOW_S = 10.0


class Throughput:
    """Tokens generated per second over a sliding window; `add` from one thread, `rate` from any."""

    def __init__(self, window_s: float = RATE_WINDOW_S):
        self.window_s = window_s
        self._events: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def add(self, tokens: int) -> None:
        with self._lock:
            self._events.append((time.monotonic(), tokens))
            self._forget(time.monotonic())

    def rate(self) -> float:
        with self._lock:
            self._forget(time.monotonic())
            return sum(tokens for _, tokens in self._events) / self.window_s

    def _forget(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self.window_s:
            self._events.popleft()


_METRICS = [  # name, type, help, value
    ("llmc_requests_running", "gauge", "Requests in the running batch.", lambda s, r: s.running),
    ("llmc_requests_waiting", "gauge", "Requests waiting for a place in the batch.", lambda s, r: s.waiting),
    ("llmc_generation_tokens_per_second", "gauge", f"Tokens generated per second over the last {RATE_WINDOW_S:g} s.",
     lambda s, r: r),
    ("llmc_generated_tokens_total", "counter", "Tokens generated since the server started.",
     lambda s, r: s.generated_tokens),
    ("llmc_kv_cache_pages_used", "gauge", "KV cache pages holding tokens.", lambda s, r: s.pages_used),
    ("llmc_kv_cache_pages_total", "gauge", "KV cache pages in all.", lambda s, r: s.pages_total),
    ("llmc_preemptions_total", "counter", "Requests preempted (pages freed, recomputed later) for lack of KV pages.",
     lambda s, r: s.preemptions),
    ("llmc_prefix_cache_queried_tokens_total", "counter", "Prompt tokens looked up in the prefix cache.",
     lambda s, r: s.prefix.queried_tokens),
    ("llmc_prefix_cache_hit_tokens_total", "counter", "Prompt tokens taken from the prefix cache, not computed.",
     lambda s, r: s.prefix.cached_tokens),
    ("llmc_prefix_cache_hit_rate", "gauge", "Hit tokens over queried tokens since the server started.",
     lambda s, r: round(s.prefix.hit_rate, 4)),
    ("llmc_prefix_cache_sequences", "gauge", "Finished sequences whose KV pages the prefix cache keeps.",
     lambda s, r: s.prefix.retained_sequences),
    ("llmc_prefix_cache_evictions_total", "counter", "Cached sequences evicted to free KV pages.",
     lambda s, r: s.prefix.evictions),
]


def prometheus_text(stats: SchedulerStats, tokens_per_second: float) -> str:
    lines = []
    for name, kind, help_text, value in _METRICS:
        number = value(stats, round(tokens_per_second, 3))
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {number}"]
    return "\n".join(lines) + "\n"
