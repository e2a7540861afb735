"""The FastAPI application: OpenAI-compatible endpoints over one ``ModelPair``.

    POST /v1/completions        text (or token-id) prompt
    POST /v1/chat/completions   chat messages, the tokenizer's chat template applied
    GET  /v1/models             the served model, with the speculation defaults and the concurrency
    GET  /health                200 while the worker runs (with running / waiting counts), else 503
                                ("draining" after SIGTERM); open even with an API key
    GET  /metrics               Prometheus text format (see ``mcsd.server.metrics``)

Streaming answers are server-sent events in OpenAI's chunk format; one speculative step may
commit several tokens, and they travel in one chunk. With ``stream_options.include_usage`` the
last chunk carries ``usage`` with a ``speculative`` summary (tree, rule, steps, mean accepted
length, acceptance per depth, tokens per step); non-streaming answers always carry it.
Every error is ``{"error": {"message", "type", "param", "code"}}`` with a 4xx/5xx status; a
stack trace never reaches a client. Hardening: an API key (``mcsd.server.auth``; 401 without it),
request limits (``ServeLimits``: 413 for the body, 400 naming the field otherwise), a bounded
queue (``mcsd.server.admission``; 429 beyond it, 503 while draining), a broken generation fails
only its request (``mcsd.server.failures``: 500, or 503 for device out-of-memory), and SIGTERM
drains (``mcsd.server.drain``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from mcsd import __version__
from mcsd.api import Chunk, ModelPair
from mcsd.api import adaptive_tree as adaptive_tree_of
from mcsd.config import SpecConfig
from mcsd.server.auth import BearerAuth
from mcsd.server.defaults import ServeDefaults, ServeLimits
from mcsd.server.metrics import CONTENT_TYPE, Metrics
from mcsd.server.schemas import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    Limits,
    invalid,
    messages_of,
    parse_request,
    prompt_of,
    spec_for,
)
from mcsd.server.worker import Failed, Finished, Job, QueueFull, Scheduler, ShuttingDown
from mcsd.stats import Stats

log = logging.getLogger("mcsd.server")

DISCONNECT_POLL_S = ServeDefaults.disconnect_poll_s
UNBOUNDED_MAX_TOKENS = ServeDefaults.unbounded_max_tokens


class _Disconnected(Exception):
    pass


def create_app(
    pair: ModelPair,
    defaults: SpecConfig | None = None,
    *,
    model_name: str | None = None,
    max_queue: int = ServeDefaults.max_queue,
    limits: ServeLimits | None = None,
    api_key: str | None = None,
    max_batch: int = ServeDefaults.max_batch,
    adaptive_tree: bool = ServeDefaults.adaptive_tree,
) -> FastAPI:
    """An ASGI app serving ``pair``; ``defaults`` are the speculation settings a request may
    override (``mcsd`` object, sampling fields), ``limits`` what one request may ask for, and
    ``api_key`` (if given) the bearer token every request but ``/health`` must carry;
    ``max_batch``: generations decoded side by side (continuous batching); ``adaptive_tree``:
    the tree shrinks with the batch, from a step cost measured when an engine is built
    (``mcsd.budget``). Run it with uvicorn (``mcsd serve`` does, under
    ``mcsd.server.drain.DrainingServer``)."""
    defaults = defaults or SpecConfig()
    serve_limits = limits or ServeLimits()
    scheduler = Scheduler(
        pair,
        max_queue=max_queue,
        max_prompt_tokens=serve_limits.max_prompt_tokens,
        max_batch=max_batch,
        budget_tree=adaptive_tree_of(defaults) if adaptive_tree else None,
    )
    server = _Server(
        pair,
        defaults,
        serve_limits,
        scheduler,
        model_name=model_name or pair.target_name,
        max_queue=max_queue,
        max_batch=max_batch,
    )
    app = FastAPI(title="mcsd", version=__version__, lifespan=_lifespan(scheduler))
    app.state.scheduler = scheduler
    if api_key is not None:
        app.add_middleware(BearerAuth, key=api_key)
    _add_error_handlers(app)
    server.add_routes(app)
    return app


def _lifespan(scheduler: Scheduler) -> Any:
    """The worker runs while the app does."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        yield
        await asyncio.to_thread(scheduler.stop)

    return lifespan


def _add_error_handlers(app: FastAPI) -> None:
    """Every error is an OpenAI error object; a stack trace never reaches a client."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        headers = {"Retry-After": "1"} if error.status in (429, 503) else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        body = APIError(error.status_code, str(error.detail), type=kind).body()
        return JSONResponse(body, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse(invalid(str(error), None).body(), status_code=400)

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error")
        message = f"internal error: {type(error).__name__}"
        return JSONResponse(APIError(500, message, type="server_error").body(), status_code=500)


class _Server:
    """The endpoints over one scheduler: what a request may ask for (``Limits``), the model
    card, and a generation's path from the request body to its response or event stream."""

    def __init__(
        self,
        pair: ModelPair,
        defaults: SpecConfig,
        serve_limits: ServeLimits,
        scheduler: Scheduler,
        *,
        model_name: str,
        max_queue: int,
        max_batch: int,
    ) -> None:
        self.pair = pair
        self.defaults = defaults
        self.serve_limits = serve_limits
        self.scheduler = scheduler
        self.metrics = scheduler.metrics
        self.model_name = model_name
        self.max_queue = max_queue
        self.max_batch = max_batch
        models = (pair.target, pair.draft)
        contexts = [m.max_context for m in models if m is not None and m.max_context]
        self.context = min(contexts) if contexts else UNBOUNDED_MAX_TOKENS
        self.limits = Limits(
            vocab_size=pair.vocab_size,
            max_tokens=min(self.context, serve_limits.max_tokens or self.context),
            max_stop=serve_limits.max_stop,
            max_stop_length=serve_limits.max_stop_length,
        )
        self.created = int(time.time())

    def add_routes(self, app: FastAPI) -> None:
        app.get("/health")(self.health)
        app.get("/metrics")(self.prometheus)
        app.get("/v1/models")(self.models)
        app.post("/v1/completions")(self.completions)
        app.post("/v1/chat/completions")(self.chat_completions)

    async def health(self) -> JSONResponse:
        scheduler = self.scheduler
        state = "draining" if scheduler.queue.closed else "unavailable"
        status = {
            "status": "ok" if scheduler.alive else state,
            "running": scheduler.running_count(),
            "waiting": scheduler.waiting_count(),
        }
        return JSONResponse(status, status_code=200 if scheduler.alive else 503)

    async def prometheus(self) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict[str, Any]:
        defaults, limits, max_batch = self.defaults, self.limits, self.max_batch
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "mcsd",
            "max_model_len": self.context,
            "mcsd": {
                "target": self.pair.target_name,
                "draft": self.pair.draft_name,
                "max_concurrent_generations": max_batch,
                "batching": max_batch > 1,
                "scheduling": f"continuous batching of up to {max_batch} generations; requests "
                f"wait in a FIFO queue of at most {self.max_queue}, beyond which the server "
                "answers 429",
                "defaults": {
                    "tree": defaults.describe_tree(),
                    "rule": defaults.rule or "auto",
                    "temperature": defaults.target.temperature,
                    "top_p": defaults.target.top_p,
                    "top_k": defaults.target.top_k,
                    "draft_temperature": defaults.draft_sampling.temperature,
                    "max_tokens": defaults.max_new_tokens,
                },
                "limits": {
                    "max_body_bytes": self.serve_limits.max_body_bytes,
                    "max_prompt_tokens": self.serve_limits.max_prompt_tokens or self.context,
                    "max_tokens": limits.max_tokens,
                    "max_stop": limits.max_stop,
                    "max_stop_length": limits.max_stop_length,
                    "max_queue": self.max_queue,
                },
            },
        }

    async def completions(self, request: Request) -> Response:
        with _count_invalid(self.metrics):
            body = await self._parse(request, CompletionRequest)
            assert isinstance(body, CompletionRequest)
            prompt = prompt_of(body, self.limits)
            spec = spec_for(body, self.defaults, self.limits)
        return await self._generate(request, body, prompt, spec, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        with _count_invalid(self.metrics):
            body = await self._parse(request, ChatCompletionRequest)
            assert isinstance(body, ChatCompletionRequest)
            messages = messages_of(body)
            spec = spec_for(body, self.defaults, self.limits)
        return await self._generate(request, body, messages, spec, chat=True)

    async def _parse(self, request: Request, model: type[Any]) -> Any:
        """The request's body, read within the size limit and validated, for this model."""
        body = parse_request(model, await _read_json(request, self.serve_limits.max_body_bytes))
        _check_model(body.model, self.model_name)
        return body

    async def _generate(
        self, request: Request, body: Any, prompt: Any, spec: SpecConfig, *, chat: bool
    ) -> Response:
        """Queue the generation, wait for its first event, then answer: a stream of events or
        one response with every chunk."""
        job = Job(prompt, chat, spec, "messages" if chat else "prompt", asyncio.get_running_loop())
        self._submit(job)
        view = _View(chat, self.model_name, body.return_token_ids, spec)
        streaming = False  # once the response streams, _sse owns the job's cancellation
        try:
            first = await self._next_event(request, job)  # waits for our turn and the first step
            if isinstance(first, Failed):
                raise first.error
            if body.stream:
                include_usage = body.stream_options is not None and (
                    body.stream_options.include_usage
                )
                streaming = True
                return StreamingResponse(
                    self._sse(job, first, view, include_usage),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                    background=BackgroundTask(self.scheduler.cancel, job),
                )
            return JSONResponse(await self._whole_response(request, job, first, view))
        except _Disconnected:
            return Response(status_code=499)  # nobody reads it; the job is already cancelled
        finally:
            if not streaming:
                self.scheduler.cancel(job)  # a no-op unless something above broke off early

    def _submit(self, job: Job) -> None:
        """Queue the job: 429 when the queue is full, 503 while the server shuts down."""
        try:
            self.scheduler.submit(job)
        except QueueFull:
            self.metrics.requests.labels("rejected").inc()
            raise APIError(
                429,
                f"the server is busy: every row of {self.max_batch} is generating and "
                f"{self.max_queue} requests are already waiting (--max-queue); retry later",
                type="rate_limit_error",
                code="queue_full",
            ) from None
        except ShuttingDown:
            self.metrics.requests.labels("unavailable").inc()
            raise APIError(
                503, "the server is shutting down", type="server_error", code="unavailable"
            ) from None

    async def _whole_response(
        self, request: Request, job: Job, first: Chunk, view: _View
    ) -> dict[str, Any]:
        """Every chunk of a non-streamed generation, as one response."""
        chunks: list[Chunk] = [first]
        while not isinstance(event := await self._next_event(request, job), Finished | Failed):
            chunks.append(event)
        if isinstance(event, Failed):
            raise event.error
        return view.response(chunks, event, job)

    async def _next_event(self, request: Request, job: Job) -> Any:
        """The job's next event; cancels the job if the client goes away meanwhile (checked at
        least every ``DISCONNECT_POLL_S``, also while events keep arriving)."""
        while True:
            now = time.monotonic()
            if now - job.client_checked >= DISCONNECT_POLL_S:
                job.client_checked = now
                if await request.is_disconnected():
                    self.scheduler.cancel(job)
                    raise _Disconnected
            try:
                return await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
            except TimeoutError:
                pass

    async def _sse(
        self, job: Job, event: Any, view: _View, include_usage: bool
    ) -> AsyncIterator[str]:
        # A client that disconnects makes Starlette cancel this generator; ``finally`` and the
        # response's background task then cancel the job, which stops after the current step.
        try:
            while True:
                if isinstance(event, Chunk):
                    yield _data(view.chunk(event))
                elif isinstance(event, Finished):
                    if include_usage:
                        yield _data(view.usage_chunk(event.stats, job))
                    break
                else:
                    yield _data(event.error.body())
                    break
                event = await job.events.get()
            yield "data: [DONE]\n\n"
        finally:
            self.scheduler.cancel(job)


@contextmanager
def _count_invalid(metrics: Metrics) -> Iterator[None]:
    """Count a request refused before it reached the queue as outcome "invalid"."""
    try:
        yield
    except APIError:
        metrics.requests.labels("invalid").inc()
        raise


def _check_model(requested: str | None, served: str) -> None:
    if requested is not None and requested != served:
        raise APIError(
            404,
            f"model {requested!r} is not served here; this server serves {served!r}",
            param="model",
            type="not_found_error",
            code="model_not_found",
        )


async def _read_json(request: Request, max_bytes: int) -> object:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:  # refused before reading a byte
        raise _too_large(max_bytes)
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > max_bytes:
            raise _too_large(max_bytes)
    if not body:
        raise invalid("the request body is empty; send a JSON object", None)
    try:
        return json.loads(body, parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError) as error:
        raise invalid(f"malformed JSON body: {error}", None) from None


def _too_large(max_bytes: int) -> APIError:
    return APIError(
        413,
        f"request body larger than {max_bytes} bytes, this server's limit (--max-body-bytes)",
        code="request_too_large",
    )


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _data(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def speculative_summary(spec: SpecConfig, stats: Stats) -> dict[str, Any]:
    """What speculation did for one request (``usage.speculative``)."""
    return {
        "tree": spec.describe_tree(),
        "tree_size": spec.tree_nodes,
        "rule": spec.resolved_rule(),
        "steps": stats.steps,
        "draft_tokens": sum(r.tree_size for r in stats.records),
        "accepted_tokens": sum(r.accepted for r in stats.records),
        "mean_accepted_length": stats.mean_accepted_length,
        "acceptance_per_depth": stats.acceptance_per_depth(),
        "accept_lengths": stats.accept_lengths,
        "draft_time": stats.draft_time,
        "target_time": stats.target_time,
    }


class _View:
    """Renders one request's events as OpenAI objects (completion or chat flavour)."""

    def __init__(self, chat: bool, model: str, token_ids: bool, spec: SpecConfig) -> None:
        self.chat = chat
        self.model = model
        self.token_ids = token_ids
        self.spec = spec
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.sent_role = False

    def _envelope(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def _choice(self, text: str, ids: list[int], finish: str | None, stream: bool) -> dict:
        choice: dict[str, Any] = {"index": 0}
        if not self.chat:
            choice["text"] = text
        elif stream:
            choice["delta"] = {"content": text}
            if not self.sent_role:
                choice["delta"] = {"role": "assistant", "content": text}
                self.sent_role = True
        else:
            choice["message"] = {"role": "assistant", "content": text}
        choice["logprobs"] = None
        choice["finish_reason"] = finish
        if self.token_ids:
            choice["token_ids"] = ids
        return choice

    def _kind(self, stream: bool) -> str:
        if not self.chat:
            return "text_completion"
        return "chat.completion.chunk" if stream else "chat.completion"

    def chunk(self, chunk: Chunk) -> dict[str, Any]:
        choice = self._choice(chunk.text, list(chunk.token_ids), chunk.finish_reason, True)
        return self._envelope(self._kind(True), [choice])

    def usage(self, stats: Stats, job: Job) -> dict[str, Any]:
        return {
            "prompt_tokens": job.prompt_tokens,
            "completion_tokens": job.completion_tokens,
            "total_tokens": job.prompt_tokens + job.completion_tokens,
            "speculative": speculative_summary(self.spec, stats),
        }

    def usage_chunk(self, stats: Stats, job: Job) -> dict[str, Any]:
        return self._envelope(self._kind(True), []) | {"usage": self.usage(stats, job)}

    def response(self, chunks: list[Chunk], end: Finished, job: Job) -> dict[str, Any]:
        text = "".join(c.text for c in chunks)
        ids = [t for c in chunks for t in c.token_ids]
        choice = self._choice(text, ids, end.finish_reason, False)
        return self._envelope(self._kind(False), [choice]) | {"usage": self.usage(end.stats, job)}
