"""Cheaper drafts: the restricted-vocabulary draft scores only the kept tokens, int8 drafts run,
neither modifies the original model, and both stay lossless."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from conftest import spec_decode, tiny_causal_lm

from mcsd.api import ModelPair
from mcsd.config import GREEDY, SamplingConfig, SpecConfig
from mcsd.engine import autoregressive_decode
from mcsd.models.base import chain_mask
from mcsd.models.frequent import frequent_tokens, token_counts
from mcsd.models.hf import HFModel
from mcsd.models.static import StaticHFModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Tokenizer:
    """Character-level: ids are ord(c) - 97, special token 0."""

    all_special_ids = (0,)
    added_tokens_decoder: ClassVar[dict] = {}

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[ord(c) - 97 for c in text] for text in texts]}

    def __len__(self) -> int:
        return 26


def tiny(seed: int, layers: int, vocab: int = 26) -> HFModel:
    model = tiny_causal_lm(
        seed=seed, layers=layers, vocab=vocab, hidden=32, sharpen=None, tie_word_embeddings=False
    )
    return HFModel(model)


def test_frequent_tokens_keeps_specials_and_the_most_frequent() -> None:
    tokenizer = _Tokenizer()
    counts = token_counts(tokenizer, ["abcabcab", "zzzz"], 26)
    assert counts[:3].tolist() == [3, 3, 2] and counts[25] == 4
    keep = frequent_tokens(tokenizer, 3, 26, texts=["bbbcczzzzz"])
    assert keep.tolist() == [0, 1, 25]  # the special token 0 first, then z (5), b (3)


def test_restricted_model_scores_only_kept_tokens() -> None:
    inner = tiny(0, 1)
    pair = ModelPair(tiny(0, 2), inner, _Tokenizer())
    cheap = pair.with_cheap_draft(vocab=5, texts=["ddfffhhhllll"])  # 0 (special), l, h, f, d
    draft = cheap.draft
    assert draft.vocab_size == 26 and "top 5 tokens" in cheap.draft_name
    assert draft.keep.tolist() == [0, 3, 5, 7, 11]
    assert inner.hf_model.get_output_embeddings().weight.shape[0] == 26  # original untouched
    tokens = torch.tensor([[1, 2, 3, 4]])
    positions = torch.arange(4)[None]
    mask = chain_mask(4)
    restricted = draft.forward(tokens, positions, mask)
    full = inner.forward(tokens, positions, mask)
    keep = draft.keep
    assert torch.allclose(restricted[..., keep], full[..., keep], atol=1e-6)
    outside = torch.ones(26, dtype=torch.bool)
    outside[keep] = False
    assert torch.isinf(restricted[..., outside]).all()
    assert draft.pending_length == 4
    draft.commit([[0, 1]])
    assert draft.cache_lengths() == (2,)
    assert pair.with_cheap_draft() is pair


@pytest.mark.parametrize("vocab", [None, 13])
def test_cheap_drafts_are_lossless_in_greedy_and_run_sampling(vocab) -> None:
    target, inner = tiny(0, 2), tiny(0, 1)
    pair = ModelPair(target, inner, _Tokenizer())
    texts = ["acegikmoqsuwy" * 3]  # even tokens are the frequent ones
    draft = pair.with_cheap_draft(vocab=vocab, int8=True, texts=texts).draft
    assert next(inner.hf_model.parameters()).dtype == torch.float32  # original still float
    prompt = [3, 1, 4, 1, 5]
    expected = [
        s.tokens[0] for s in autoregressive_decode(target, prompt, GREEDY, 24, vocab_size=26)
    ]
    spec = SpecConfig(tree="2,1,1", target=GREEDY, max_new_tokens=24)
    steps = list(spec_decode(target, draft, prompt, spec, 26))
    assert [t for s in steps for t in s.tokens] == expected
    sampled = SpecConfig(
        tree="2,2", target=SamplingConfig(temperature=1.0), max_new_tokens=12, seed=0
    )
    steps = list(spec_decode(target, draft, prompt, sampled, 26))
    assert sum(len(s.tokens) for s in steps) == 12


@pytest.mark.parametrize("int8", [False, True])
def test_cheap_drafts_run_on_the_static_cache(int8: bool) -> None:
    """+fr and +int8 keep the draft's runtime: a static-cache draft stays a static-cache draft,
    and greedy output is still the target's."""
    target = tiny(0, 2)
    static = StaticHFModel(tiny(0, 1).hf_model, max_length=64, max_graph_tokens=8)
    pair = ModelPair(target, static, _Tokenizer())
    cheap = pair.with_cheap_draft(vocab=13, int8=int8, texts=["acegikmoqsuwy" * 3])
    assert isinstance(cheap.draft.inner, StaticHFModel)
    prompt = [3, 1, 4, 1, 5]
    expected = [
        s.tokens[0] for s in autoregressive_decode(target, prompt, GREEDY, 16, vocab_size=26)
    ]
    spec = SpecConfig(tree="2,1,1", target=GREEDY, max_new_tokens=16)
    assert [t for s in spec_decode(target, cheap.draft, prompt, spec, 26) for t in s.tokens] == (
        expected
    )
