"""The transformers adapter and the engine on tiny random Qwen2 / Llama models (float32, CPU).

- tree forward + compaction reproduce a plain chain forward, under "sdpa" and "eager";
- after every speculative step the target's next-token distribution equals a fresh forward over
  the committed sequence (the caches hold exactly the committed tokens);
- speculative greedy output equals the model's own greedy ``generate()`` token for token.
This module runs under the newest transformers here and, through
tests/test_transformers_versions.py, under the lowest supported one (5.17).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from mcsd.config import GREEDY, SamplingConfig, SpecConfig
from mcsd.engine import autoregressive_decode, speculative_decode
from mcsd.models.base import causal_mask
from mcsd.models.hf import HFModel
from mcsd.tree import TokenTree

transformers = pytest.importorskip("transformers")
VOCAB = 96
ARCHITECTURES = ("qwen2", "llama")


def tiny_model(arch: str, seed: int, attn: str = "sdpa", layers: int = 2):
    config_class = {
        "qwen2": transformers.Qwen2Config,
        "llama": transformers.LlamaConfig,
    }[arch]
    model_class = {
        "qwen2": transformers.Qwen2ForCausalLM,
        "llama": transformers.LlamaForCausalLM,
    }[arch]
    config = config_class(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attn_implementation=attn,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    model = model_class(config).eval()
    # Random init is nearly uniform; sharpen the head so greedy argmaxes are far from ties.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_tree_forward_and_compaction_match_chain(arch: str, attn: str) -> None:
    model = tiny_model(arch, 0, attn)
    adapter = HFModel(model)
    seq = torch.randint(0, VOCAB, (1, 14), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        chain = model(seq).logits  # [1, 14, V]
    adapter.forward(seq[:, :8], torch.arange(8)[None], causal_mask(1, 0, 8, "cpu"))
    tree = TokenTree.from_config((2, 2))  # nodes 0,1 at depth 1; 2,3 under 0; 4,5 under 1
    # Node 1 and then its child 5 carry the true continuation; every other node is a decoy.
    nodes = torch.tensor([3, seq[0, 9], 7, 11, 5, seq[0, 10]])
    tokens = torch.cat([seq[0, 8:9], nodes])[None]  # [1, 7]: pending root + nodes
    mask = torch.zeros(7, 7, dtype=torch.bool)
    mask[:, 0] = True
    mask[1:, 1:] = tree.ancestor_mask()
    mask = torch.cat([torch.ones(7, 8, dtype=torch.bool), mask], 1)[None]  # [1, 7, 15]
    positions = (8 + torch.tensor([0, *tree.depth]))[None]
    out = adapter.forward(tokens, positions, mask)  # [1, 7, V]
    torch.testing.assert_close(out[0, 0], chain[0, 8], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[0, 2], chain[0, 9], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[0, 6], chain[0, 10], atol=1e-5, rtol=0)
    adapter.compact(9, torch.tensor([[9 + 1, 9 + 5]]))  # keep root, node 1, node 5
    assert adapter.cache_length == 11
    out = adapter.forward(seq[:, 11:14], torch.arange(11, 14)[None], causal_mask(1, 11, 3, "cpu"))
    torch.testing.assert_close(out[0], chain[0, 11:14], atol=1e-5, rtol=0)
    adapter.trim(6)
    out = adapter.forward(seq[:, 6:8], torch.arange(6, 8)[None], causal_mask(1, 6, 2, "cpu"))
    torch.testing.assert_close(out[0], chain[0, 6:8], atol=1e-5, rtol=0)


class RecordingModel(HFModel):
    """Records the logits of the first new token of every forward (the root when verifying)."""

    def __init__(self, model) -> None:
        super().__init__(model)
        self.roots: list[torch.Tensor] = []

    def forward(self, tokens, positions, mask):
        logits = super().forward(tokens, positions, mask)
        self.roots.append(logits[0, 0])
        return logits


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize(("tree", "rule"), [((2, 2, 1), "mcss-wor"), ((1, 1, 1), "sps")])
def test_caches_hold_the_committed_sequence(arch: str, tree, rule: str) -> None:
    target_model = tiny_model(arch, 0)
    target = RecordingModel(target_model)
    draft = HFModel(tiny_model(arch, 1, layers=1))
    prompt = [5, 17, 33, 2, 9]
    spec = SpecConfig(tree=tree, rule=rule, target=SamplingConfig(1.0), max_new_tokens=24, seed=3)
    committed = list(prompt)
    for steps, step in enumerate(speculative_decode(target, draft, prompt, spec, vocab_size=VOCAB)):
        # Forward 0 is the prefill; forward s + 1 verifies step s, whose root is committed[-1].
        root = target.roots[steps + 1]
        with torch.no_grad():
            fresh = target_model(torch.tensor([committed])).logits[0, -1]
        torch.testing.assert_close(root, fresh, atol=1e-5, rtol=0)
        committed += step.tokens
    assert len(committed) == len(prompt) + 24


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("tree", [(1, 1, 1, 1), (4, 2, 2), (3, 1)])
def test_greedy_matches_generate(arch: str, tree) -> None:
    target_model = tiny_model(arch, 0)
    draft_model = tiny_model(arch, 1, layers=1)
    prompt = [3, 14, 15, 92, 65, 35]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = target_model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=40,
            min_new_tokens=40,
        )[0, len(prompt) :].tolist()
    spec = SpecConfig(tree=tree, target=GREEDY, max_new_tokens=40)
    out: list[int] = []
    accepted = 0
    for step in speculative_decode(
        HFModel(target_model), HFModel(draft_model), prompt, spec, vocab_size=VOCAB
    ):
        out += step.tokens
        accepted += step.record.accepted
    assert out == reference
    # The same model as its own draft must accept every draft token (this also checks that the
    # draft's cache holds the committed sequence: a stale draft cache would miss).
    same: list[int] = []
    for step in speculative_decode(
        HFModel(target_model), HFModel(tiny_model(arch, 0)), prompt, spec, vocab_size=VOCAB
    ):
        same += step.tokens
        assert step.record.accepted == TokenTree.parse(tree).max_depth
    assert same == reference


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_autoregressive_baseline_matches_generate(arch: str) -> None:
    model = tiny_model(arch, 0)
    prompt = [3, 14, 15, 92, 65, 35]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=20,
            min_new_tokens=20,
        )[0, len(prompt) :].tolist()
    steps = list(autoregressive_decode(HFModel(model), prompt, GREEDY, 20, vocab_size=VOCAB))
    assert [t for step in steps for t in step.tokens] == reference
    assert steps[-1].finish_reason == "length" and len(steps) == 20
