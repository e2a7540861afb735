"""``mcsd serve`` over real HTTP: a live uvicorn server on 127.0.0.1 (random free port) serving a
tiny random Llama pair with SmolLM2's real tokenizer and chat template; the official ``openai``
client and plain httpx talk to it. Nothing of the server is mocked.

The draft has the target's weights, so greedy verification accepts every draft token: the
speculative summary (tree, steps, accepted lengths) is known exactly.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from mcsd.api import ModelPair, generate, load_pair
from mcsd.config import GREEDY, SamplingConfig, SpecConfig
from mcsd.server import create_app

CONTEXT = 1024  # max_position_embeddings of the tiny models
MAX_QUEUE = 2
PROMPT = "def fibonacci(n):"
MESSAGES = [{"role": "user", "content": "Write a haiku about speculative decoding."}]


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama saved with SmolLM2's tokenizer (fetched through mcsd's own sources)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from mcsd.sources import resolve

    tokenizer = AutoTokenizer.from_pretrained(resolve("smollm2-135m-instruct", progress=False))
    assert tokenizer.chat_template, "the test needs a tokenizer with a chat template"
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # sharper logits than the default init: fewer near-ties
        model.model.embed_tokens.weight.normal_(0, 1.0)
    directory = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _load(model_dir: Path) -> ModelPair:
    return load_pair(str(model_dir), str(model_dir), dtype="float32", device="cpu", progress=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny matrices run fastest on one thread, and two spinning threads crawl on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pair(model_dir: Path) -> ModelPair:
    return _load(model_dir)


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> ModelPair:
    """A second copy for ``mcsd.api.generate``: the server's copy belongs to its worker thread."""
    return _load(model_dir)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(pair: ModelPair) -> Iterator[str]:
    defaults = SpecConfig(target=SamplingConfig(temperature=1.0), max_new_tokens=16)
    app = create_app(pair, defaults, model_name="tiny", max_queue=MAX_QUEUE)
    config = uvicorn.Config(app, host="127.0.0.1", port=_free_port(), log_level="warning")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{config.port}"
    uv.should_exit = True
    thread.join(15)


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


# ---------------------------------------------------------------------------- helpers


def _metrics(server: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{server}/metrics").text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(metrics: dict, name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def _delta(before: dict, after: dict, name: str, **labels: str) -> float:
    return _value(after, name, **labels) - _value(before, name, **labels)


def _events(response: httpx.Response) -> Iterator[dict]:
    """Parse server-sent events (``data: {...}``) until ``[DONE]``."""
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        data = line.removeprefix("data: ")
        if data == "[DONE]":
            return
        yield json.loads(data)


def _wait_idle(server: str, timeout: float = 5.0) -> float:
    """Seconds until /health reports no running and no waiting request."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        health = httpx.get(f"{server}/health").json()
        if health["running"] == 0 and health["waiting"] == 0:
            return time.monotonic() - started
        time.sleep(0.02)
    raise AssertionError(f"server still busy after {timeout}s: {health}")


def _speculative(usage: object) -> dict:
    return usage.model_extra["speculative"]  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------- endpoints


def test_models_and_health(server: str, client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    meta = models[0].model_extra["mcsd"]
    assert meta["max_concurrent_generations"] == 1 and meta["batching"] is False
    assert meta["defaults"]["tree"] == "(4,2,2)"
    assert models[0].model_extra["max_model_len"] == CONTEXT
    health = httpx.get(f"{server}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert httpx.get(f"{server}/nope").json()["error"]["type"] == "not_found_error"


def test_completion_greedy_equals_generate(client: openai.OpenAI, reference: ModelPair) -> None:
    expected = generate(reference, PROMPT, SpecConfig(target=GREEDY, max_new_tokens=24))
    response = client.completions.create(
        model="tiny",
        prompt=PROMPT,
        max_tokens=24,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    choice = response.choices[0]
    assert choice.text == expected.text
    assert choice.model_extra["token_ids"] == expected.token_ids
    assert choice.finish_reason == expected.finish_reason
    usage = response.usage
    assert usage.prompt_tokens == len(expected.prompt_ids)
    assert usage.completion_tokens == len(expected.token_ids)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    summary = _speculative(usage)
    assert summary["rule"] == "greedy" and summary["tree"] == "(4,2,2)"
    assert summary["steps"] == expected.stats.steps
    assert summary["accept_lengths"] == expected.stats.accept_lengths


def test_chat_greedy_equals_generate(client: openai.OpenAI, reference: ModelPair) -> None:
    spec = SpecConfig(target=GREEDY, max_new_tokens=20)
    expected = generate(reference, MESSAGES, spec)
    response = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_completion_tokens=20, temperature=0
    )
    assert response.object == "chat.completion"
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == expected.text
    assert response.usage.prompt_tokens == len(expected.prompt_ids)
    assert response.usage.completion_tokens == len(expected.token_ids)


def test_completion_stream_usage_equals_streamed(
    client: openai.OpenAI, reference: ModelPair
) -> None:
    expected = generate(reference, PROMPT, SpecConfig(target=GREEDY, max_new_tokens=30))
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt=PROMPT,
            max_tokens=30,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"return_token_ids": True},
        )
    )
    *steps, last = chunks
    assert last.choices == [] and last.usage is not None
    text = "".join(c.choices[0].text for c in steps)
    ids = [t for c in steps for t in c.choices[0].model_extra["token_ids"]]
    summary = _speculative(last.usage)
    assert text == expected.text and ids == expected.token_ids
    # One chunk per speculative step, carrying all the tokens that step committed.
    assert [len(c.choices[0].model_extra["token_ids"]) for c in steps] == summary["accept_lengths"]
    assert last.usage.completion_tokens == len(ids) == sum(summary["accept_lengths"])
    assert last.usage.prompt_tokens == len(expected.prompt_ids)
    assert max(summary["accept_lengths"]) == 4  # draft == target: the whole depth-3 path + bonus
    assert [c.choices[0].finish_reason for c in steps][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in steps[:-1])


def test_chat_stream(client: openai.OpenAI, reference: ModelPair) -> None:
    expected = generate(reference, MESSAGES, SpecConfig(target=GREEDY, max_new_tokens=20))
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=20, temperature=0, stream=True
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert all(c.usage is None for c in chunks)  # no include_usage: no usage chunk


def test_stop_string(client: openai.OpenAI, reference: ModelPair) -> None:
    full = generate(reference, PROMPT, SpecConfig(target=GREEDY, max_new_tokens=24)).text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    expected = full[: full.index(stop)]
    for stream in (False, True):
        response = client.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop], stream=stream
        )
        chunks = list(response) if stream else [response]
        assert "".join(c.choices[0].text for c in chunks) == expected
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_sampling_with_seed_is_reproducible(client: openai.OpenAI) -> None:
    def once() -> str:
        response = client.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=12, temperature=1.0, top_p=0.9, seed=7
        )
        assert _speculative(response.usage)["rule"] == "mcss-wor"
        return response.choices[0].text

    assert once() == once()


# ---------------------------------------------------------------------------- per-request trees


@pytest.mark.parametrize(
    ("tree", "described", "size", "rule"),
    [
        ("2,1", "(2,1)", 4, None),
        ([1, 1, 1, 1, 1], "(1,1,1,1,1)", 5, None),
        ([[0], [1], [0, 0]], "(2,1)", 3, None),  # paths: not a full k-ary tree
        ("3,2", "(3,2)", 9, "mcns"),
    ],
)
def test_tree_override(
    client: openai.OpenAI, tree: object, described: str, size: int, rule: str | None
) -> None:
    options: dict = {"tree": tree}
    if rule is not None:
        options["rule"] = rule
    response = client.completions.create(
        model="tiny",
        prompt=PROMPT,
        max_tokens=24,
        temperature=0 if rule is None else 1.0,
        extra_body={"mcsd": options},
    )
    summary = _speculative(response.usage)
    assert summary["tree_size"] == size
    if isinstance(tree, str | list) and not isinstance(tree[0], list):
        assert summary["tree"] == described
    assert summary["rule"] == (rule or "greedy")
    depth = len(summary["acceptance_per_depth"])
    if rule is None:  # greedy, draft == target: every step accepts a full path, plus the bonus
        depth_of = {"(2,1)": 2, "(1,1,1,1,1)": 5}
        assert depth == depth_of[described]
        assert summary["accept_lengths"][:-1] == [depth + 1] * (summary["steps"] - 1)
    assert summary["draft_tokens"] == size * summary["steps"]


@pytest.mark.parametrize(("tree", "size"), [("dynamic:6:2:3", 6), ("none", 0)])
def test_dynamic_and_no_speculation_override(client: openai.OpenAI, tree: str, size: int) -> None:
    response = client.completions.create(
        model="tiny",
        prompt=PROMPT,
        max_tokens=16,
        temperature=0,
        extra_body={"mcsd": {"tree": tree}},
    )
    summary = _speculative(response.usage)
    assert summary["tree"] == tree
    assert summary["tree_size"] == size and summary["draft_tokens"] == size * summary["steps"]


def test_draft_temperature_override(client: openai.OpenAI) -> None:
    response = client.completions.create(
        model="tiny",
        prompt=PROMPT,
        max_tokens=8,
        temperature=1.0,
        extra_body={"mcsd": {"draft_temperature": 0}},
    )
    assert _speculative(response.usage)["rule"] == "topk"  # greedy draft, sampling target


# ---------------------------------------------------------------------------- metrics


def test_metrics_count_a_request(server: str, client: openai.OpenAI) -> None:
    before = _metrics(server)
    response = client.completions.create(
        model="tiny",
        prompt=PROMPT,
        max_tokens=21,
        temperature=0,
        extra_body={"mcsd": {"tree": "2,2"}},
    )
    after = _metrics(server)
    summary, usage = _speculative(response.usage), response.usage
    steps = summary["steps"]

    def moved(name: str, **labels: str) -> float:
        return _delta(before, after, name, **labels)

    assert moved("mcsd:spec_decode_num_drafts_total") == steps
    assert moved("mcsd:spec_decode_num_draft_tokens_total") == 6 * steps
    assert moved("mcsd:spec_decode_num_accepted_tokens_total") == summary["accepted_tokens"]
    per_pos = "mcsd:spec_decode_num_accepted_tokens_per_pos_total"
    accepted = [moved(per_pos, position=str(d)) for d in range(3)]
    assert sum(accepted) == summary["accepted_tokens"] and accepted[2] == 0  # depth 2 tree
    verified = "mcsd:spec_decode_num_verified_per_pos_total"
    assert moved(verified, position="0") == steps
    assert moved("mcsd:generation_tokens_total") == usage.completion_tokens == 21
    assert moved("mcsd:prompt_tokens_total") == usage.prompt_tokens
    assert moved("mcsd:requests_total", outcome="length") == 1
    assert moved("mcsd:requests_total", outcome="stop") == 0
    assert moved("mcsd:time_to_first_token_seconds_count") == 1
    assert moved("mcsd:inter_token_latency_seconds_count") == steps - 1
    assert moved("mcsd:time_per_output_token_seconds_count") == 1
    assert moved("mcsd:e2e_request_latency_seconds_count") == 1
    assert _value(after, "mcsd:spec_decode_mean_accepted_length") > 1.0
    assert _value(after, "mcsd:num_requests_running") == 0

    bad = httpx.post(f"{server}/v1/completions", json={"prompt": PROMPT, "n": 3})
    assert bad.status_code == 400
    assert _delta(after, _metrics(server), "mcsd:requests_total", outcome="invalid") == 1


# ---------------------------------------------------------------------------- bad input

LONG = "hello " * (CONTEXT + 50)

BAD = [
    # (endpoint, body: dict or raw text, param named by the error)
    ("completions", "{", None),
    ("completions", '{"prompt": "x", "temperature": NaN}', None),
    ("completions", "[1, 2]", None),
    ("completions", "", None),
    ("completions", {"prompt": PROMPT, "frobnicate": 1}, "frobnicate"),
    ("completions", {}, "prompt"),
    ("completions", {"prompt": PROMPT, "max_tokens": "5"}, "max_tokens"),
    ("completions", {"prompt": PROMPT, "max_tokens": 2.5}, "max_tokens"),
    ("completions", {"prompt": PROMPT, "max_tokens": -1}, "max_tokens"),
    ("completions", {"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
    ("completions", {"prompt": PROMPT, "max_tokens": 10**12}, "max_tokens"),
    ("completions", {"prompt": PROMPT, "temperature": "hot"}, "temperature"),
    ("completions", {"prompt": PROMPT, "temperature": -1}, "temperature"),
    ("completions", {"prompt": PROMPT, "top_p": 0}, "top_p"),
    ("completions", {"prompt": PROMPT, "top_k": -3}, "top_k"),
    ("completions", {"prompt": PROMPT, "stream": "yes"}, "stream"),
    (
        "completions",
        {"prompt": PROMPT, "stream_options": {"include_usage": True}},
        "stream_options",
    ),
    ("completions", {"prompt": PROMPT, "seed": "1"}, "seed"),
    ("completions", {"prompt": PROMPT, "seed": 2**80}, "seed"),  # beyond torch's 64 bits
    ("completions", {"prompt": PROMPT, "seed": -(2**63) - 1}, "seed"),
    ("completions", {"prompt": PROMPT, "stop": [""]}, "stop"),
    ("completions", {"prompt": PROMPT, "stop": 3}, "stop"),
    ("completions", {"prompt": PROMPT, "n": 2}, "n"),
    ("completions", {"prompt": PROMPT, "logprobs": 5}, "logprobs"),
    ("completions", {"prompt": PROMPT, "presence_penalty": 0.5}, "presence_penalty"),
    ("completions", {"prompt": ""}, "prompt"),
    ("completions", {"prompt": 42}, "prompt"),
    ("completions", {"prompt": ["a", "b"]}, "prompt"),
    ("completions", {"prompt": [1, 2, 10**7]}, "prompt"),
    ("completions", {"prompt": LONG}, "prompt"),
    ("completions", {"prompt": LONG, "stream": True}, "prompt"),
    ("completions", {"prompt": PROMPT, "mcsd": {"tree": "4,x"}}, "mcsd.tree"),
    ("completions", {"prompt": PROMPT, "mcsd": {"tree": "0"}}, "mcsd.tree"),
    ("completions", {"prompt": PROMPT, "mcsd": {"tree": 5}}, "mcsd.tree"),
    ("completions", {"prompt": PROMPT, "mcsd": {"tree": "1024,1024"}}, "mcsd.tree"),
    ("completions", {"prompt": PROMPT, "mcsd": {"tree": "dynamic:0"}}, "mcsd.tree"),
    ("completions", {"prompt": PROMPT, "mcsd": {"rule": "bogus"}}, "mcsd.rule"),
    ("completions", {"prompt": PROMPT, "mcsd": {"rule": "sps"}}, "mcsd.rule"),  # 4,2,2 not a chain
    ("completions", {"prompt": PROMPT, "temperature": 0, "mcsd": {"rule": "mcss"}}, "mcsd.rule"),
    (
        "completions",
        {"prompt": PROMPT, "mcsd": {"draft_temperature": -2}},
        "mcsd.draft_temperature",
    ),
    ("completions", {"prompt": PROMPT, "mcsd": {"depth": 3}}, "mcsd.depth"),
    ("chat/completions", {"messages": "hi"}, "messages"),
    ("chat/completions", {"messages": []}, "messages"),
    ("chat/completions", {"prompt": PROMPT}, "messages"),  # missing messages comes first
    ("chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ("chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("chat/completions", {"messages": [{"role": "user"}]}, "messages[0].content"),
    (
        "chat/completions",
        {"messages": MESSAGES, "max_completion_tokens": 10**9},
        "max_completion_tokens",
    ),
    ("chat/completions", {"messages": [{"role": "user", "content": LONG}]}, "messages"),
    ("chat/completions", {"messages": MESSAGES, "n": 4, "stream": True}, "n"),
]


@pytest.mark.parametrize(("endpoint", "body", "param"), BAD, ids=range(len(BAD)))
def test_bad_input_is_400_naming_the_field(
    server: str, endpoint: str, body: object, param: str | None
) -> None:
    url = f"{server}/v1/{endpoint}"
    if isinstance(body, str):
        response = httpx.post(url, content=body, headers={"content-type": "application/json"})
    else:
        response = httpx.post(url, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"] and "Traceback" not in error["message"]
    if param is not None:
        assert param.split("[")[0].split(".")[-1] in error["message"] or param in error["message"]


def test_a_seed_beyond_64_bits_is_400_naming_seed_and_its_range(server: str) -> None:
    response = httpx.post(f"{server}/v1/completions", json={"prompt": PROMPT, "seed": 2**80})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "seed"
    assert error["message"].startswith("seed must be an integer")
    assert "[-2**63, 2**64 - 1]" in error["message"]
    largest = httpx.post(
        f"{server}/v1/completions", json={"prompt": PROMPT, "seed": 2**64 - 1, "max_tokens": 2}
    )
    assert largest.status_code == 200, largest.text


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=2)
    assert caught.value.body["param"] == "model"


def test_bad_input_through_openai_client(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=MESSAGES, n=2)
    assert caught.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny", prompt=LONG, max_tokens=4, stream=True)
    assert "context" in caught.value.body["message"]


# ---------------------------------------------------------------------------- failures and queue


def test_generation_failure_is_500_and_server_keeps_serving(
    server: str, client: openai.OpenAI, pair: ModelPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model that breaks mid-generation (the model, not the server, is patched)."""
    forward = pair.target.forward
    calls = {"n": 0}

    def flaky(*args: object, **kwargs: object) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 3:  # prefill, step 1, then step 2 breaks
            raise RuntimeError("simulated device failure")
        return forward(*args, **kwargs)

    before = _metrics(server)
    monkeypatch.setattr(pair.target, "forward", flaky)
    with pytest.raises(openai.InternalServerError) as caught:
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=40, temperature=0)
    body = caught.value.body
    assert body["type"] == "server_error" and "simulated device failure" in body["message"]
    calls["n"] = 0
    with pytest.raises(openai.APIError, match="simulated device failure"):
        for _ in client.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=40, temperature=0, stream=True
        ):
            pass
    monkeypatch.undo()
    assert _delta(before, _metrics(server), "mcsd:requests_total", outcome="error") == 2
    ok = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0)
    assert ok.usage.completion_tokens == 4


def _long_request(chat: bool = False) -> dict:
    body: dict = {"max_tokens": CONTEXT - 64, "temperature": 0, "stream": True}
    body["mcsd"] = {"tree": "1"}  # one token per step: the longest possible generation
    if chat:
        return body | {"messages": MESSAGES}
    return body | {"prompt": PROMPT}


def test_stream_disconnect_cancels_promptly(server: str) -> None:
    before = _metrics(server)
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", f"{server}/v1/completions", json=_long_request()) as response,
    ):
        assert response.status_code == 200
        events = _events(response)
        for _ in range(3):
            next(events)
        assert httpx.get(f"{server}/health").json()["running"] == 1
    # Leaving the blocks closed the connection mid-stream.
    assert _wait_idle(server) < 2.0
    after = _metrics(server)
    assert _delta(before, after, "mcsd:requests_total", outcome="cancelled") == 1
    assert _delta(before, after, "mcsd:generation_tokens_total") < CONTEXT // 4


def test_non_stream_disconnect_cancels(server: str) -> None:
    before = _metrics(server)
    body = _long_request(chat=True) | {"stream": False}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/v1/chat/completions", json=body, timeout=0.3)
    assert _wait_idle(server) < 2.0
    after = _metrics(server)
    assert _delta(before, after, "mcsd:requests_total", outcome="cancelled") == 1
    assert _delta(before, after, "mcsd:generation_tokens_total") < CONTEXT // 4


def test_queue_is_fifo_and_bounded(server: str) -> None:
    """One generation runs, MAX_QUEUE wait, the next gets 429; waiting clients that leave are
    dropped from the queue; the survivors run in arrival order."""

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=server, timeout=30) as http:
            running = await http.send(
                http.build_request("POST", "/v1/completions", json=_long_request()), stream=True
            )
            assert running.status_code == 200
            finished: list[str] = []

            async def short(name: str) -> httpx.Response:
                body = {"prompt": f"{name}:", "max_tokens": 3, "temperature": 0}
                response = await http.post("/v1/completions", json=body)
                finished.append(name)
                return response

            first = asyncio.create_task(short("first"))
            await _until(http, waiting=1)
            second = asyncio.create_task(short("second"))
            await _until(http, waiting=2)
            refused = await http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "queue_full"
            assert refused.headers["retry-after"]
            await running.aclose()  # the long generation is cancelled; the queue moves on
            responses = await asyncio.gather(first, second)
            assert [r.status_code for r in responses] == [200, 200]
            assert finished == ["first", "second"]

    before = _metrics(server)
    asyncio.run(scenario())
    _wait_idle(server)
    after = _metrics(server)
    assert _delta(before, after, "mcsd:requests_total", outcome="rejected") == 1
    assert _delta(before, after, "mcsd:requests_total", outcome="cancelled") == 1
    assert _delta(before, after, "mcsd:requests_total", outcome="length") == 2


def test_waiting_client_that_leaves_is_dropped(server: str) -> None:
    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=server, timeout=30) as http:
            running = await http.send(
                http.build_request("POST", "/v1/completions", json=_long_request()), stream=True
            )
            waiter = asyncio.create_task(http.post("/v1/completions", json=_long_request()))
            await _until(http, waiting=1)
            waiter.cancel()  # closes its connection while it waits for its turn
            await _until(http, waiting=0)
            assert (await http.get("/health")).json()["running"] == 1  # the first still runs
            await running.aclose()

    before = _metrics(server)
    asyncio.run(scenario())
    _wait_idle(server)
    assert _delta(before, _metrics(server), "mcsd:requests_total", outcome="cancelled") == 2


async def _until(http: httpx.AsyncClient, *, waiting: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (await http.get("/health")).json()["waiting"] != waiting:
        assert time.monotonic() < deadline, f"queue never reached {waiting} waiting"
        await asyncio.sleep(0.02)


# ---------------------------------------------------------------------------- the command


def test_mcsd_serve_command(model_dir: Path) -> None:
    """``mcsd serve`` as users start it: a subprocess on a free port."""
    port = _free_port()
    command = [sys.executable, "-m", "mcsd.cli", "serve", "--target", str(model_dir)]
    command += ["--draft", str(model_dir), "--dtype", "float32", "--device", "cpu"]
    command += ["--port", str(port), "--tree", "2,1", "--log-level", "warning"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            assert time.monotonic() < deadline, "mcsd serve did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        response = client.completions.create(
            model=str(model_dir), prompt=PROMPT, max_tokens=5, temperature=0
        )
        assert _speculative(response.usage)["tree"] == "(2,1)"  # --tree became the default
        assert response.usage.completion_tokens == 5
    finally:
        process.terminate()
        process.wait(20)


def test_mcsd_serve_refuses_bad_options_before_loading() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mcsd.cli", "serve", "--tree", "4,-1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "tree" in result.stderr


def test_no_nan_in_mean_accepted_length_before_any_request() -> None:
    from mcsd.server.metrics import Metrics

    metrics = Metrics(lambda: 0, lambda: 0)
    families = text_string_to_metric_families(metrics.render().decode())
    values = {s.name: s.value for family in families for s in family.samples}
    assert values["mcsd:spec_decode_mean_accepted_length"] == 0.0


# ---------------------------------------------------------------------------- continuous batching


@contextmanager
def _serving(app) -> Iterator[str]:
    """``app`` served by uvicorn in a thread on a free port; its base address."""
    config = uvicorn.Config(app, host="127.0.0.1", port=_free_port(), log_level="warning")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        uv.should_exit = True
        thread.join(15)


@pytest.fixture(scope="module")
def batched_server(model_dir: Path) -> Iterator[str]:
    """A second server on its own copy of the pair, decoding up to 4 requests side by side."""
    defaults = SpecConfig(target=SamplingConfig(temperature=1.0), max_new_tokens=16)
    app = create_app(_load(model_dir), defaults, model_name="tiny", max_queue=8, max_batch=4)
    with _serving(app) as server:
        yield server


def test_concurrent_requests_equal_single_answers(
    batched_server: str, reference: ModelPair
) -> None:
    """9 concurrent clients (4 rows, the others waiting, joining as rows free) with prompts of
    different lengths and lengths of answer, chat and completion, one with its own tree, one
    without speculation, one with a dynamic tree (a row beside the others): every
    answer at temperature 0 equals the single-request one."""
    prompts = [PROMPT, "Once upon a time", "x", "def add(a, b):\n    return"] * 2
    lengths = [24, 9, 17, 5, 12, 30, 3, 20]
    trees = [None, None, "2,1", None, "none", None, "dynamic:8:4:2", None]
    expected = [
        generate(
            reference,
            p,
            SpecConfig(tree=t or "4,2,2", target=GREEDY, max_new_tokens=n),
        )
        for p, n, t in zip(prompts, lengths, trees, strict=True)
    ]
    chat_expected = generate(
        reference, MESSAGES, SpecConfig(target=GREEDY, max_new_tokens=10), chat=True
    )
    client = openai.AsyncOpenAI(
        base_url=f"{batched_server}/v1", api_key="unused", max_retries=0, timeout=120
    )

    async def completion(prompt: str, n: int, tree: str | None) -> str:
        extra = {"mcsd": {"tree": tree}} if tree else {}
        response = await client.completions.create(
            model="tiny", prompt=prompt, max_tokens=n, temperature=0, extra_body=extra
        )
        return response.choices[0].text

    async def streamed_chat() -> str:
        parts = []
        async for chunk in await client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=10, temperature=0, stream=True
        ):
            parts.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
        return "".join(parts)

    async def everyone() -> list[str]:
        calls = [completion(*args) for args in zip(prompts, lengths, trees, strict=True)]
        return await asyncio.gather(*calls, streamed_chat())

    answers = asyncio.run(everyone())
    assert answers[:-1] == [e.text for e in expected]
    assert answers[-1] == chat_expected.text
    _wait_idle(batched_server)
    meta = httpx.get(f"{batched_server}/v1/models").json()["data"][0]["mcsd"]
    assert meta["max_concurrent_generations"] == 4 and meta["batching"] is True


def test_dynamic_and_fixed_trees_share_one_forward(model_dir: Path, reference: ModelPair) -> None:
    """A dynamic-tree request and a fixed-tree request served at once are rows of one engine:
    some step verifies both trees in one target forward, and each answer equals its single
    greedy generation."""
    defaults = SpecConfig(target=GREEDY, max_new_tokens=24)
    app = create_app(_load(model_dir), defaults, model_name="tiny", max_queue=8, max_batch=4)
    engine = app.state.scheduler.engine
    forwards: list[set[str]] = []  # per target tree forward: the kinds of tree it held
    original = engine._target_logits

    def recording(requests, proposals, verifiers):
        forwards.append({"dynamic" if r.plan.dynamic else "fixed" for r in requests})
        return original(requests, proposals, verifiers)

    engine._target_logits = recording
    trees = ["dynamic:8:4:2", "4,2,2"]
    expected = [
        generate(reference, PROMPT, SpecConfig(tree=t, target=GREEDY, max_new_tokens=24)).text
        for t in trees
    ]
    with _serving(app) as server:
        client = openai.AsyncOpenAI(
            base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120
        )

        async def completion(tree: str) -> str:
            response = await client.completions.create(
                model="tiny",
                prompt=PROMPT,
                max_tokens=24,
                temperature=0,
                extra_body={"mcsd": {"tree": tree}},
            )
            return response.choices[0].text

        async def both() -> list[str]:
            return await asyncio.gather(*(completion(t) for t in trees))

        answers = asyncio.run(both())
    assert answers == expected
    assert {"dynamic", "fixed"} in forwards, forwards


def test_batched_disconnect_frees_its_row(batched_server: str) -> None:
    """A streaming client that leaves mid-generation frees its row while another row runs on."""
    body = _long_request()
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{batched_server}/v1/completions", json=body) as response:
            next(_events(response))
        other = http.post(
            f"{batched_server}/v1/completions",
            json={"prompt": PROMPT, "max_tokens": 6, "temperature": 0},
        )
    assert other.status_code == 200
    assert _wait_idle(batched_server) < 5.0


def test_mcsd_serve_refuses_a_bad_max_batch(capsys: pytest.CaptureFixture[str]) -> None:
    from mcsd.cli import main

    assert main(["serve", "--max-batch", "0", "--target", "no-such-model"]) != 0
    assert "--max-batch must be an integer >= 1" in capsys.readouterr().err
