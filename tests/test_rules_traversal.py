"""Traversal Verification (rule ``traversal``), exactly.

A reference written from the algorithm's definition (``visit`` below: a node's target
sub-measure, its children visited leaf-first, residual and without-replacement updates) gives the
exact distribution of (accepted path, emitted token) for fixed node tokens. Enumerating every
drafted tree (siblings drawn without replacement, each with its probability) and completing the
emitted tokens with the target itself must give exactly the target's sequence distribution.
``mcsd.verify.verify_tree`` must sample from that same distribution, and on a chain the rule must
accept at least as many tokens as token-level verification (it is block verification there).
"""

from __future__ import annotations

import itertools
from collections import defaultdict

import pytest
import torch

from mcsd.checks.node import goodness_of_fit
from mcsd.tree import ROOT, TokenTree
from mcsd.verify import verify_tree

Table = dict[tuple[int, ...], list[float]]  # context (tokens after the root) -> distribution


def tables(vocab: int, depth: int, seed: int) -> tuple[Table, Table]:
    """Random target and draft next-token tables (some zeros in the target)."""
    generator = torch.Generator().manual_seed(seed)
    p: Table = {}
    q: Table = {}
    for length in range(depth + 1):
        for context in itertools.product(range(vocab), repeat=length):
            a = -torch.log1p(-torch.rand(vocab, generator=generator, dtype=torch.float64))
            b = -torch.log1p(-torch.rand(vocab, generator=generator, dtype=torch.float64))
            if float(torch.rand((), generator=generator)) < 0.3:
                a[int(torch.randint(vocab, (), generator=generator))] = 0.0
            p[context] = (a**2 / (a**2).sum()).tolist()
            q[context] = (0.5 * b / b.sum() + 0.5 * a / a.sum()).tolist()
    return p, q


def drafts(tree: TokenTree, q: Table, vocab: int) -> list[tuple[list[int], float]]:
    """Every assignment of tokens to the nodes, siblings drawn without replacement from q of
    their parent's context, with its probability."""
    out: list[tuple[list[int], float]] = [([0] * tree.num_nodes, 1.0)]
    for node in (ROOT, *range(tree.num_nodes)):  # BFS: parents before children
        children = tree.children(node)
        if not children:
            continue
        grown = []
        for tokens, prob in out:
            context = context_of(tree, tokens, node)
            dist = q[context]
            for picks in itertools.permutations(range(vocab), len(children)):
                weight, remaining = 1.0, 1.0
                for t in picks:
                    weight *= dist[t] / remaining if remaining > 0 else 0.0
                    remaining -= dist[t]
                if weight <= 0.0:
                    continue
                new = list(tokens)
                for child, t in zip(children, picks, strict=True):
                    new[child] = t
                grown.append((new, prob * weight))
        out = grown
    return out


def context_of(tree: TokenTree, tokens: list[int], node: int) -> tuple[int, ...]:
    return () if node == ROOT else tuple(tokens[a] for a in tree.ancestors(node))


def reference(
    tree: TokenTree, tokens: list[int], p: Table, q: Table
) -> dict[tuple[tuple[int, ...], int], float]:
    """Exact P(accepted path, emitted token) of Traversal Verification for fixed node tokens."""

    def visit(node: int, weight: float) -> dict[tuple[tuple[int, ...], int], float]:
        """Outcomes with node accepted (the rest: node rejected). Averaged over the drafts of
        the subtree their total is `weight`; for fixed tokens it is not, except at the root."""
        context = context_of(tree, tokens, node)
        target = p[context]
        children = tree.children(node)
        out: dict[tuple[tuple[int, ...], int], float] = defaultdict(float)
        if not children:
            for t, x in enumerate(target):
                out[((), t)] += weight * x
            return out
        mu = [weight * x for x in target]
        qbar = list(q[context])
        reach = 1.0
        for child in children:
            b = tokens[child]
            a = 0.0 if qbar[b] <= 0.0 else min(1.0, mu[b] / qbar[b])
            accepted = 0.0  # P(the child is accepted | this subtree): a only on average
            if a > 0.0:
                for (path, t), prob in visit(child, a).items():
                    out[((child, *path), t)] += reach * prob
                    accepted += prob
            beta = sum(min(m, x) for m, x in zip(mu, qbar, strict=True))
            mu = [max(0.0, m - x) for m, x in zip(mu, qbar, strict=True)]
            if beta < 1.0:
                mu = [m / (1.0 - beta) for m in mu]
            qbar = [0.0 if t == b else x for t, x in enumerate(qbar)]
            total = sum(qbar)
            qbar = [x / total for x in qbar] if total > 0 else qbar
            reach *= 1.0 - accepted
        for t, m in enumerate(mu):
            out[((), t)] += reach * m
        return out

    return dict(visit(ROOT, 1.0))


def completed(
    tree: TokenTree, tokens: list[int], outcome: dict, p: Table, length: int
) -> dict[tuple[int, ...], float]:
    """Sequence distribution after emitting (path tokens + token) and continuing with p."""
    out: dict[tuple[int, ...], float] = defaultdict(float)
    for (path, token), prob in outcome.items():
        stack = [((*[tokens[u] for u in path], token), prob)]
        while stack:
            seq, pr = stack.pop()
            if len(seq) == length:
                out[seq] += pr
                continue
            for t, x in enumerate(p[seq]):
                if x > 0:
                    stack.append(((*seq, t), pr * x))
    return out


def target_sequences(p: Table, vocab: int, length: int) -> dict[tuple[int, ...], float]:
    out = {}
    for seq in itertools.product(range(vocab), repeat=length):
        prob = 1.0
        for i in range(length):
            prob *= p[seq[:i]][seq[i]]
        out[seq] = prob
    return out


SHAPES = [("1,1,1", 3), ("2,1", 3), ("2,2", 3), ([[0], [1], [2], [0, 0], [1, 0]], 4)]


@pytest.mark.parametrize(("shape", "vocab"), SHAPES, ids=[str(s) for s, _ in SHAPES])
def test_traversal_is_lossless_exactly(shape: object, vocab: int) -> None:
    tree = TokenTree.parse(shape)
    length = tree.max_depth + 1
    for seed in range(3):
        p, q = tables(vocab, tree.max_depth, seed)
        emitted: dict[tuple[int, ...], float] = defaultdict(float)
        total = 0.0
        for tokens, prob in drafts(tree, q, vocab):
            outcome = reference(tree, tokens, p, q)
            assert sum(outcome.values()) == pytest.approx(1.0, abs=1e-12)
            total += prob
            for seq, pr in completed(tree, tokens, outcome, p, length).items():
                emitted[seq] += prob * pr
        assert total == pytest.approx(1.0, abs=1e-12)
        expected = target_sequences(p, vocab, length)
        worst = max(abs(emitted.get(s, 0.0) - x) for s, x in expected.items())
        assert worst < 1e-12, (shape, seed, worst)


def accepted_length(outcome: dict) -> float:
    return sum(prob * len(path) for (path, _), prob in outcome.items())


def token_level_chain_length(tokens: list[int], p: Table, q: Table) -> float:
    """Expected accepted length of SpS (token-level) on a chain with these tokens."""
    expected, reach = 0.0, 1.0
    for i, t in enumerate(tokens):
        context = tuple(tokens[:i])
        reach *= min(1.0, p[context][t] / q[context][t]) if q[context][t] > 0 else 0.0
        expected += reach
    return expected


def test_chain_accepts_at_least_token_level() -> None:
    """Block verification accepts at least as many tokens as token-level verification, in
    expectation over the drafts (not for every fixed draft)."""
    tree = TokenTree.from_config((1, 1, 1))
    for seed in range(5):
        p, q = tables(3, 3, 10 + seed)
        block = token_level = 0.0
        for tokens, prob in drafts(tree, q, 3):
            block += prob * accepted_length(reference(tree, tokens, p, q))
            token_level += prob * token_level_chain_length(tokens, p, q)
        assert block >= token_level - 1e-12
        assert block > token_level + 1e-4  # strictly better on these tables


def test_verify_tree_samples_the_reference() -> None:
    """verify_tree(rule='traversal') on fixed node tokens against the exact reference."""
    tree = TokenTree.parse([[0], [1], [2], [0, 0], [1, 0], [0, 0, 0]])
    vocab = 4
    p_table, q_table = tables(vocab, tree.max_depth, seed=21)
    tokens = [0, 1, 2, 1, 3, 2]  # distinct siblings, as a draft without replacement gives
    outcome = reference(tree, tokens, p_table, q_table)
    keys = sorted(outcome)
    rows = [context_of(tree, tokens, u) for u in (ROOT, *range(tree.num_nodes))]
    p = torch.tensor([p_table[c] for c in rows], dtype=torch.float64)  # [N+1, V]
    q = torch.tensor([q_table[c] for c in rows], dtype=torch.float64)
    generator = torch.Generator().manual_seed(22)
    trials = 20_000
    counts = torch.zeros(len(keys) + 1, dtype=torch.float64)
    for _ in range(trials):
        result = verify_tree(tree, torch.tensor(tokens), p, q, "traversal", generator)
        key = (result.accepted, result.token)
        counts[keys.index(key) if key in outcome else len(keys)] += 1
        assert result.bonus == (bool(result.accepted) and not tree.children(result.accepted[-1]))
    expected = torch.tensor([outcome[k] for k in keys] + [0.0], dtype=torch.float64)
    fit = goodness_of_fit(counts, expected, alpha=1e-4)
    assert fit.passed, fit


def test_root_always_emits() -> None:
    """Disjoint supports: every child is rejected and the root corrects from p."""
    tree = TokenTree.from_config((2, 1))
    p = torch.tensor([[0.5, 0.5, 0.0, 0.0]] * 5, dtype=torch.float64)
    q = torch.tensor([[0.0, 0.0, 0.5, 0.5]] * 5, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        result = verify_tree(tree, torch.tensor([2, 3, 2, 3]), p, q, "traversal", generator)
        assert result.accepted == () and result.token in (0, 1) and not result.bonus
