"""One generation at a time: a worker thread serving a bounded first-in-first-out queue.

The engine decodes one sequence at a time (batch 1), so requests wait their turn in arrival order
(fair: nobody is overtaken). The HTTP side (asyncio) submits a ``Job`` and reads its events from
an ``asyncio.Queue``; the worker thread runs ``mcsd.api.stream`` and posts every step to that
queue with ``loop.call_soon_threadsafe``. Cancelling a job (client gone) removes it from the
queue if it is waiting, or makes the worker close its generator after the current step if it is
running, so a disconnect frees the models within one speculative step.

Tokenising happens in the worker thread too: a tokenizer is not safe to use from two threads.
The waiting requests live in an ``AdmissionQueue`` (``mcsd.server.admission``); how a broken
generation is answered (500, or 503 for device out-of-memory) is ``mcsd.server.failures``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

from mcsd.api import Chunk, ModelPair, Prompt, encode_prompt, stream
from mcsd.config import SpecConfig
from mcsd.server.admission import AdmissionQueue, Closed, QueueFull
from mcsd.server.failures import failure_of
from mcsd.server.metrics import Metrics
from mcsd.server.schemas import APIError
from mcsd.stats import Stats

log = logging.getLogger("mcsd.server")

__all__ = ["Failed", "Finished", "Job", "QueueFull", "Scheduler", "ShuttingDown"]


class ShuttingDown(Exception):
    """The server is draining or stopping (or its worker died) and takes no new requests."""


@dataclass(frozen=True)
class Finished:
    """The last event of a generation that ran to its end."""

    finish_reason: str  # "stop" or "length"
    stats: Stats


@dataclass(frozen=True)
class Failed:
    """The last event of a generation that could not run or broke; ``error`` is what the client
    sees (400 when the prompt was refused before any token, 500 otherwise)."""

    error: APIError
    before_output: bool


Event = Chunk | Finished | Failed


@dataclass
class Job:
    prompt: Prompt  # text, token ids or chat messages (tokenised by the worker)
    chat: bool
    spec: SpecConfig
    prompt_param: str  # the request field the prompt came from ("prompt" or "messages")
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    arrival: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    prompt_tokens: int = 0  # set by the worker before the first event
    completion_tokens: int = 0
    done: bool = False  # set by the worker before the last event
    client_checked: float = field(
        default_factory=time.monotonic
    )  # last disconnect check (HTTP side)

    def post(self, event: Event) -> None:
        """Hand an event to the asyncio side (from the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled.set()


class Scheduler:
    """The queue and its worker thread (``start`` / ``stop`` follow the server's lifespan)."""

    def __init__(
        self, pair: ModelPair, *, max_queue: int, max_prompt_tokens: int | None = None
    ) -> None:
        self.pair = pair
        self.max_queue = max_queue
        self.max_prompt_tokens = max_prompt_tokens  # None: the models' context decides
        self.queue: AdmissionQueue[Job] = AdmissionQueue(max_queue)
        self._running: Job | None = None
        self._condition = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.metrics = Metrics(self.running_count, self.waiting_count)

    def running_count(self) -> int:
        return int(self._running is not None)

    def waiting_count(self) -> int:
        return len(self.queue)

    @property
    def alive(self) -> bool:
        running = self._thread is not None and self._thread.is_alive()
        return running and not self._stopping and not self.queue.closed

    def drain(self) -> None:
        """Admit no new request (503); the running and waiting ones still finish."""
        self.queue.close()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="mcsd-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._condition:
            self._stopping = True
            self.queue.close()
            for job in self.queue.clear():
                job.cancelled.set()
            if self._running is not None:
                self._running.cancelled.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> int:
        """Queue ``job``; returns how many requests are ahead of it."""
        if not self.alive:
            raise ShuttingDown
        try:
            return self.queue.put(job) + self.running_count()
        except Closed:
            raise ShuttingDown from None

    def cancel(self, job: Job) -> None:
        """The client is gone: forget the job if it waits, stop it after this step if it runs."""
        with self._condition:
            if job.done or job.cancelled.is_set():
                return
            job.cancelled.set()
            if self.queue.cancel(job):
                job.done = True
                self.metrics.requests.labels("cancelled").inc()

    def _loop(self) -> None:
        while True:
            taken = self.queue.take(1)
            with self._condition:
                if not taken or self._stopping:  # closed and empty, or stopped
                    for job in taken:
                        job.cancelled.set()
                    return
                job = taken[0]
                self._running = job
            try:
                self._run(job)
            finally:
                with self._condition:
                    self._running = None

    def _run(self, job: Job) -> None:
        metrics = self.metrics
        started = time.perf_counter()
        metrics.queue_time.observe(started - job.arrival)
        outcome, first, last = "error", None, started
        try:
            if job.cancelled.is_set():  # the client left between leaving the queue and now
                outcome = "cancelled"
                return
            prompt_ids = encode_prompt(self.pair.tokenizer, job.prompt, chat=job.chat)
            job.prompt_tokens = len(prompt_ids)
            _check_prompt_tokens(job.prompt_tokens, self.max_prompt_tokens)
            generation = stream(self.pair, prompt_ids, job.spec)
            try:
                for chunk, stats in generation:
                    now = time.perf_counter()
                    if first is None:
                        first = now
                        metrics.ttft.observe(now - job.arrival)
                        metrics.prompt_tokens.inc(job.prompt_tokens)
                    else:
                        metrics.itl.observe(now - last)
                    last = now
                    metrics.observe_batch(1)
                    metrics.observe_step(stats.records[-1], len(chunk.token_ids))
                    job.completion_tokens += len(chunk.token_ids)
                    if chunk.finish_reason is not None:
                        outcome = chunk.finish_reason
                        metrics.observe_row(stats)
                        job.done = True
                        job.post(chunk)
                        job.post(Finished(chunk.finish_reason, stats))
                        break
                    job.post(chunk)
                    if job.cancelled.is_set():
                        outcome = "cancelled"
                        break
            finally:
                generation.close()  # a cancelled job stops here, between two steps
        except ValueError as error:
            # Before the first token a ValueError is the request's fault (prompt beyond the
            # context, empty prompt, a tree wider than the vocabulary): a 400.
            if first is None:
                outcome = "invalid"
                job.done = True
                message = str(error)
                param = job.prompt_param if "prompt" in message else None
                if param is not None and not message.startswith(param):
                    message = f"{param}: {message}"  # e.g. "messages: prompt has 9000 tokens..."
                job.post(Failed(APIError(400, message, param=param), True))
            else:
                self._fail(job, error, first is None)
        except Exception as error:
            self._fail(job, error, first is None)
        finally:
            end = time.perf_counter()
            if job.completion_tokens > 1 and first is not None:
                metrics.tpot.observe((last - first) / (job.completion_tokens - 1))
            if outcome not in ("invalid", "error"):
                metrics.e2e.observe(end - job.arrival)
            metrics.requests.labels(outcome).inc()
            job.done = True

    @staticmethod
    def _fail(job: Job, error: Exception, before_output: bool) -> None:
        log.exception("generation failed")
        job.done = True
        job.post(Failed(failure_of(error), before_output))


def _check_prompt_tokens(tokens: int, limit: int | None) -> None:
    """The server's prompt limit (``--max-prompt-tokens``); a ValueError is a 400."""
    if limit is not None and tokens > limit:
        raise ValueError(
            f"prompt has {tokens} tokens; this server accepts at most {limit} (--max-prompt-tokens)"
        )
