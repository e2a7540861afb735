"""Graceful shutdown of ``mcsd serve``: SIGTERM drains, then the server exits.

On the first SIGTERM the scheduler stops admitting (new requests get 503 and ``/health`` turns
503, so a load balancer sends traffic elsewhere) while the running and waiting requests finish;
once none is left, or after ``drain_timeout_s``, uvicorn shuts down as usual (the requests still
running then are cancelled). SIGINT (Ctrl-C) and a second SIGTERM skip the wait. uvicorn alone
would close the listening socket at once and give running streams no bounded time.
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType
from typing import Protocol

import uvicorn

log = logging.getLogger("mcsd.server")


class Drainable(Protocol):
    def drain(self) -> None:
        """Admit no new request."""
        ...

    def running_count(self) -> int: ...

    def waiting_count(self) -> int: ...


class DrainingServer(uvicorn.Server):
    """``uvicorn.Server`` whose SIGTERM waits (at most ``drain_timeout_s``) for ``scheduler``
    to finish its requests before the usual shutdown."""

    def __init__(
        self, config: uvicorn.Config, scheduler: Drainable, *, drain_timeout_s: float
    ) -> None:
        if drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {drain_timeout_s}")
        super().__init__(config)
        self.scheduler = scheduler
        self.drain_timeout_s = drain_timeout_s
        self.drain_deadline: float | None = None  # set by the first SIGTERM
        self._idle_ticks = 0

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig != signal.SIGTERM or self.drain_deadline is not None:
            super().handle_exit(sig, frame)
            return
        self.drain_deadline = time.monotonic() + self.drain_timeout_s
        self.scheduler.drain()
        log.info("SIGTERM: draining (at most %.0f s), new requests get 503", self.drain_timeout_s)

    async def on_tick(self, counter: int) -> bool:
        if self.drain_deadline is not None and not self.should_exit:
            busy = self.scheduler.running_count() + self.scheduler.waiting_count()
            # Idle on two ticks in a row (0.1 s apart): a request handed from the queue to a
            # row at the moment of one look is counted by the next.
            self._idle_ticks = self._idle_ticks + 1 if busy == 0 else 0
            if self._idle_ticks >= 2 or time.monotonic() >= self.drain_deadline:
                if busy:
                    log.warning("drain timeout: cancelling %d request(s)", busy)
                self.should_exit = True
        return await super().on_tick(counter)
