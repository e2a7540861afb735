"""Continuous batching: a worker thread feeds the requests of a bounded first-in-first-out
queue to one engine (``mcsd.engine.Engine``) of ``max_batch`` rows and posts every step.

Each turn of the loop takes as many waiting jobs as there are free rows, tokenises them and
adds them to the engine (which admits them into rows at its next step; a prompt is read in a
forward of its own), runs one step of the engine and posts every row's chunk to its job.
Requests of every kind share the engine and its forwards: static, dynamic, context and mixed
trees, any rule and draft sampling, and plain decoding (``"tree": "none"``), each with its own
plan. The HTTP side (asyncio) submits a ``Job`` and reads its events from an ``asyncio.Queue``
(posted with ``loop.call_soon_threadsafe``). Cancelling a job (client gone) removes it from the
queue if it waits, or aborts its request before the next step if it runs, so a disconnect frees
its row within one speculative step. A failure inside a step fails the running requests (500,
or 503 for device out-of-memory: ``mcsd.server.failures``) and the engine is rebuilt for the
next request.

Tokenising happens in the worker thread too: a tokenizer is not safe to use from two threads.
The waiting requests live in an ``AdmissionQueue`` (``mcsd.server.admission``): beyond the free
rows, at most ``max_queue`` wait, more get 429; a drain (SIGTERM) closes it and the running and
waiting requests still finish.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

from mcsd.api import Chunk, ModelPair, Prompt, TextRow, encode_prompt
from mcsd.config import SpecConfig
from mcsd.engine import Engine, Step
from mcsd.errors import ParamError
from mcsd.request import Request
from mcsd.server.admission import AdmissionQueue, Closed, QueueFull
from mcsd.server.failures import failure_of
from mcsd.server.metrics import Metrics
from mcsd.server.schemas import APIError, param_error
from mcsd.stats import Stats
from mcsd.tree import TokenTree

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
    sees (400 when the prompt was refused before any token, 500 / 503 otherwise)."""

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


@dataclass
class _Running:
    """A job's request in the engine, its text state and timings."""

    job: Job
    request: Request
    text: TextRow
    started: float
    first: float | None = None
    last: float = 0.0


class Scheduler:
    """The queue, the running rows and the worker thread (``start`` / ``stop`` follow the
    server's lifespan)."""

    def __init__(
        self,
        pair: ModelPair,
        *,
        max_queue: int,
        max_prompt_tokens: int | None = None,
        max_batch: int = 1,
        budget_tree: TokenTree | None = None,
    ) -> None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        AdmissionQueue(max_queue)  # refuses a bad max_queue, naming it
        self.pair = pair
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.max_prompt_tokens = max_prompt_tokens  # None: the models' context decides
        # the requests growing this tree get the adaptive budget (it shrinks with the batch)
        self.budget_tree = budget_tree
        # the free rows' requests pass through it too: submit counts only those beyond them
        self.queue: AdmissionQueue[Job] = AdmissionQueue(max_queue + max_batch)
        self._held = 0  # requests taken from the queue and not finished (admitted or running)
        self._running: dict[Request, _Running] = {}
        self._engine: Engine | None = None  # built for the first request, after a failure
        self._condition = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.metrics = Metrics(self.running_count, self.waiting_count)

    def running_count(self) -> int:
        return self._held

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
            for running in self._running.values():
                running.job.cancelled.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> int:
        """Queue ``job``; returns how many requests are ahead of it (beyond the free rows)."""
        with self._condition:
            if not self.alive:
                raise ShuttingDown
            # Room for ``max_batch`` running generations plus ``max_queue`` waiting ones.
            free = max(0, self.max_batch - self._held)
            if len(self.queue) - free >= self.max_queue:
                raise QueueFull
            try:
                ahead = self.queue.put(job)
            except Closed:
                raise ShuttingDown from None
            return max(0, ahead - free)

    def cancel(self, job: Job) -> None:
        """The client is gone: forget the job if it waits, free its row before the next step if
        it runs."""
        with self._condition:
            if job.done or job.cancelled.is_set():
                return
            job.cancelled.set()
            if self.queue.cancel(job):
                job.done = True
                self.metrics.requests.labels("cancelled").inc()

    # ------------------------------------------------------------------ the worker thread
    def _loop(self) -> None:
        while True:
            if self._stopping:
                for running in list(self._running.values()):
                    self._end(running, "cancelled")
                return
            free = self.max_batch - self._held
            admitted: list[Job] = []
            if free > 0:
                # idle: wait for a request; else take what waits and step on
                idle = not self._running
                with self._condition:
                    if not idle:
                        admitted = self.queue.take(free, timeout=0)
                        self._held += len(admitted)
                if idle:
                    admitted = self.queue.take(free)
                    with self._condition:
                        self._held += len(admitted)
                    if not admitted:  # closed and empty (a drain or a stop): done
                        return
            for job in admitted:
                self._admit(job)
            self._drop_cancelled()
            self._step()

    @property
    def engine(self) -> Engine:
        """The engine of every request (built on first use, again after a failed step)."""
        if self._engine is None:
            self._engine = self.pair.batch_engine(self.max_batch, budget_tree=self.budget_tree)
        return self._engine

    def _admit(self, job: Job) -> None:
        """Tokenise ``job`` and add it to the engine (a 400 when its prompt or spec is
        refused: everything about a request is checked before it is queued)."""
        started = time.perf_counter()
        self.metrics.queue_time.observe(started - job.arrival)
        if job.cancelled.is_set():  # the client left between leaving the queue and now
            self._finish_job(job, "cancelled")
            return
        try:
            try:
                prompt_ids = encode_prompt(self.pair.tokenizer, job.prompt, chat=job.chat)
                job.prompt_tokens = len(prompt_ids)
                _check_prompt_tokens(job.prompt_tokens, self.max_prompt_tokens)
            except ValueError as error:
                raise ParamError(str(error), param="prompt") from error
            stop = self.pair.stop_ids(job.spec)
            request = self.engine.add_request(prompt_ids, job.spec, stop_token_ids=stop)
        except ValueError as error:
            # Before the first token a ValueError is the request's fault (prompt beyond the
            # context, empty prompt, a tree wider than the vocabulary): a 400.
            job.post(Failed(_request_error(error, job.prompt_param), True))
            self._finish_job(job, "invalid")
            return
        except Exception as error:
            self._fail(job, error, True)
            self._finish_job(job, "error")
            return
        text = TextRow(0, self.pair.tokenizer, job.spec.stop_strings)
        with self._condition:
            self._running[request] = _Running(job, request, text, started, last=started)

    def _drop_cancelled(self) -> None:
        for running in list(self._running.values()):
            if running.job.cancelled.is_set():
                self._end(running, "cancelled")

    def _step(self) -> None:
        """One step of the engine; every request's chunk to its job."""
        if not self._running:
            return
        try:
            steps = self.engine.step()
            self.metrics.observe_batch(len(steps))
        except Exception as error:
            self._engine = None  # its caches are mid-step: rebuild it for the next request
            for running in list(self._running.values()):
                self._fail(running.job, error, running.first is None)
                self._end(running, "error", abort=False)
            return
        for request, step in steps:
            running = self._running[request]
            try:
                self._post_step(running, step)
            except Exception as error:  # e.g. detokenising: this row fails, the others go on
                self._fail(running.job, error, running.first is None)
                self._end(running, "error")

    def _post_step(self, running: _Running, step: Step) -> None:
        """Send one step of ``running``'s request to its client; end it when it finished."""
        metrics, job = self.metrics, running.job
        chunk = running.text.feed(step)
        now = time.perf_counter()
        if running.first is None:
            running.first = now
            metrics.ttft.observe(now - job.arrival)
            metrics.prompt_tokens.inc(job.prompt_tokens)
        else:
            metrics.itl.observe(now - running.last)
        running.last = now
        metrics.observe_step(step.record, len(chunk.token_ids))
        job.completion_tokens += len(chunk.token_ids)
        job.post(chunk)
        if chunk.finish_reason is not None:
            metrics.observe_row(running.text.stats)
            job.done = True
            job.post(Finished(chunk.finish_reason, running.text.stats))
            self._end(running, chunk.finish_reason)

    def _end(self, running: _Running, outcome: str, *, abort: bool = True) -> None:
        """Free ``running``'s row (a stop string or a cancel ends it before the engine does)
        and record its outcome."""
        if abort and self._engine is not None:
            self._engine.abort(running.request)
        with self._condition:
            del self._running[running.request]
        job, metrics = running.job, self.metrics
        if job.completion_tokens > 1 and running.first is not None:
            metrics.tpot.observe((running.last - running.first) / (job.completion_tokens - 1))
        if outcome != "error":
            metrics.e2e.observe(time.perf_counter() - job.arrival)
        self._finish_job(job, outcome, observed=True)

    def _finish_job(self, job: Job, outcome: str, *, observed: bool = False) -> None:
        """Record a taken request's outcome; its row (if any) is free again."""
        if not observed and outcome not in ("invalid", "error"):
            self.metrics.e2e.observe(time.perf_counter() - job.arrival)
        self.metrics.requests.labels(outcome).inc()
        job.done = True
        with self._condition:
            self._held -= 1

    @staticmethod
    def _fail(job: Job, error: Exception, before_output: bool) -> None:
        log.exception("generation failed")
        job.done = True
        job.post(Failed(failure_of(error), before_output))


def _request_error(error: ValueError, prompt_param: str) -> APIError:
    """The 400 of a refused request: ``param`` from the error (``ParamError``), the prompt's
    errors under the request field the prompt came from ("prompt" or "messages")."""
    message = str(error)
    if isinstance(error, ParamError) and error.param == "prompt":
        if not message.startswith(prompt_param):
            message = f"{prompt_param}: {message}"  # e.g. "messages: prompt has 9000 tokens..."
        return APIError(400, message, param=prompt_param)
    return param_error(error)


def _check_prompt_tokens(tokens: int, limit: int | None) -> None:
    """The server's prompt limit (``--max-prompt-tokens``); a ValueError is a 400."""
    if limit is not None and tokens > limit:
        raise ValueError(
            f"prompt has {tokens} tokens; this server accepts at most {limit} (--max-prompt-tokens)"
        )
