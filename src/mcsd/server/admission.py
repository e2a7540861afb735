"""Admission: the bounded first-in-first-out queue of requests waiting for a row of the engine.

The HTTP side ``put``s a request; the scheduler ``take``s the oldest ones when it has free rows
(one at a time for a batch-1 worker, up to ``max_batch - running`` for a batching one); a client
that leaves while it waits is ``cancel``led out of the queue. ``close`` starts a drain (SIGTERM):
no new request is admitted, the waiting ones are still handed out, and ``take`` returns an empty
list once the queue is closed and empty, which tells the scheduler to stop.

    queue = AdmissionQueue(max_waiting=64)
    queue.put(job)                  # QueueFull beyond max_waiting (429), Closed when draining (503)
    jobs = queue.take(4)            # up to 4 oldest; blocks until one arrives or the queue closes
    jobs = queue.take(4, timeout=0) # between two engine steps: whatever is waiting, maybe nothing
    queue.cancel(job)               # True if it was still waiting (and is now gone)

Thread-safe: the HTTP side (asyncio) and the scheduler thread call it concurrently.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class QueueFull(Exception):
    """The queue already holds ``max_waiting`` requests."""


class Closed(Exception):
    """The server is draining or stopping and admits no new request."""


class AdmissionQueue(Generic[T]):
    """At most ``max_waiting`` requests, handed out in arrival order."""

    def __init__(self, max_waiting: int) -> None:
        if max_waiting < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_waiting}")
        self.max_waiting = max_waiting
        self._items: deque[T] = deque()
        self._condition = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, item: T) -> int:
        """Append ``item``; returns how many requests wait ahead of it."""
        with self._condition:
            if self._closed:
                raise Closed
            if len(self._items) >= self.max_waiting:
                raise QueueFull
            self._items.append(item)
            self._condition.notify()
            return len(self._items) - 1

    def take(self, n: int, timeout: float | None = None) -> list[T]:
        """Remove and return up to ``n`` oldest requests. Waits for the first one at most
        ``timeout`` seconds (None: until one arrives); returns ``[]`` on timeout, or at once when
        the queue is closed and empty."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._condition:
            while not self._items and not self._closed:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return []
                self._condition.wait(left)
            return [self._items.popleft() for _ in range(min(n, len(self._items)))]

    def cancel(self, item: T) -> bool:
        """Drop ``item`` if it still waits; False if it was already taken (or never put)."""
        with self._condition:
            for index, waiting in enumerate(self._items):
                if waiting is item:  # identity: two requests may be equal field by field
                    del self._items[index]
                    return True
            return False

    def close(self) -> None:
        """Admit nothing more; the waiting requests stay to be taken (a drain)."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()

    def clear(self) -> list[T]:
        """Remove and return every waiting request (a stop: the caller cancels them)."""
        with self._condition:
            items = list(self._items)
            self._items.clear()
            return items
