"""The tree-shape optimiser (Sequoia / OPT-Tree style): the static tree with the best expected
tokens per second under a node budget, from a measured acceptance table and measured step costs.

Both models are ``mcsd.budget``'s. Acceptance: ``acceptance[d-1][r]``, the probability that a
node's child of sibling rank r is the accepted one once the node (depth d-1) was reached,
whatever the number of siblings (true for the draft's top-k under greedy verification: child r
is accepted exactly when the target's token has draft rank r); ``expected_length`` gives AL(T).
``acceptance_from_steps`` measures it from a run's step records, ``mcsd tune`` from the draft
ranks of the target's answers. Step cost: ``PairCost.step_time`` of one row; with a draft
forward of n tokens costing ``draft_level + draft_node n``, a tree of N nodes, I of them inner
(with children), of depth D costs

    c(T) = fixed + (1 + o) (draft(1) + draft_level (D - 1) + draft_node I + target(N + 1))

(every depth above the deepest runs one draft forward). Tokens per second = AL(T) / c(T).

The search: for a fixed price ``lam`` of a second, AL(T) - lam * c(T) splits over subtrees, so a
dynamic program over (depth, sibling rank, nodes left) finds the best tree of every size N and
depth limit D at once, each inner node priced at ``lam (1 + o) draft_node`` (``draft_node``: the
least-squares slope of the draft's measured forwards up to the budget, ``_node_price``); the
levels and the target forward are priced with the exact step time, so where the draft's
forwards are affine the pick is the optimum (elsewhere the DP's candidates are still compared
at their exact cost). Dinkelbach's iteration (lam <- AL / c of the last pick) converges to the
best ratio in a few rounds. ``choose`` then compares with plain decoding (one target forward
per token) and picks no speculation at all when no tree is expected to beat it.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from mcsd.bench.defaults import OPTIMISER_ITERATIONS, OPTIMISER_TOLERANCE
from mcsd.budget import PairCost, expected_length
from mcsd.config import NO_SPECULATION
from mcsd.stats import StepRecord
from mcsd.tree import ROOT, TokenTree


def _check_acceptance(acceptance: Sequence[Sequence[float]]) -> tuple[tuple[float, ...], ...]:
    table = tuple(tuple(float(a) for a in row) for row in acceptance)
    if not table or not all(table):
        raise ValueError("acceptance must have one non-empty row of rank probabilities per depth")
    for d, row in enumerate(table, start=1):
        if any(not 0.0 <= a <= 1.0 for a in row) or sum(row) > 1.0 + 1e-9:
            raise ValueError(
                f"acceptance at depth {d} must be probabilities in [0, 1] summing to <= 1"
            )
    return table


def acceptance_from_steps(
    records: Iterable[StepRecord], max_depth: int, width: int
) -> list[list[float]]:
    """The acceptance table measured by a run (``mcsd bench`` / ``mcsd generate`` step
    records): at depth d, the share of the steps that verified depth d whose accepted node
    there had sibling rank r. Only the ranks the run's tree offered are observed, so measure
    with a tree at least ``width`` wide and ``max_depth`` deep."""
    reached = [0] * max_depth
    accepted = [[0] * width for _ in range(max_depth)]
    for record in records:
        for d in range(min(record.attempted, max_depth)):
            reached[d] += 1
        for d, rank in enumerate(record.ranks[:max_depth]):
            if rank < width:
                accepted[d][rank] += 1
    return [[a / n if n else 0.0 for a in row] for row, n in zip(accepted, reached, strict=True)]


@dataclass(frozen=True, kw_only=True)
class Choice:
    """The optimiser's pick: a tree, or None for plain decoding."""

    tree: TokenTree | None
    accepted_length: float  # expected tokens per step (1 for plain decoding)
    step_time: float  # seconds
    plain_tokens_per_s: float  # one target forward per token

    @property
    def tokens_per_s(self) -> float:
        return self.accepted_length / self.step_time

    @property
    def name(self) -> str:
        return NO_SPECULATION if self.tree is None else tree_name(self.tree)


def tree_name(tree: TokenTree) -> str:
    """``4,2,2`` for a k-config, else the JSON list of rank paths (both parse as ``--tree``)."""
    config = tree.k_config()
    if config is not None:
        return ",".join(map(str, config))
    return "[" + ",".join("[" + ",".join(map(str, p)) + "]" for p in tree.rank_paths()) + "]"


def best_tree(
    acceptance: Sequence[Sequence[float]],
    costs: PairCost,
    budget: int,
    max_depth: int | None = None,
) -> Choice:
    """The static tree of at most ``budget`` nodes (and ``max_depth`` levels; default: the
    acceptance table's depth) with the best expected tokens/s under the two models."""
    table = _check_acceptance(acceptance)
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be an integer >= 1, got {budget!r}")
    depth_limit = len(table) if max_depth is None else max_depth
    if isinstance(depth_limit, bool) or not isinstance(depth_limit, int) or depth_limit < 1:
        raise ValueError(f"max_depth must be an integer >= 1, got {max_depth!r}")
    plain = 1.0 / costs.step_time(None)
    lam, best = 0.0, None
    for _ in range(OPTIMISER_ITERATIONS):
        tree = _best_for_price(table, costs, budget, depth_limit, lam)
        value, cost = expected_length(tree, table), costs.step_time(tree)
        best = Choice(tree=tree, accepted_length=value, step_time=cost, plain_tokens_per_s=plain)
        if value - lam * cost <= OPTIMISER_TOLERANCE * value:
            break
        lam = value / cost
    assert best is not None
    return best


def choose(
    acceptance: Sequence[Sequence[float]],
    costs: PairCost,
    budget: int,
    max_depth: int | None = None,
) -> Choice:
    """``best_tree``, or plain decoding (``tree=None``) when it is expected to be faster."""
    pick = best_tree(acceptance, costs, budget, max_depth)
    if pick.tokens_per_s > pick.plain_tokens_per_s:
        return pick
    plain = costs.step_time(None)
    return Choice(tree=None, accepted_length=1.0, step_time=plain, plain_tokens_per_s=1.0 / plain)


def _best_for_price(
    table: tuple[tuple[float, ...], ...],
    costs: PairCost,
    budget: int,
    depth_limit: int,
    lam: float,
) -> TokenTree:
    """argmax over trees of AL - lam * c. For every depth limit L, ``forest[d][r][n]`` is the
    best value of exactly n nodes placed as the children of ranks >= r of a node at depth d - 1
    and their subtrees, per unit of that node's reach (its inner nodes priced at
    lam (1 + o) draft_node each); ranks beyond the table are worth nothing, so any nodes left
    there are leaves. The levels and the target forward are priced outside, for the tree's true
    depth and size, so the best score over all L and N is the optimum."""
    depth_limit = min(depth_limit, budget)
    price = lam * _node_price(costs, budget)
    best: tuple[float, TokenTree] | None = None
    for limit in range(1, depth_limit + 1):
        # value[d][r] [budget + 1], split[d][r][n] = nodes in the rank-r child's subtree
        value: dict[tuple[int, int], np.ndarray] = {}
        split: dict[tuple[int, int], np.ndarray] = {}
        below = np.full(budget + 1, -np.inf)  # forest below depth limit: no node fits
        below[0] = 0.0
        for d in range(limit, 0, -1):
            row = table[d - 1] if d <= len(table) else ()
            width = len(row)
            value[d, width] = np.zeros(budget + 1)  # worthless leaves
            split[d, width] = np.zeros(budget + 1, dtype=np.int64)
            # subtree of a child with m nodes: a * (1 + below[m - 1]) - price if m > 1
            m = np.arange(1, budget + 1)
            inner = np.where(m > 1, price, 0.0)
            for r in range(width - 1, -1, -1):
                fits = np.isfinite(below[m - 1])  # [budget]: a forest of m - 1 nodes exists
                value_below = np.where(fits, below[m - 1], 0.0)  # no 0 x -inf for a = 0
                subtree = np.where(fits, row[r] * (1.0 + value_below) - inner, -np.inf)
                rest = value[d, r + 1]
                out = np.full(budget + 1, -np.inf)
                out[0] = 0.0
                pick = np.zeros(budget + 1, dtype=np.int64)
                for n in range(1, budget + 1):
                    totals = subtree[:n] + rest[n - 1 :: -1][:n]  # m = 1..n, rest n - m
                    j = int(np.argmax(totals))
                    out[n], pick[n] = totals[j], j + 1
                value[d, r], split[d, r] = out, pick
            below = value[d, 0]
        for n in range(1, budget + 1):
            if not np.isfinite(below[n]):
                continue
            tree = _from_shape(_shape(split, table, 1, 0, n))
            score = expected_length(tree, table) - (lam * costs.step_time(tree) if lam else 0.0)
            if best is None or score > best[0] + 1e-12:
                best = (score, tree)
    assert best is not None
    return best[1]


def _node_price(costs: PairCost, budget: int) -> float:
    """Seconds of a step per inner node: ``(1 + o)`` times the slope of the least-squares line
    through the draft's measured forwards of at most ``budget`` tokens (two at least)."""
    first = max(2, bisect.bisect_right(costs.draft.tokens, budget))
    slope = np.polyfit(costs.draft.tokens[:first], costs.draft.seconds[:first], 1)[0]
    return (1.0 + costs.overhead) * max(0.0, float(slope))


def _shape(split: dict, table: tuple, d: int, r: int, n: int) -> tuple:
    """The children (nested shapes, rank order) of n nodes placed from rank r at depth d."""
    width = len(table[d - 1]) if d <= len(table) else 0
    if n == 0:
        return ()
    if r >= width:
        return ((),) * n  # worthless leaves
    m = int(split[d, r][n])
    return (_shape(split, table, d + 1, 0, m - 1), *_shape(split, table, d, r + 1, n - m))


def _from_shape(shape: tuple) -> TokenTree:
    """A ``TokenTree`` from nested child tuples (children in rank order), BFS-numbered."""
    parents: list[int] = []
    level = [(ROOT, shape)]
    while level:
        following = []
        for parent, children in level:
            for child in children:
                parents.append(parent)
                following.append((len(parents) - 1, child))
        level = following
    return TokenTree(tuple(parents))
