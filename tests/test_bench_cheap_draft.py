"""Cheaper drafts: the restricted-vocabulary draft scores only the kept tokens, int8 drafts run,
neither modifies the original model, and both stay lossless."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch

from mcsd.api import ModelPair
from mcsd.bench.cheap_draft import cheap_draft, frequent_tokens, token_counts
from mcsd.config import GREEDY, SamplingConfig, SpecConfig
from mcsd.engine import autoregressive_decode, speculative_decode
from mcsd.models.base import causal_mask
from mcsd.models.hf import HFModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Tokenizer:
    """Character-level: ids are ord(c) - 97, special token 0."""

    all_special_ids = (0,)
    added_tokens_decoder: ClassVar[dict] = {}

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[ord(c) - 97 for c in text] for text in texts]}


def tiny(seed: int, layers: int, vocab: int = 26) -> HFModel:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    return HFModel(Qwen2ForCausalLM(config).float())


def test_frequent_tokens_keeps_specials_and_the_most_frequent() -> None:
    tokenizer = _Tokenizer()
    counts = token_counts(tokenizer, ["abcabcab", "zzzz"], 26)
    assert counts[:3].tolist() == [3, 3, 2] and counts[25] == 4
    keep = frequent_tokens(tokenizer, 3, 26, texts=["bbbcczzzzz"])
    assert keep.tolist() == [0, 1, 25]  # the special token 0 first, then z (5), b (3)


def test_restricted_model_scores_only_kept_tokens() -> None:
    inner = tiny(0, 1)
    pair = ModelPair(tiny(0, 2), inner, _Tokenizer())
    cheap = cheap_draft(pair, vocab=5, texts=["ddfffhhhllll"])  # 0 (special), l, h, f, d
    draft = cheap.draft
    assert draft.vocab_size == 26 and "top 5 tokens" in cheap.draft_name
    assert draft.keep.tolist() == [0, 3, 5, 7, 11]
    assert inner.model.get_output_embeddings().weight.shape[0] == 26  # original untouched
    tokens = torch.tensor([[1, 2, 3, 4]])
    positions = torch.arange(4)[None]
    mask = causal_mask(1, 0, 4, "cpu")
    restricted = draft.forward(tokens, positions, mask)
    full = inner.forward(tokens, positions, mask)
    keep = draft.keep
    assert torch.allclose(restricted[..., keep], full[..., keep], atol=1e-6)
    outside = torch.ones(26, dtype=torch.bool)
    outside[keep] = False
    assert torch.isinf(restricted[..., outside]).all()
    assert draft.cache_length == 4
    draft.trim(2)
    assert draft.cache_length == 2
    assert cheap_draft(pair) is pair


@pytest.mark.parametrize("vocab", [None, 13])
def test_cheap_drafts_are_lossless_in_greedy_and_run_sampling(vocab) -> None:
    target, inner = tiny(0, 2), tiny(0, 1)
    pair = ModelPair(target, inner, _Tokenizer())
    texts = ["acegikmoqsuwy" * 3]  # even tokens are the frequent ones
    draft = cheap_draft(pair, vocab=vocab, int8=True, texts=texts).draft
    assert next(inner.model.parameters()).dtype == torch.float32  # original still float
    prompt = [3, 1, 4, 1, 5]
    expected = [
        s.tokens[0] for s in autoregressive_decode(target, prompt, GREEDY, 24, vocab_size=26)
    ]
    spec = SpecConfig(tree="2,1,1", target=GREEDY, max_new_tokens=24)
    steps = list(speculative_decode(target, draft, prompt, spec, vocab_size=26))
    assert [t for s in steps for t in s.tokens] == expected
    sampled = SpecConfig(tree="2,2", target=SamplingConfig(1.0), max_new_tokens=12, seed=0)
    steps = list(speculative_decode(target, draft, prompt, sampled, vocab_size=26))
    assert sum(len(s.tokens) for s in steps) == 12
