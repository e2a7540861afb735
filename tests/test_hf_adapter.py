"""The transformers adapter and the engine on tiny random Qwen2 / Llama models (float32, CPU).

- tree forward + compaction reproduce a plain chain forward, under "sdpa" and "eager";
- after every speculative step the target's next-token distribution equals a fresh forward over
  the committed sequence (the caches hold exactly the committed tokens);
- speculative greedy output equals the model's own greedy ``generate()`` token for token.
This module runs under the newest transformers here and, through
tests/test_transformers_versions.py, under the lowest supported one (5.17).
"""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHITECTURES, greedy_reference, spec_decode, spec_tokens, tiny_causal_lm

from mcsd.config import GREEDY, SamplingConfig, SpecConfig
from mcsd.engine import autoregressive_decode
from mcsd.models.base import chain_mask
from mcsd.models.hf import HFModel
from mcsd.tree import TokenTree

transformers = pytest.importorskip("transformers")
VOCAB = 96


def tiny_model(arch: str, seed: int, attn: str = "sdpa", layers: int = 2):
    return tiny_causal_lm(arch, seed=seed, attn=attn, layers=layers, vocab=VOCAB)


def tree_block(tree: TokenTree) -> torch.Tensor:
    """[N+1, N+1] over [pending root, nodes]: everyone sees the root, nodes their ancestors."""
    mask = torch.zeros(tree.num_nodes + 1, tree.num_nodes + 1, dtype=torch.bool)
    mask[:, 0] = True
    mask[1:, 1:] = tree.ancestor_mask()
    return mask


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_tree_forward_and_compaction_match_chain(arch: str, attn: str) -> None:
    model = tiny_model(arch, 0, attn)
    adapter = HFModel(model)
    seq = torch.randint(0, VOCAB, (1, 14), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        chain = model(seq).logits  # [1, 14, V]
    adapter.forward(seq[:, :8], torch.arange(8)[None], chain_mask(8))
    adapter.commit()
    tree = TokenTree.from_config((2, 2))  # nodes 0,1 at depth 1; 2,3 under 0; 4,5 under 1
    # Node 1 and then its child 5 carry the true continuation; every other node is a decoy.
    nodes = torch.tensor([3, seq[0, 9], 7, 11, 5, seq[0, 10]])
    tokens = torch.cat([seq[0, 8:9], nodes])[None]  # [1, 7]: pending root + nodes
    positions = (8 + torch.tensor([0, *tree.depth]))[None]
    out = adapter.forward(tokens, positions, tree_block(tree))  # [1, 7, V]
    torch.testing.assert_close(out[0, 0], chain[0, 8], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[0, 2], chain[0, 9], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[0, 6], chain[0, 10], atol=1e-5, rtol=0)
    adapter.commit([[0, 1 + 1, 1 + 5]])  # keep root, node 1, node 5
    assert adapter.cache_lengths() == (11,)
    out = adapter.forward(seq[:, 11:14], torch.arange(11, 14)[None], chain_mask(3))
    torch.testing.assert_close(out[0], chain[0, 11:14], atol=1e-5, rtol=0)
    adapter.commit([[]])  # drop them again
    out = adapter.forward(seq[:, 11:13], torch.arange(11, 13)[None], chain_mask(2))
    torch.testing.assert_close(out[0], chain[0, 11:13], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_ragged_rows_match_one_row_each(arch: str) -> None:
    """Two rows with different committed lengths and different accepted paths: each row's
    logits equal its own batch-1 run (rows never see each other's cache)."""
    model = tiny_model(arch, 0)
    seqs = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(2))
    lengths, keeps = (9, 5), ([0, 2], [0, 1, 3])
    tree = TokenTree.from_config((2, 1))  # nodes 0, 1; node 2 under 0, node 3 under 1
    block = tree_block(tree)
    offsets = torch.tensor([0, *tree.depth])
    single = []
    for row in range(2):
        one = HFModel(model)
        n = lengths[row]
        one.forward(seqs[row : row + 1, :n], torch.arange(n)[None], chain_mask(n))
        one.commit()
        tokens = seqs[row : row + 1, n : n + 5]
        one.forward(tokens, (n + offsets)[None], block)
        one.commit([keeps[row]])
        m = n + len(keeps[row])
        single.append(one.forward(seqs[row : row + 1, m : m + 2], torch.arange(m, m + 2)[None],
                                  chain_mask(2))[0])  # fmt: skip
    both = HFModel(model, batch_size=2)
    for row in range(2):  # a prefill per row: the other row keeps nothing of it
        n = lengths[row]
        tokens = seqs[:, :n]
        both.forward(tokens, torch.arange(n).expand(2, n), chain_mask(n))
        both.commit([list(range(n)) if r == row else [] for r in range(2)])
    assert both.cache_lengths() == lengths
    n = torch.tensor(lengths)[:, None]
    tokens = torch.stack([seqs[r, lengths[r] : lengths[r] + 5] for r in range(2)])
    both.forward(tokens, n + offsets, block)
    both.commit([keeps[0], keeps[1]])
    m = [lengths[r] + len(keeps[r]) for r in range(2)]
    tokens = torch.stack([seqs[r, m[r] : m[r] + 2] for r in range(2)])
    positions = torch.tensor([[m[0], m[0] + 1], [m[1], m[1] + 1]])
    out = both.forward(tokens, positions, chain_mask(2))
    for row in range(2):
        torch.testing.assert_close(out[row], single[row], atol=1e-5, rtol=0)


class RecordingModel(HFModel):
    """Records the logits of the first new token of every forward (the root when verifying)."""

    def __init__(self, model) -> None:
        super().__init__(model)
        self.roots: list[torch.Tensor] = []

    def forward(self, tokens, positions, tree_mask, *, logits="all"):
        out = super().forward(tokens, positions, tree_mask, logits="all")
        self.roots.append(out[0, 0])
        return out if logits == "all" else None if logits == "none" else out[:, -1:]


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize(("tree", "rule"), [((2, 2, 1), "mcss-wor"), ((1, 1, 1), "sps")])
def test_caches_hold_the_committed_sequence(arch: str, tree, rule: str) -> None:
    target_model = tiny_model(arch, 0)
    target = RecordingModel(target_model)
    draft = HFModel(tiny_model(arch, 1, layers=1))
    prompt = [5, 17, 33, 2, 9]
    spec = SpecConfig(
        tree=tree, rule=rule, target=SamplingConfig(temperature=1.0), max_new_tokens=24, seed=3
    )
    committed = list(prompt)
    for steps, step in enumerate(spec_decode(target, draft, prompt, spec, VOCAB)):
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
    reference = greedy_reference(target_model, prompt, 40)
    spec = SpecConfig(tree=tree, target=GREEDY, max_new_tokens=40)
    out = spec_tokens(HFModel(target_model), HFModel(draft_model), prompt, spec, VOCAB)
    assert out == reference
    # The same model as its own draft must accept every draft token (this also checks that the
    # draft's cache holds the committed sequence: a stale draft cache would miss).
    same: list[int] = []
    for step in spec_decode(
        HFModel(target_model), HFModel(tiny_model(arch, 0)), prompt, spec, VOCAB
    ):
        same += step.tokens
        assert step.record.accepted == TokenTree.parse(tree).max_depth
    assert same == reference


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_autoregressive_baseline_matches_generate(arch: str) -> None:
    model = tiny_model(arch, 0)
    prompt = [3, 14, 15, 92, 65, 35]
    reference = greedy_reference(model, prompt, 20)
    steps = list(autoregressive_decode(HFModel(model), prompt, GREEDY, 20, vocab_size=VOCAB))
    assert [t for step in steps for t in step.tokens] == reference
    assert steps[-1].finish_reason == "length" and len(steps) == 20


def test_reset_one_row_keeps_the_other() -> None:
    """Emptying the longer row shrinks the shared region; the other row still sees exactly its
    own prefix, and the emptied row starts afresh."""
    model = tiny_model("qwen2", 0)
    seqs = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(4))
    both = HFModel(model, batch_size=2)
    both.forward(seqs[:, :9], torch.arange(9).expand(2, 9), chain_mask(9))
    both.commit([list(range(9)), list(range(5))])
    both.reset(0)
    assert both.cache_lengths() == (0, 5)
    tokens = torch.stack([seqs[0, :2], seqs[1, 5:7]])
    out = both.forward(tokens, torch.tensor([[0, 1], [5, 6]]), chain_mask(2))
    with torch.no_grad():
        fresh = model(seqs[:1, :2]).logits[0]  # row 0 from scratch
        chain = model(seqs[1:, :7]).logits[0, 5:7]  # row 1 after its 5 committed tokens
    torch.testing.assert_close(out[0], fresh, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], chain, atol=1e-5, rtol=0)
    both.commit()
    with pytest.raises(ValueError, match="row must be in"):
        both.reset(5)
