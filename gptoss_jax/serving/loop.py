"""The engine thread a server talks to: one Batcher stepped in a background thread, requests handed in
from asyncio handlers and their tokens handed back to each handler's own queue.

Only this thread touches the Batcher (and so the device); handlers submit and cancel through a
thread-safe inbox. The number of requests in flight is bounded: past `slots + max_queue` a submit is
refused at once (the server answers 429), so a burst cannot grow memory or latency without limit.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from gptoss_jax.inference.batching import Batcher, Event, Request

log = logging.getLogger("gptoss_jax.serve")


class QueueFull(Exception):
    """Refused: the slots are busy and the waiting queue is full."""


@dataclass
class Metrics:
    """Counters a /metrics endpoint exposes (read by the server thread, written by the engine thread)."""

    requests: int = 0
    refused: int = 0
    cancelled: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    time_to_first_token: list[float] = field(default_factory=list)  # seconds, the latest 1000


@dataclass
class _Ticket:
    """One request in flight: where its events go."""

    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    submitted: float
    request_id: int | None = None
    first_token: bool = True


class ServingLoop:
    """Steps a Batcher in a thread; `submit` from async code, then `async for event in stream(ticket)`."""

    def __init__(self, batcher: Batcher, max_queue: int = 64):
        self.batcher = batcher
        self.max_queue = max_queue
        self.metrics = Metrics()
        self._inbox: queue.Queue = queue.Queue()
        self._tickets: dict[int, _Ticket] = {}
        self._in_flight = 0
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gptoss-engine", daemon=True)
        self._thread.start()

    # Called from the server's event loop.

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def submit(self, request: Request) -> _Ticket:
        """Hand a request to the engine; raises QueueFull when the queue is at its limit, and the
        Batcher's GenerationError (at once, here) when the request cannot be served."""
        self.batcher.check(request)
        with self._lock:
            if self._in_flight >= self.batcher.slots + self.max_queue:
                self.metrics.refused += 1
                raise QueueFull(f"{self._in_flight} requests in flight, the limit is {self.batcher.slots} slots + "
                                f"{self.max_queue} queued")  # fmt: skip
            self._in_flight += 1
            self.metrics.requests += 1
            self.metrics.prompt_tokens += len(request.prompt)
        ticket = _Ticket(asyncio.get_running_loop(), asyncio.Queue(), time.perf_counter())
        self._inbox.put(("submit", ticket, request))
        return ticket

    def cancel(self, ticket: _Ticket) -> None:
        """Drop a request (a client that went away); its slot frees at the engine's next step."""
        self._inbox.put(("cancel", ticket, None))

    async def stream(self, ticket: _Ticket):
        """The request's events until its last one."""
        while True:
            event = await ticket.events.get()
            yield event
            if event.finished:
                return

    def close(self) -> None:
        self._stopped.set()
        self._inbox.put(("stop", None, None))
        self._thread.join(timeout=10)

    # The engine thread.

    def _run(self) -> None:
        while not self._stopped.is_set():
            self._take_inbox(block=not self.batcher.has_work())
            if not self.batcher.has_work():
                continue
            try:
                events = self.batcher.step()
            except Exception:  # a fault of ours: fail the requests in flight, keep serving the next ones
                log.exception("engine step failed")
                events = [Event(request_id, -1, float("nan"), "error") for request_id in list(self._tickets)]
                for request_id in list(self._tickets):
                    self.batcher.cancel(request_id)
            self.metrics.steps += 1
            for event in events:
                self._deliver(event)

    def _take_inbox(self, block: bool) -> None:
        while True:
            try:
                kind, ticket, request = self._inbox.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            block = False
            if kind == "submit":
                ticket.request_id = self.batcher.submit(request)
                self._tickets[ticket.request_id] = ticket
            elif kind == "cancel" and ticket.request_id in self._tickets:
                self.batcher.cancel(ticket.request_id)
                del self._tickets[ticket.request_id]
                self.metrics.cancelled += 1
                self._done()

    def _deliver(self, event: Event) -> None:
        ticket = self._tickets.get(event.request)
        if ticket is None:
            return  # cancelled while its step ran
        self.metrics.generated_tokens += 1
        if ticket.first_token:
            ticket.first_token = False
            self.metrics.time_to_first_token = self.metrics.time_to_first_token[-999:] + [
                time.perf_counter() - ticket.submitted
            ]
        if event.finished:
            del self._tickets[event.request]
            self._done()
        ticket.loop.call_soon_threadsafe(ticket.events.put_nowait, event)

    def _done(self) -> None:
        with self._lock:
            self._in_flight -= 1
