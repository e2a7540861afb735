"""The device-side greedy verification (mcsd.verify.device) equals ``verify_tree`` greedy.

Random trees (k-configs and random parent arrays), node tokens from a tiny vocabulary so that
siblings often repeat a token and often match the target argmax; p is the one-hot argmax, as
``warp`` makes it for a greedy target.
"""

from __future__ import annotations

import random

import pytest
import torch

from mcsd.sampling import one_hot_argmax
from mcsd.tree import TokenTree
from mcsd.verify import verify_tree
from mcsd.verify.device import GreedyTreeVerifier


def random_tree(rng: random.Random) -> TokenTree:
    if rng.random() < 0.4:
        config = [rng.randint(1, 3) for _ in range(rng.randint(1, 4))]
        return TokenTree.from_config(config)
    parents = [-1]
    depth = [1]
    for i in range(1, rng.randint(1, 30)):
        # BFS order: a parent at the previous or current frontier depth
        last = depth[-1]
        options = [-1] if last == 1 else []
        options += [j for j in range(i) if depth[j] in (last - 1, last)]
        parent = rng.choice(options)
        d = 1 if parent == -1 else depth[parent] + 1
        if d < last:
            continue
        parents.append(parent)
        depth.append(d)
    return TokenTree.from_parents(parents)


@pytest.mark.parametrize("seed", range(300))
def test_equals_verify_tree(seed: int) -> None:
    rng = random.Random(seed)
    tree = random_tree(rng)
    vocab = rng.randint(2, 5)
    generator = torch.Generator().manual_seed(seed)
    n = tree.num_nodes
    tokens = torch.randint(0, vocab, (n,), generator=generator)
    logits = torch.randn(n + 1, vocab, generator=generator)
    expected = verify_tree(tree, tokens, one_hot_argmax(logits), None, "greedy")
    verifier = GreedyTreeVerifier(tree, "cpu")
    fetched = verifier.device_result(tokens, logits.argmax(dim=-1)).tolist()
    result, accepted_tokens = verifier.result(fetched)
    assert result == expected
    assert accepted_tokens == [int(tokens[a]) for a in expected.accepted]
    assert verifier(tokens, logits.argmax(dim=-1)) == expected


def test_all_accepted_gives_bonus() -> None:
    tree = TokenTree.from_config((2, 1))  # nodes 0, 1; node 2 under 0, node 3 under 1
    argmax = torch.tensor([5, 6, 7, 8, 9])  # rows: root, node 0 .. node 3
    tokens = torch.tensor([4, 5, 6, 7])  # node 1 matches the root, node 3 matches row 2 (node 1)
    result = GreedyTreeVerifier(tree, "cpu")(tokens, argmax)
    assert result.accepted == (1, 3) and result.token == 9 and result.bonus
    assert result.ranks == (1, 0)


def test_sampled_verifier_rejects_other_rules() -> None:
    from mcsd.config import SamplingConfig
    from mcsd.verify.rules import device_verifier

    with pytest.raises(ValueError, match="rule must be one of sps, mcss, mcss-wor"):
        device_verifier(TokenTree.parse("2,2"), "kseq", "cpu", SamplingConfig(temperature=1.0))


def test_sampled_verifier_accepts_everything_when_p_equals_one_hot_q() -> None:
    """p = q one-hot at each node's first child: every first child is accepted, the leaf's
    bonus token is p's only token there."""
    from mcsd.config import SamplingConfig
    from mcsd.verify.device import SampledTreeVerifier

    tree = TokenTree.parse("2,1")
    n, vocab = tree.num_nodes, 5
    tokens = torch.tensor([1, 2, 3, 4])  # [N]: root children 0, 1; their children 2, 3
    p = torch.zeros(n + 1, vocab)
    p[0, 1] = p[1, 3] = p[2, 4] = p[3, 0] = p[4, 0] = 1.0  # root -> 1, node 0 -> 3, then 0
    q = p.clone()
    verifier = SampledTreeVerifier(
        tree, "cpu", SamplingConfig(temperature=1.0), without_replacement=True
    )
    result = verifier(tokens, p, q, torch.Generator())
    assert result.accepted == (0, 2) and result.token == 0 and result.bonus
