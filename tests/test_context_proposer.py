"""The context proposer (mcsd.draft.context): suffix index against a brute-force scan,
incremental updates, tree bounds and content, bad configuration, and greedy identity through
the engine (toy tables, a tiny transformers model) with the context-only and mixed proposers."""

from __future__ import annotations

import random

import pytest
import torch

from mcsd.config import ContextConfig, SamplingConfig, SpecConfig
from mcsd.draft.context import RequestStore, SuffixIndex, build_tree, match
from mcsd.draft.proposer import Drafter
from mcsd.engine import autoregressive_decode, speculative_decode
from mcsd.models.toy import TableLM
from mcsd.plan import resolve
from mcsd.request import one_request
from mcsd.tree import ROOT

GREEDY = SamplingConfig(temperature=0.0)


def brute_occurrences(tokens: list[int], suffix: list[int]) -> list[int]:
    """Positions right after every earlier occurrence of ``suffix`` that has a continuation."""
    n = len(suffix)
    return [i + n for i in range(len(tokens) - n) if tokens[i : i + n] == suffix]


@pytest.mark.parametrize("seed", range(5))
def test_index_matches_brute_force_and_grows_incrementally(seed: int) -> None:
    rng = random.Random(seed)
    tokens = [rng.randrange(3) for _ in range(60)]
    index = SuffixIndex(4)
    at = 0
    while at < len(tokens):  # extended in random chunks, as steps commit tokens
        chunk = rng.randrange(1, 5)
        index.extend(tokens[at : at + chunk])
        at += chunk
        seen = tokens[:at]
        assert index.tokens == seen
        for n in range(1, 5):
            expected = brute_occurrences(seen, seen[-n:]) if n <= len(seen) else []
            found = index.occurrences(seen, n, limit=1000)
            assert [position for _, position in found] == expected
            limited = index.occurrences(seen, n, limit=2)
            assert [position for _, position in limited] == expected[-2:]
    assert SuffixIndex(4, tokens)._after == index._after


def test_match_takes_the_longest_suffix_then_store() -> None:
    config = ContextConfig(max_ngram=3)
    live = SuffixIndex(3, [5, 1, 2, 7, 9, 2, 8, 1, 2])
    # [1, 2] occurred once before (then 7); [9, 1, 2] never; [2] three times.
    assert [p for _, p in match([live], live.tokens, config)] == [3]
    store = RequestStore(capacity=2, max_ngram=3)
    store.add([8, 1, 2, 6])
    store.add([0, 0])
    store.add([3, 8, 1, 2, 4])  # evicts the first
    assert len(store.indexes) == 2
    # The store has the longer match [8, 1, 2]: only its occurrences vote.
    found = match([live, *store.indexes[::-1]], live.tokens, config)
    assert [(tokens[p]) for tokens, p in found] == [4]


def test_tree_is_ranked_by_frequency() -> None:
    config = ContextConfig(max_nodes=8, max_depth=4, max_ngram=4)
    tokens = [1, 2, 3, 4, 1, 2, 3, 5, 1, 2, 3, 4, 6, 1, 2]
    found = build_tree(match([SuffixIndex(4, tokens)], tokens, config), config)
    assert found is not None
    # 1 2 -> 3 (3 times) -> 4 (twice: then 1, 6) or 5 (once: then 1) ...
    assert found.tree.parents == (ROOT, 0, 0, 1, 1, 2, 3, 4)
    assert found.tokens == (3, 4, 5, 1, 6, 1, 2, 1)


@pytest.mark.parametrize("seed", range(6))
def test_tree_bounds_and_paths_occur_in_the_context(seed: int) -> None:
    rng = random.Random(seed)
    config = ContextConfig(
        max_nodes=rng.randrange(1, 12),
        max_depth=rng.randrange(1, 5),
        max_ngram=rng.randrange(1, 4),
        max_children=rng.randrange(1, 4),
    )
    tokens = [rng.randrange(4) for _ in range(80)]
    occurrences = match([SuffixIndex(config.max_ngram, tokens)], tokens, config)
    found = build_tree(occurrences, config)
    assert found is not None
    tree = found.tree
    assert tree.num_nodes <= config.max_nodes
    assert tree.max_depth <= config.max_depth
    assert tree.max_children <= config.max_children
    starts = [position for _, position in occurrences]
    for u in range(tree.num_nodes):
        siblings = [found.tokens[c] for c in tree.children(tree.parents[u])]
        assert len(set(siblings)) == len(siblings)
        path = [found.tokens[a] for a in tree.ancestors(u)]
        assert any(tokens[s : s + len(path)] == path for s in starts), path


def test_no_match_proposes_one_node() -> None:
    proposer = Drafter(None, vocab_size=8, device="cpu")
    request = one_request(SpecConfig(proposer="context"), [1, 2, 3], torch.Generator())
    proposer.start(request)
    (proposal,) = proposer.propose([request], [None])
    assert proposal.tree.num_nodes == 1 and proposal.tokens.tolist() == [3]
    assert proposal.q is None and proposal.deterministic == (True,)


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_nodes", 0), ("max_depth", 0), ("max_ngram", 0), ("max_children", 0), ("max_nodes", "8")],
)
def test_bad_context_config(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"context {field} must be an integer"):
        ContextConfig(**{field: value})


def test_bad_proposer_choices() -> None:
    with pytest.raises(ValueError, match="proposer must be one of model, context, mixed"):
        SpecConfig(proposer="suffix")
    with pytest.raises(ValueError, match="proposer 'context' copies deterministic"):
        SpecConfig(proposer="context", rule="mcss-wor")
    with pytest.raises(ValueError, match="cannot verify trees that mix"):
        SpecConfig(proposer="mixed", rule="traversal")
    with pytest.raises(ValueError, match="context must be a ContextConfig"):
        SpecConfig(context={"max_nodes": 4})
    assert SpecConfig(proposer="context").resolved_rule() == "topk"
    with pytest.raises(ValueError, match="needs a draft model"):
        Drafter(None, vocab_size=8, device="cpu").check(resolve(SpecConfig(proposer="mixed")))


PROMPT = [1, 2, 3, 4, 1, 2, 3, 5, 1, 2, 3, 4, 0, 1, 2]


@pytest.mark.parametrize("proposer", ["context", "mixed"])
@pytest.mark.parametrize("seed", range(4))
def test_greedy_output_is_target_greedy_on_tables(proposer: str, seed: int) -> None:
    vocab = 6
    target = TableLM.random(vocab, seed=seed, order=3)
    draft = TableLM.random(vocab, seed=seed + 50)
    spec = SpecConfig(tree="2,2", target=GREEDY, max_new_tokens=40, proposer=proposer)
    steps = list(
        speculative_decode(
            target, Drafter(draft, vocab_size=vocab, device="cpu"), PROMPT, spec, vocab_size=vocab
        )
    )
    reference = autoregressive_decode(target, PROMPT, GREEDY, 40, vocab_size=vocab)
    assert [t for s in steps for t in s.tokens] == [t for s in reference for t in s.tokens]
    assert sum(s.record.accepted_context for s in steps) > 0
    if proposer == "context":
        assert all(s.record.accepted_context == s.record.accepted for s in steps)


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("proposer", ["context", "mixed"])
def test_greedy_output_is_target_greedy_on_a_tiny_hf_model(proposer: str) -> None:
    from conftest import tiny_causal_lm

    from mcsd.models.hf import HFModel

    target = HFModel(tiny_causal_lm(seed=1))
    draft = HFModel(tiny_causal_lm(seed=2, layers=1))
    vocab = target.vocab_size
    prompt = [5, 9, 14, 3, 5, 9, 14, 7, 5, 9]
    spec = SpecConfig(tree="2,1", target=GREEDY, max_new_tokens=24, proposer=proposer)
    steps = speculative_decode(
        target, Drafter(draft, vocab_size=vocab, device="cpu"), prompt, spec, vocab_size=vocab
    )
    reference = autoregressive_decode(target, prompt, GREEDY, 24, vocab_size=vocab)
    assert [t for s in steps for t in s.tokens] == [t for s in reference for t in s.tokens]


def test_request_store_through_the_api() -> None:
    """A pair without a draft, context drafting from an earlier request (RequestStore): the
    greedy output is still the target's and the copied continuation is accepted."""
    from mcsd.api import ModelPair, generate

    vocab = 6
    target = TableLM.random(vocab, seed=3, order=3)
    pair = ModelPair(target, None, None)
    spec = SpecConfig(target=GREEDY, max_new_tokens=12, proposer="context", stop_token_ids=())
    prompt = [4, 1, 5]
    reference = [
        t
        for s in autoregressive_decode(target, prompt, GREEDY, 12, vocab_size=vocab)
        for t in s.tokens
    ]
    alone = generate(pair, prompt, spec)
    store = RequestStore(capacity=4, max_ngram=spec.context.max_ngram)
    store.add([0, 4, 1, 5, *reference])  # an earlier request that produced the same answer
    copied = generate(pair, prompt, spec, store=store)
    assert alone.token_ids == copied.token_ids == reference
    assert copied.stats.steps < alone.stats.steps
    assert copied.stats.context_share == 1.0
    with pytest.raises(ValueError, match="needs a draft model"):
        generate(pair, prompt, SpecConfig(target=GREEDY, proposer="mixed"))
    with pytest.raises(ValueError, match="capacity must be an integer"):
        RequestStore(capacity=0, max_ngram=4)
