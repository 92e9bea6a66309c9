"""Many requests at once, from asyncio: each call's text arrives as an async stream of deltas (several
interleaved streams for a call of `n` choices, whose prompt is computed once).

One worker thread owns the model and the `Scheduler` and runs one batch step at a time; the
event loop only hands it requests and cancellations and receives deltas, so it stays
responsive while the model computes (TVM releases the GIL). A request whose consumer stops
reading (a client that disconnects) is cancelled before the next step and frees its pages.
While it runs, the engine's model belongs to the worker: use the `Engine` only through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import AsyncIterator, Callable, Sequence

from llmc.errors import LlmcError

from .engine import Engine
from .request import Request
from .sampling import SamplingParams
from .scheduler import Delta, RequestFailed, Scheduler, SchedulerStats, StepFailed
from .metrics import Throughput

_Subscriber = tuple[asyncio.AbstractEventLoop, asyncio.Queue, int]


class EngineStopped(LlmcError):
    """The engine's worker thread is gone: no request can be served any more."""


class AsyncEngine:
    """The batching engine behind the server: requests in from the event loop, deltas back to it."""

    def __init__(self, engine: Engine, on_stop: Callable[[BaseException], None] = lambda error: None):
        """`on_stop` is called (from the worker thread) if the worker dies."""
        self.engine = engine
        self.scheduler = Scheduler(engine.model, engine.speculators)
        self.throughput = Throughput()
        self.failure: BaseException | None = None
        self._on_stop = on_stop
        self._wake = threading.Condition()
        self._commands: list[Callable[[], None]] = []
        self._subscribers: dict[Request, _Subscriber] = {}
        self._closing = False
        self._stopped = False
        self._worker: threading.Thread | None = None

    @property
    def context_length(self) -> int:
        """The longest prompt plus completion a request may ask for (model and KV cache permitting)."""
        return self.scheduler.max_sequence_tokens

    @property
    def stats(self) -> SchedulerStats:
        return self.scheduler.stats

    @property
    def alive(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    def start(self) -> None:
        self._worker = threading.Thread(target=self._work, name="llmc-engine", daemon=True)
        self._worker.start()

    def close(self) -> None:
        with self._wake:
            self._closing = True
            self._wake.notify()
        if self._worker is not None:
            self._worker.join()

    def request(self, prompt_ids: Sequence[int], params: SamplingParams) -> Request:
        """A checked request, ready for `stream`: raises LlmcError for an empty or too long prompt."""
        self.scheduler.check_fits(len(prompt_ids), params.max_tokens)
        return self.engine.new_request(prompt_ids, params, self.context_length)

    async def stream(self, requests: Sequence[Request]) -> AsyncIterator[tuple[int, Delta]]:
        """(index in `requests`, delta) as the batch produces them, until each request has had its last
        delta (the one with a finish reason). The requests share one prompt, computed once. Leaving the
        loop early (or being cancelled) cancels the requests not finished."""
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        for index, request in enumerate(requests):
            self._subscribers[request] = (loop, queue, index)
        if self._stopped:
            self._unsubscribe(requests)
            raise self._stopped_error()
        self._submit(lambda: self._add(requests))
        unfinished = set(range(len(requests)))
        try:
            while unfinished:
                index, delta = await queue.get()
                if isinstance(delta, Exception):
                    raise delta
                if delta.finish_reason is not None:
                    unfinished.discard(index)
                yield index, delta
        finally:
            self._unsubscribe(requests)
            for index in unfinished:
                self._submit(lambda request=requests[index]: self.scheduler.cancel(request))

    def _unsubscribe(self, requests: Sequence[Request]) -> None:
        for request in requests:
            self._subscribers.pop(request, None)

    # -- the worker thread -------------------------------------------------------------------------------
    def _submit(self, command: Callable[[], None]) -> None:
        with self._wake:
            self._commands.append(command)
            self._wake.notify()

    def _add(self, requests: Sequence[Request]) -> None:
        try:
            self.scheduler.add(requests[0], requests[1:])
        except LlmcError as error:  # requests that did not come through `request()`
            self._deliver(requests[0], error)

    def abort_all(self, reason: str) -> None:
        """End every request, running or waiting, with an error saying `reason`."""
        self._submit(lambda: self._fail_all(EngineStopped(reason)))

    def _fail_all(self, error: LlmcError) -> None:
        for request in self.scheduler.fail_all():
            self._deliver(request, error)

    def _work(self) -> None:
        try:
            self._run_steps()
        except BaseException as error:  # the worker cannot go on: fail everyone now, say so, let the server stop
            self.failure = error
            raise
        finally:
            self._stopped = True
            try:
                for request in list(self._subscribers):
                    self._deliver(request, self._stopped_error())
            finally:
                if self.failure is not None:
                    self._on_stop(self.failure)

    def _stopped_error(self) -> EngineStopped:
        cause = f": {type(self.failure).__name__}: {self.failure}" if self.failure is not None else ""
        return EngineStopped(f"the engine has stopped{cause}")

    def _run_steps(self) -> None:
        while True:
            with self._wake:
                while not (self._closing or self._commands or self.scheduler.has_work):
                    self._wake.wait()
                if self._closing:
                    return
                commands, self._commands = self._commands, []
            for command in commands:
                try:
                    command()
                except Exception as error:  # a cancel that failed leaves the KV state in doubt: start clean
                    self._fail_all(RequestFailed(error))
            try:
                outputs = self.scheduler.step()
            except StepFailed as failure:
                for request in failure.requests:
                    self._deliver(request, failure)
                continue
            except Exception as error:  # outside the model: no single request to blame, so all of them fail
                self._fail_all(RequestFailed(error))
                continue
            self.throughput.add(sum(len(item.token_ids) for _, item in outputs if isinstance(item, Delta)))
            for request, item in outputs:
                self._deliver(request, item)

    def _deliver(self, request: Request, item: Delta | Exception) -> None:
        subscriber = self._subscribers.get(request)
        if subscriber is not None:
            loop, queue, index = subscriber
            with contextlib.suppress(RuntimeError):  # the event loop is already closed: nobody is listening
                loop.call_soon_threadsafe(queue.put_nowait, (index, item))
