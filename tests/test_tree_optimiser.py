"""The tree-shape optimiser (mcsd.bench.optimise): its pick is the brute-force optimum of the
same acceptance and cost tables, its expected accepted length matches simulation, and it picks
plain decoding when no tree pays."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from mcsd.bench.optimise import (
    NO_SPECULATION,
    _node_price,
    acceptance_from_steps,
    best_tree,
    choose,
)
from mcsd.budget import PairCost, StepCost, expected_length
from mcsd.tree import ROOT, TokenTree


def _plane_forests(n: int) -> list[tuple]:
    """Every ordered forest of exactly n nodes, as nested tuples of children."""
    if n == 0:
        return [()]
    out = []
    for m in range(1, n + 1):  # the first tree has m nodes
        for children in _plane_forests(m - 1):
            for rest in _plane_forests(n - m):
                out.append((children, *rest))
    return out


def _tree(forest: tuple) -> TokenTree:
    parents: list[int] = []
    level = [(ROOT, forest)]
    while level:
        following = []
        for parent, children in level:
            for child in children:
                parents.append(parent)
                following.append((len(parents) - 1, child))
        level = following
    return TokenTree(tuple(parents))


ALL_TREES = [_tree(f) for n in range(1, 7) for f in _plane_forests(n)]


def costs_of(target: list[float], level: float = 0.0, node: float = 0.0, **rest) -> PairCost:
    """A step cost with ``target[n - 1]`` the target's forward of n tokens and a draft forward
    of n tokens costing ``level + node * n``."""
    tokens = tuple(range(1, len(target) + 1))
    draft = StepCost((1, 2), (level + node, level + 2 * node))
    return PairCost(target=StepCost(tokens, tuple(target)), draft=draft, **rest)


def _random_case(seed: int) -> tuple[list[list[float]], PairCost]:
    rng = random.Random(seed)
    depth, width = rng.randint(2, 4), rng.randint(1, 4)
    acceptance = []
    for _ in range(depth):
        row = [rng.random() ** 2 for _ in range(width)]
        total = sum(row) / rng.uniform(0.3, 1.0)
        acceptance.append([a / total for a in row])
    target = [1.0]
    for _ in range(7):
        target.append(target[-1] + rng.choice([0.0, 0.02, 0.1, 0.4]))
    costs = costs_of(
        target,
        level=rng.uniform(0.0, 0.5),
        node=rng.choice([0.0, 0.05]),
        overhead=rng.choice([0.0, rng.uniform(0.0, 0.2)]),
        fixed=rng.uniform(0.0, 0.3),
    )
    return acceptance, costs


@pytest.mark.parametrize("seed", range(40))
def test_pick_is_the_brute_force_optimum(seed: int) -> None:
    acceptance, costs = _random_case(seed)
    budget = 6
    rate = {
        t: expected_length(t, acceptance) / costs.step_time(t)
        for t in ALL_TREES
        if t.num_nodes <= budget
    }
    best = max(rate.values())
    pick = best_tree(acceptance, costs, budget, max_depth=6)
    assert pick.tokens_per_s == pytest.approx(best, rel=1e-12, abs=0)
    assert pick.tree is not None and pick.tree.num_nodes <= budget
    assert rate[pick.tree] == pytest.approx(best, rel=1e-12, abs=0)


@pytest.mark.parametrize("max_depth", [1, 2, 3])
def test_depth_limit_is_respected(max_depth: int) -> None:
    acceptance, costs = [[0.9, 0.05]] * 4, costs_of([1.0] * 8)
    pick = best_tree(acceptance, costs, 6, max_depth=max_depth)
    assert pick.tree is not None and pick.tree.max_depth <= max_depth
    within = [t for t in ALL_TREES if t.max_depth <= max_depth]
    best = max(expected_length(t, acceptance) for t in within)
    assert pick.accepted_length == pytest.approx(best, rel=1e-12)


def test_expected_accepted_length_matches_simulation() -> None:
    """Walk a (3,2,1) tree: at a reached node of depth d - 1, the child of rank r is accepted
    with probability acceptance[d-1][r] (else the step ends); 40,000 walks."""
    acceptance = [[0.5, 0.2, 0.1], [0.6, 0.2], [0.7]]
    tree = TokenTree.from_config((3, 2, 1))
    generator = torch.Generator().manual_seed(0)
    walks = 40_000
    total = 0
    for u in torch.rand(walks, 3, generator=generator, dtype=torch.float64).tolist():
        node, length = ROOT, 1
        for d, coin in enumerate(u):
            children = tree.children(node)
            edges = [sum(acceptance[d][: r + 1]) for r in range(len(children))]
            rank = next((r for r, edge in enumerate(edges) if coin < edge), None)
            if rank is None:
                break
            node, length = children[rank], length + 1
        total += length
    formula = expected_length(tree, acceptance)
    assert formula == pytest.approx(1 + 0.8 * (1 + 0.8 * (1 + 0.7)))
    # standard deviation of one walk <= 1.5: 5 sigma of the mean
    assert abs(total / walks - formula) < 5 * 1.5 / walks**0.5


def test_no_speculation_when_no_tree_pays() -> None:
    """Low acceptance and a step that costs much more than a plain forward: plain decoding."""
    costs = costs_of([1.0, 1.6, 2.0, 2.5, 3.0], level=0.4, overhead=0.0)
    low = choose([[0.1, 0.05], [0.1]], costs, 4)
    assert low.tree is None and low.name == NO_SPECULATION
    assert low.tokens_per_s == pytest.approx(1.0)
    high = choose([[0.95, 0.02], [0.95], [0.95]], costs, 4)
    assert high.tree is not None and high.tokens_per_s > 1.0


def test_cheap_wide_forwards_favour_wide_trees() -> None:
    """Flat target costs (GPU-like): the whole budget; steep ones (CPU-like): a short chain."""
    acceptance = [[0.6, 0.15, 0.08, 0.04]] * 4
    flat = best_tree(acceptance, costs_of([1.0] * 17, level=0.1, overhead=0.0), 16)
    steep_target = [1.0 + 0.3 * n for n in range(17)]
    steep = best_tree(acceptance, costs_of(steep_target, level=0.1, overhead=0.0), 16)
    assert flat.tree is not None and steep.tree is not None
    assert flat.tree.num_nodes == 16
    assert steep.tree.num_nodes < 6


def test_acceptance_from_step_records() -> None:
    """Per depth and rank, measured through the engine: a (3,2) tree under greedy verification
    on toy tables; the table matches the records counted by hand and its AL prediction for the
    tree that ran is the measured AL (same steps, no model error: 5 sigma)."""
    from mcsd.config import GREEDY, SpecConfig
    from mcsd.draft.proposer import Drafter
    from mcsd.engine import speculative_decode
    from mcsd.models.toy import TableLM

    target, draft = TableLM.random(6, seed=3), TableLM.random(6, seed=4)
    spec = SpecConfig(tree="3,2", target=GREEDY, max_new_tokens=400, seed=0)
    proposer = Drafter(draft, vocab_size=6)
    steps = list(speculative_decode(target, proposer, [1, 2], spec, vocab_size=6))
    records = [step.record for step in steps[:-1]]  # the last step may be cut by the length
    table = acceptance_from_steps(records, 2, 3)
    first = sum(1 for r in records if r.ranks[:1] == (0,)) / len(records)
    assert table[0][0] == pytest.approx(first)
    deeper = [r for r in records if r.attempted >= 2]
    assert table[1][1] == pytest.approx(sum(r.ranks[1:2] == (1,) for r in deeper) / len(deeper))
    assert table[1][2] == 0.0  # the tree offered 2 children at depth 2
    measured = sum(r.accepted + 1 for r in records) / len(records)
    predicted = expected_length(TokenTree.from_config((3, 2)), table)
    assert abs(predicted - measured) < 5 * 1.0 / len(records) ** 0.5


def test_node_price_from_measured_forwards() -> None:
    """mcsd tune's measured forwards -> the optimiser's price of an inner node: an affine draft
    is fitted exactly (the step's own levels and target forward are priced exactly)."""
    sizes = (1, 2, 4, 8, 16)
    costs = PairCost(
        target=StepCost(sizes, tuple(1.0 + 0.1 * n for n in sizes)),
        draft=StepCost(sizes, tuple(0.2 + 0.01 * n for n in sizes)),
        overhead=0.0,
        fixed=0.05,
    )
    assert [costs.target(n) for n in range(1, 10)] == pytest.approx(
        [1.0 + 0.1 * n for n in range(1, 10)]
    )
    assert _node_price(costs, 8) == pytest.approx(0.01)
    assert _node_price(replace(costs, overhead=0.5), 8) == pytest.approx(0.015)
    chain = TokenTree.from_config((1, 1))  # the uncached forward, one level of 1, 3 tokens
    assert costs.step_time(chain) == pytest.approx(0.05 + 0.21 + 0.21 + 1.3)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: best_tree([[0.5]], costs_of([1.0, 1.0]), 0), "budget must be an integer"),
        (lambda: best_tree([[0.5]], costs_of([1.0, 1.0]), 1, 0), "max_depth must be an integer"),
        (lambda: best_tree([[0.7, 0.6]], costs_of([1.0, 1.0]), 1), "summing to <= 1"),
        (lambda: best_tree([], costs_of([1.0, 1.0]), 1), "one non-empty row"),
        (lambda: costs_of([1.0]), "at least two"),
        (lambda: costs_of([1.0, -1.0]), "seconds must be finite and >= 0"),
        (lambda: costs_of([1.0, 1.0], fixed=-1.0), "fixed must be a number >= 0"),
    ],
)
def test_bad_inputs(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
