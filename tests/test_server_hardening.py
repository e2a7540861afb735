"""``mcsd serve`` under bad actors and load: API key, request limits, a full queue, broken
generations, disconnects, SIGTERM drain and 16 concurrent clients. A live uvicorn server on
127.0.0.1 serves a tiny random Llama with SmolLM2's tokenizer; nothing of the server is mocked.
Deterministic holds use a gate on the target model's forward (the model, not the server, is
patched), so "the worker is busy" never depends on timing.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn
from conftest import save_tiny_lm
from prometheus_client.parser import text_string_to_metric_families

from mcsd import cli
from mcsd.api import ModelPair, load_pair
from mcsd.config import SamplingConfig, SpecConfig
from mcsd.server import create_app
from mcsd.server.admission import AdmissionQueue, Closed, QueueFull
from mcsd.server.auth import is_loopback
from mcsd.server.defaults import ServeLimits
from mcsd.server.drain import DrainingServer

KEY = "sk-test-key"
MAX_QUEUE = 16
LIMITS = ServeLimits(
    max_body_bytes=4096, max_prompt_tokens=24, max_tokens=32, max_stop=2, max_stop_length=8
)
MARK = 4242  # a token id: a prompt holding it makes the patched target forward fail
PROMPT = "def fibonacci(n):"


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoTokenizer

    from mcsd.sources import resolve

    tokenizer = AutoTokenizer.from_pretrained(resolve("smollm2-135m-instruct", progress=False))
    return save_tiny_lm(tmp_path_factory.mktemp("tiny-llama"), tokenizer, arch="llama")


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _load(model_dir: Path) -> ModelPair:
    return load_pair(str(model_dir), str(model_dir), dtype="float32", device="cpu", progress=False)


@pytest.fixture(scope="module")
def pair(model_dir: Path) -> ModelPair:
    return _load(model_dir)


class Live:
    """A server running in a thread: its base URL and the uvicorn server object."""

    def __init__(self, app: object, *, drain_timeout_s: float = 30.0) -> None:
        port = _free_port()
        config = uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=1
        )
        self.server = DrainingServer(config, app.state.scheduler, drain_timeout_s=drain_timeout_s)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _app(pair: ModelPair, **options: object) -> object:
    defaults = SpecConfig(target=SamplingConfig(temperature=0.0), max_new_tokens=8)
    return create_app(pair, defaults, model_name="tiny", **options)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def live(pair: ModelPair) -> Iterator[Live]:
    server = Live(_app(pair, max_queue=MAX_QUEUE, limits=LIMITS, api_key=KEY))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(live: Live) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0, timeout=60)


AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def gate(pair: ModelPair, monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Hold every target forward until the test sets the event (released at the end anyway)."""
    released = threading.Event()
    forward = pair.target.forward

    def held(*args: object, **kwargs: object) -> object:
        released.wait(30)
        return forward(*args, **kwargs)

    monkeypatch.setattr(pair.target, "forward", held)
    yield released
    released.set()


def _break_target(pair: ModelPair, monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    """The target forward raises ``error`` on the prefill of a prompt holding ``MARK``."""
    forward = pair.target.forward

    def broken(tokens: torch.Tensor, *args: object, **kwargs: object) -> object:
        if bool((tokens == MARK).any()):
            raise error
        return forward(tokens, *args, **kwargs)

    monkeypatch.setattr(pair.target, "forward", broken)


def _health(url: str) -> dict:
    return httpx.get(f"{url}/health").json()


def _wait(predicate: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _idle(url: str) -> bool:
    health = _health(url)
    return health["running"] == 0 and health["waiting"] == 0


def _metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", headers=AUTH).text
    return {
        sample.name + json.dumps(sample.labels, sort_keys=True): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and "Traceback" not in error["message"]
    return error


# ---------------------------------------------------------------------------- API key


def test_api_key(live: Live, client: openai.OpenAI) -> None:
    url = live.url
    body = {"prompt": PROMPT, "max_tokens": 2}
    missing = _error(httpx.post(f"{url}/v1/completions", json=body), 401)
    assert missing["code"] == "invalid_api_key" and "Authorization" in missing["message"]
    for header in (f"Bearer {KEY}x", f"Bearer {KEY[:-1]}", KEY, f"Basic {KEY}"):
        wrong = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": header})
        assert _error(wrong, 401)["code"] == "invalid_api_key"
    for path in ("/v1/models", "/metrics"):
        assert httpx.get(f"{url}{path}").status_code == 401
        assert httpx.get(f"{url}{path}", headers=AUTH).status_code == 200
    assert httpx.get(f"{url}/health").status_code == 200  # open: load balancers probe it
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()
    answer = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3)
    assert answer.usage.completion_tokens == 3


def test_loopback_hosts() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "127.0.0.2"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "example.com"))


# ---------------------------------------------------------------------------- limits


def test_body_too_large_is_413(live: Live) -> None:
    big = {"prompt": "x" * LIMITS.max_body_bytes}
    error = _error(httpx.post(f"{live.url}/v1/completions", json=big, headers=AUTH), 413)
    assert str(LIMITS.max_body_bytes) in error["message"] and "--max-body-bytes" in error["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: refused while it is read
        yield b'{"prompt": "'
        for _ in range(LIMITS.max_body_bytes // 1000 + 1):
            yield b"x" * 1000
        yield b'"}'

    chunked = httpx.post(f"{live.url}/v1/completions", content=chunks(), headers=AUTH)
    assert _error(chunked, 413)["code"] == "request_too_large"


TOO_MANY_TOKENS = "hello " * (LIMITS.max_prompt_tokens + 8)
LIMITED = [
    # (endpoint, body, param named, the allowed value the message names)
    ("completions", {"prompt": PROMPT, "max_tokens": 33}, "max_tokens", "[1, 32]"),
    ("chat/completions", {"max_completion_tokens": 99}, "max_completion_tokens", "[1, 32]"),
    ("completions", {"prompt": PROMPT, "stop": ["a", "b", "c"]}, "stop", "at most 2"),
    ("completions", {"prompt": PROMPT, "stop": "123456789"}, "stop", "at most 8"),
    ("chat/completions", {"stop": ["ok", "x" * 9]}, "stop", "stop[1]"),
    ("completions", {"prompt": TOO_MANY_TOKENS}, "prompt", "at most 24"),
    ("completions", {"prompt": TOO_MANY_TOKENS, "stream": True}, "prompt", "at most 24"),
    ("completions", {"prompt": list(range(1, 30))}, "prompt", "at most 24"),
    (
        "chat/completions",
        {"messages": [{"role": "user", "content": TOO_MANY_TOKENS}]},
        "messages",
        "at most 24",
    ),
    ("completions", {"prompt": PROMPT, "n": 2}, "n", "n must be 1"),
    ("chat/completions", {"n": 0}, "n", "n must be 1"),
]


@pytest.mark.parametrize(("endpoint", "body", "param", "allowed"), LIMITED, ids=range(len(LIMITED)))
def test_limits_are_400_naming_the_field(
    live: Live, endpoint: str, body: dict, param: str, allowed: str
) -> None:
    if endpoint.startswith("chat") and "messages" not in body:
        body = body | {"messages": [{"role": "user", "content": "hi"}]}
    response = httpx.post(f"{live.url}/v1/{endpoint}", json=body, headers=AUTH)
    error = _error(response, 400)
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert param in error["message"] and allowed in error["message"]


def test_limits_reach_the_models_card(client: openai.OpenAI) -> None:
    card = client.models.list().data[0].model_extra["mcsd"]["limits"]
    assert card["max_tokens"] == LIMITS.max_tokens and card["max_stop"] == LIMITS.max_stop
    assert card["max_queue"] == MAX_QUEUE


def test_bad_limits_are_a_value_error_naming_the_field() -> None:
    for field, value in (("max_stop", 0), ("max_tokens", -1), ("max_body_bytes", 1.5)):
        with pytest.raises(ValueError, match=field):
            ServeLimits(**{field: value})


# ---------------------------------------------------------------------------- queue


def test_full_queue_is_429(live: Live, gate: threading.Event) -> None:
    """Every row is held by the gate and MAX_QUEUE requests wait: the next one gets 429."""

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=live.url, timeout=60, headers=AUTH) as http:
            body = {"prompt": PROMPT, "max_tokens": 2}
            held: list[asyncio.Task] = []

            async def admitted() -> tuple[int, int]:
                health = (await http.get("/health")).json()
                return health["running"] + health["waiting"], health["waiting"]

            while (now := await admitted())[1] < MAX_QUEUE:
                held.append(asyncio.create_task(http.post("/v1/completions", json=body)))
                deadline = time.monotonic() + 10
                while (await admitted())[0] == now[0]:
                    assert time.monotonic() < deadline, "a request was never admitted"
                    await asyncio.sleep(0.005)
            refused = await http.post("/v1/completions", json=body)
            error = _error(refused, 429)
            assert error["code"] == "queue_full" and "--max-queue" in error["message"]
            assert refused.headers["retry-after"]
            gate.set()
            answers = await asyncio.gather(*held)
            assert [a.status_code for a in answers] == [200] * len(held)

    asyncio.run(scenario())
    _wait(lambda: _idle(live.url), "an idle server")


def test_admission_queue_interface() -> None:
    queue: AdmissionQueue[list[int]] = AdmissionQueue(max_waiting=3)
    a, b, c, d, e = ([1] for _ in range(5))  # equal, yet different requests
    assert [queue.put(x) for x in (a, b, c)] == [0, 1, 2]
    with pytest.raises(QueueFull):
        queue.put(d)
    assert queue.cancel(b) and not queue.cancel(b) and not queue.cancel(d)
    taken = queue.take(5)
    assert len(taken) == 2 and taken[0] is a and taken[1] is c
    assert queue.take(1, timeout=0.01) == []  # empty: the timeout, not a hang
    queue.put(e)
    queue.close()
    with pytest.raises(Closed):
        queue.put(d)
    assert queue.take(2)[0] is e  # a drain still hands out what waits
    assert queue.take(2) == []  # closed and empty: at once
    with pytest.raises(ValueError, match="max_queue"):
        AdmissionQueue(-1)
    with pytest.raises(ValueError, match="n must be"):
        queue.take(0)


# ---------------------------------------------------------------------------- failures


def test_generation_error_is_500_while_others_complete(
    live: Live, client: openai.OpenAI, pair: ModelPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts = [f"{PROMPT} # {i}" for i in range(4)]
    expected = [client.completions.create(model="tiny", prompt=p).choices[0].text for p in prompts]
    _break_target(pair, monkeypatch, RuntimeError("injected failure"))
    before = _metrics(live.url)

    def one(prompt: str | list[int]) -> object:
        try:
            return client.completions.create(model="tiny", prompt=prompt).choices[0].text
        except openai.InternalServerError as error:
            return error

    with ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(one, [*prompts[:2], [MARK, 11, 12], *prompts[2:]]))
    failed = answers.pop(2)
    assert isinstance(failed, openai.InternalServerError)
    assert failed.status_code == 500 and "injected failure" in failed.body["message"]
    assert answers == expected
    errors = 'mcsd:requests_total{"outcome": "error"}'
    assert _metrics(live.url)[errors] - before[errors] == 1


def test_out_of_memory_is_503_and_frees_the_request(
    live: Live, client: openai.OpenAI, pair: ModelPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    _break_target(pair, monkeypatch, torch.cuda.OutOfMemoryError("CUDA out of memory (injected)"))
    response = httpx.post(
        f"{live.url}/v1/completions", json={"prompt": [MARK, 1, 2], "stream": True}, headers=AUTH
    )
    error = _error(response, 503)
    assert error["code"] == "out_of_memory" and response.headers["retry-after"]
    _wait(lambda: _idle(live.url), "the failed request to be freed")
    assert client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4).usage
    monkeypatch.undo()


def test_client_that_disconnects_mid_stream(
    live: Live, client: openai.OpenAI, pair: ModelPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    forward = pair.target.forward

    def slow(*args: object, **kwargs: object) -> object:  # 32 steps take 1.6 s at least
        time.sleep(0.05)
        return forward(*args, **kwargs)

    monkeypatch.setattr(pair.target, "forward", slow)
    before = _metrics(live.url)
    body = {"prompt": PROMPT, "max_tokens": 32, "stream": True, "mcsd": {"tree": "1"}}
    with (
        httpx.Client(timeout=30, headers=AUTH) as http,
        http.stream("POST", f"{live.url}/v1/completions", json=body) as response,
    ):
        assert response.status_code == 200
        next(response.iter_lines())
    _wait(lambda: _idle(live.url), "the cancelled generation to stop", timeout=5)
    after = _metrics(live.url)
    cancelled = 'mcsd:requests_total{"outcome": "cancelled"}'
    assert after[cancelled] - before[cancelled] == 1
    tokens = "mcsd:generation_tokens_total{}"
    assert after[tokens] - before[tokens] < 32
    monkeypatch.undo()
    assert client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2).usage


# ---------------------------------------------------------------------------- load


def test_sixteen_concurrent_clients_equal_one(live: Live, client: openai.OpenAI) -> None:
    prompts = [f"# task {i}\ndef solve_{i}(x):" for i in range(16)]

    def ask(prompt: str) -> str:
        answer = client.completions.create(model="tiny", prompt=prompt, max_tokens=12)
        assert answer.usage.completion_tokens == 12
        return answer.choices[0].text

    alone = [ask(p) for p in prompts]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone
    assert len(set(alone)) > 1  # the prompts do lead to different answers


def test_metrics_of_batching(live: Live, client: openai.OpenAI) -> None:
    before = _metrics(live.url)
    answer = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=9)
    after = _metrics(live.url)
    summary = answer.usage.model_extra["speculative"]
    steps = summary["steps"]
    assert after["mcsd:batch_size_count{}"] - before["mcsd:batch_size_count{}"] == steps
    rows = "mcsd:request_mean_accepted_length"
    assert after[rows + "_count{}"] - before[rows + "_count{}"] == 1
    assert after[rows + "_sum{}"] - before[rows + "_sum{}"] == pytest.approx(
        summary["mean_accepted_length"]
    )
    assert after["mcsd:num_requests_waiting{}"] == 0
    assert after["mcsd:num_requests_running{}"] == 0


# ---------------------------------------------------------------------------- SIGTERM


def test_sigterm_drains_then_exits(model_dir: Path) -> None:
    """In-flight generations finish, new requests get 503, then the server exits."""
    live = Live(_app(_load(model_dir), max_queue=4), drain_timeout_s=30)
    body = {"prompt": PROMPT, "max_tokens": 24, "stream": True, "mcsd": {"tree": "1"}}
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", f"{live.url}/v1/completions", json=body) as response,
    ):
        lines = response.iter_lines()
        first = next(line for line in lines if line)
        live.server.handle_exit(signal.SIGTERM, None)
        refused = httpx.post(f"{live.url}/v1/completions", json={"prompt": "x"})
        assert _error(refused, 503)["code"] == "unavailable"
        counted = httpx.get(f"{live.url}/metrics").text
        assert 'mcsd:requests_total{outcome="unavailable"} 1.0' in counted
        health = httpx.get(f"{live.url}/health")
        assert health.status_code == 503 and health.json()["status"] == "draining"
        events = [first, *(line for line in lines if line)]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    live.thread.join(10)
    assert not live.thread.is_alive()


def test_sigterm_drain_is_bounded(model_dir: Path) -> None:
    pair = _load(model_dir)
    released = threading.Event()
    forward = pair.target.forward

    def held(*args: object, **kwargs: object) -> object:
        released.wait(30)
        return forward(*args, **kwargs)

    pair.target.forward = held  # type: ignore[method-assign]
    live = Live(_app(pair, max_queue=4), drain_timeout_s=0.5)
    try:
        outcome: list[object] = []

        def held_request() -> None:
            try:
                body = {"prompt": "x"}
                outcome.append(httpx.post(f"{live.url}/v1/completions", json=body, timeout=30))
            except httpx.HTTPError as error:  # cut off by the shutdown after the deadline
                outcome.append(error)

        client = threading.Thread(target=held_request, daemon=True)
        client.start()
        _wait(lambda: _health(live.url)["running"] == 1, "the held request to run")
        signalled = time.monotonic()
        live.server.handle_exit(signal.SIGTERM, None)
        _wait(lambda: live.server.should_exit, "the drain deadline", timeout=5)
        assert 0.5 <= time.monotonic() - signalled < 5.0  # 0.5 s, not the default 30
    finally:
        released.set()
    live.thread.join(15)
    client.join(15)
    assert not live.thread.is_alive() and outcome  # the held client got its answer or an end


def test_mcsd_serve_key_from_environment_and_sigterm(model_dir: Path) -> None:
    """``mcsd serve`` as users run it: the key from MCSD_API_KEY, a real SIGTERM mid-stream."""
    port = _free_port()
    command = [sys.executable, "-m", "mcsd.cli", "serve", "--target", str(model_dir)]
    command += ["--draft", str(model_dir), "--dtype", "float32", "--device", "cpu"]
    command += ["--port", str(port), "--tree", "1", "--log-level", "warning", "--max-stop", "3"]
    env = os.environ | {"OMP_NUM_THREADS": "1", "MCSD_API_KEY": KEY}
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            assert time.monotonic() < deadline, "mcsd serve did not come up"
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert httpx.get(f"{url}/v1/models").status_code == 401
        body = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0, "stream": True}
        with (
            httpx.Client(timeout=30, headers=AUTH) as http,
            http.stream("POST", f"{url}/v1/completions", json=body) as response,
        ):
            assert response.status_code == 200
            lines = response.iter_lines()
            first = next(line for line in lines if line)
            process.send_signal(signal.SIGTERM)
            events = [first, *(line for line in lines if line)]
        assert events[-1] == "data: [DONE]"
        assert process.wait(20) == 0
        assert "without an API key" not in (process.stderr.read() if process.stderr else "")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_mcsd_serve_warns_on_a_public_address_without_a_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("MCSD_API_KEY", raising=False)
    assert cli.main(["serve", "--max-tokens", "0"]) == 2
    assert "--max-tokens must be an integer >= 1, got 0" in capsys.readouterr().err
    assert cli.main(["serve", "--host", "0.0.0.0", "--target", "no-such-model"]) == 2
    assert "0.0.0.0 without an API key" in capsys.readouterr().err
    monkeypatch.setenv("MCSD_API_KEY", "")
    assert cli.main(["serve"]) == 2
    assert "must not be empty" in capsys.readouterr().err
