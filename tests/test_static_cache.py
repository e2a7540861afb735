"""The static-cache adapter (mcsd.models.static) against the DynamicCache adapter (float32, CPU).

- the same forwards (prefill, padded tree forward, commit, chain, dropped block, ragged rows)
  give the same logits to 1e-5, under "sdpa" and "eager", for tiny random Qwen2 and Llama;
- through the engine: greedy output equals ``generate()`` and the DynamicCache adapter's, and a
  seeded sampling run commits the same tokens, across attention-block boundaries and up to the
  very end of the cache (where padding no longer fits);
- a full cache and sliding-window models are refused with clear errors.
Runs under the newest transformers here and, through tests/test_transformers_versions.py, under
the lowest supported one. CUDA graphs are exercised by bench/gpu_step.py on the GPU machine.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHITECTURES, greedy_reference, spec_tokens
from test_hf_adapter import VOCAB, tiny_model, tree_block

from mcsd.config import GREEDY, SamplingConfig, SpecConfig
from mcsd.engine import autoregressive_decode
from mcsd.models.base import chain_mask
from mcsd.models.hf import HFModel
from mcsd.models.static import StaticHFModel, bucket
from mcsd.tree import TokenTree

transformers = pytest.importorskip("transformers")


def static(model, max_length: int = 96) -> StaticHFModel:
    # Small blocks and buckets so short sequences cross several attention lengths and both the
    # padded and the exact (eager, beyond max_graph_tokens) paths run.
    return StaticHFModel(model, max_length=max_length, attention_block=16, max_graph_tokens=8)


def test_bucket() -> None:
    assert [bucket(n, 8) for n in (1, 2, 3, 5, 8, 9, 40)] == [1, 2, 4, 8, 8, 9, 40]


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_same_logits_as_dynamic_cache(arch: str, attn: str) -> None:
    model = tiny_model(arch, 0, attn)
    dynamic, fixed = HFModel(model), static(model)
    seq = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(1))
    tree = TokenTree.from_config((2, 2))
    block = tree_block(tree)

    def both(tokens, positions, mask):
        a = dynamic.forward(tokens, positions, mask)
        b = fixed.forward(tokens, positions, mask)
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
        assert dynamic.pending_length == fixed.pending_length
        return b

    def commit(keep):
        for m in (dynamic, fixed):
            m.commit(keep)
        assert dynamic.cache_lengths() == fixed.cache_lengths()

    both(seq[:, :12], torch.arange(12)[None], chain_mask(12))  # exact path
    commit(None)
    for cache in (12, 15, 18):  # tree forwards padded 7 -> 8, committing 2 accepted nodes
        nodes = torch.tensor([3, seq[0, cache + 1], 7, 11, 5, seq[0, cache + 2]])
        tokens = torch.cat([seq[0, cache : cache + 1], nodes])[None]  # [1, 7]
        positions = (cache + torch.tensor([0, *tree.depth]))[None]
        both(tokens, positions, block)
        commit([[0, 1 + 1, 1 + 5]])  # the root, node 1, then its child 5
    for cache in range(21, 24):  # single tokens (bucket 1), across an attention block
        both(seq[:, cache : cache + 1], torch.tensor([[cache]]), chain_mask(1))
        commit(None)
    both(seq[:, 24:27], torch.arange(24, 27)[None], chain_mask(3))  # bucket 4
    commit([[]])  # dropped
    both(seq[:, 24:26], torch.arange(24, 26)[None], chain_mask(2))
    commit(None)
    for m in (dynamic, fixed):
        m.reset()
    both(seq[:, :5], torch.arange(5)[None], chain_mask(5))


def test_ragged_rows_match_the_dynamic_cache() -> None:
    """Two rows with different committed lengths and accepted paths, both runtimes alike."""
    model = tiny_model("llama", 0)
    dynamic = HFModel(model, batch_size=2)
    fixed = StaticHFModel(
        model, max_length=96, attention_block=16, max_graph_tokens=8, batch_size=2
    )
    seqs = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(3))
    tree = TokenTree.from_config((2, 1))
    for runtime in (dynamic, fixed):
        runtime.forward(seqs[:, :9], torch.arange(9).expand(2, 9), chain_mask(9))
        runtime.commit([list(range(9)), list(range(5))])
    lengths = torch.tensor([[9], [5]])
    tokens = torch.stack([seqs[0, 9:14], seqs[1, 5:10]])
    offsets = torch.tensor([0, *tree.depth])
    a = dynamic.forward(tokens, lengths + offsets, tree_block(tree))
    b = fixed.forward(tokens, lengths + offsets, tree_block(tree))
    torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    for runtime in (dynamic, fixed):
        runtime.commit([[0, 2], [0, 1, 3]])
    assert dynamic.cache_lengths() == fixed.cache_lengths() == (11, 8)
    tokens = torch.stack([seqs[0, 11:13], seqs[1, 8:10]])
    positions = torch.tensor([[11, 12], [8, 9]])
    a = dynamic.forward(tokens, positions, chain_mask(2))
    b = fixed.forward(tokens, positions, chain_mask(2))
    torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


def decode(target, draft, prompt, spec) -> list[int]:
    return spec_tokens(target, draft, prompt, spec, VOCAB)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("tree", [(1, 1, 1, 1), (4, 2, 2), (3, 1)])
def test_greedy_engine_matches_generate(arch: str, tree) -> None:
    target_model, draft_model = tiny_model(arch, 0), tiny_model(arch, 1, layers=1)
    prompt = [3, 14, 15, 92, 65, 35]
    reference = greedy_reference(target_model, prompt, 40)
    spec = SpecConfig(tree=tree, target=GREEDY, max_new_tokens=40)
    out = decode(static(target_model), static(draft_model), prompt, spec)
    assert out == reference
    assert decode(HFModel(target_model), HFModel(draft_model), prompt, spec) == reference
    ar = autoregressive_decode(static(target_model), prompt, GREEDY, 40, vocab_size=VOCAB)
    assert [t for s in ar for t in s.tokens] == reference


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize(("tree", "rule"), [((2, 2, 1), "mcss-wor"), ((1, 1, 1), "sps")])
def test_seeded_sampling_matches_dynamic_cache(arch: str, tree, rule: str) -> None:
    target_model, draft_model = tiny_model(arch, 0), tiny_model(arch, 1, layers=1)
    prompt = [5, 17, 33, 2, 9]
    spec = SpecConfig(
        tree=tree, rule=rule, target=SamplingConfig(temperature=1.0), max_new_tokens=40, seed=3
    )
    fixed = decode(static(target_model), static(draft_model), prompt, spec)
    dynamic = decode(HFModel(target_model), HFModel(draft_model), prompt, spec)
    assert fixed == dynamic and len(fixed) == 40


def test_runs_to_the_end_of_the_cache() -> None:
    """Near the end of a 32-slot cache the padded shape no longer fits: exact shapes then."""
    target_model, draft_model = tiny_model("qwen2", 0), tiny_model("qwen2", 1, layers=1)
    prompt = [3, 14, 15, 92, 65, 35]
    spec = SpecConfig(tree=(2, 2), target=GREEDY, max_new_tokens=100)
    out = decode(static(target_model, 32), static(draft_model, 32), prompt, spec)
    room = 32 - 8 - len(prompt) - 2  # 8 slots kept for a tree, and room for the tree depth
    assert out == greedy_reference(target_model, prompt, room)


def test_last_slots_without_padding() -> None:
    """With fewer free slots than the padded shape needs, the exact shape runs instead."""
    model = tiny_model("llama", 0)
    dynamic, fixed = HFModel(model), static(model, max_length=16)
    seq = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(2))
    for start, end in ((0, 13), (13, 16)):  # 3 new tokens would pad to 4 > 16 - 13 free slots
        args = (seq[:, start:end], torch.arange(start, end)[None])
        mask = chain_mask(end - start)
        torch.testing.assert_close(
            fixed.forward(*args, mask), dynamic.forward(*args, mask), atol=1e-5, rtol=0
        )
        fixed.commit()
        dynamic.commit()


def test_full_cache_and_sliding_window_are_refused() -> None:
    model = static(tiny_model("qwen2", 0), max_length=12)
    with pytest.raises(ValueError, match="static KV cache full"):
        model.forward(
            torch.zeros(1, 13, dtype=torch.long),
            torch.arange(13)[None],
            chain_mask(13),
        )
    config = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=8,
        max_window_layers=0, attn_implementation="sdpa",
    )  # fmt: skip
    with pytest.raises(ValueError, match="full-attention layers only"):
        StaticHFModel(transformers.Qwen2ForCausalLM(config))


def test_failed_capture_falls_back_to_eager(caplog: pytest.LogCaptureFixture) -> None:
    """A capture failure (here: no CUDA on this machine) logs one line and runs eagerly."""
    model = tiny_model("qwen2", 0)
    fixed = static(model)
    fixed._graphs.enabled = True  # pretend to be on a GPU
    args = (torch.tensor([[3, 14, 15]]), torch.arange(3)[None], chain_mask(3))
    with caplog.at_level("WARNING", logger="mcsd.models.graphs"):
        out = fixed.forward(*args)
    assert "running eagerly from now on" in caplog.text and not fixed._graphs.enabled
    torch.testing.assert_close(out, HFModel(model).forward(*args), atol=1e-5, rtol=0)
