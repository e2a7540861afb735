"""Speculation that adapts to load: the tree a row grows shrinks as the batch grows.

A tree that is free at batch 1 (a forward of 1 + N tokens costs what a forward of one token
costs: the weights' bytes dominate) is not free at batch 16 (16 x (1 + N) tokens are compute).
``StepCost`` holds the measured time of a forward of ``T`` tokens in all (rows x tokens per row)
at a few ``T`` (``StepCost.probe`` runs them on a runtime) and interpolates between them.
``TreeBudget`` picks, for a batch of ``B`` speculating rows, the tree of a ladder (the
configured tree and its breadth-first prefixes, halving in size, down to plain decoding) with
the most expected tokens per second:

    tokens per row and step  AL(tree) = 1 + E(root), E(u) = sum_i (1 - a)^(i-1) a (1 + E(c_i))
    step time                target(B (N + 1)) + draft(B) + sum over levels draft(B r_l)

with ``a`` the acceptance rate of one candidate (a prior, ``DEFAULT_ACCEPTANCE``; siblings are
tried in order, each accepted with probability ``a`` once the earlier ones were rejected) and
``r_l`` the nodes of level l that have children (the draft runs them). Plain decoding is AL = 1
at ``target(B)``. The choice changes which tree is verified, never how: every tree is verified
losslessly, so the output distribution is the target's whatever the budget picks.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass
from functools import cache

import torch

from mcsd.config import BudgetDefaults
from mcsd.models.base import Runtime, chain_mask
from mcsd.tree import ROOT, TokenTree


@dataclass(frozen=True)
class StepCost:
    """Seconds per forward of ``tokens[i]`` tokens in all (``seconds[i]``), increasing tokens;
    linear between the points, and beyond the last one at the last segment's slope."""

    tokens: tuple[int, ...]
    seconds: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.tokens) < 2 or len(self.tokens) != len(self.seconds):
            raise ValueError("StepCost needs at least two (tokens, seconds) points of each")
        if list(self.tokens) != sorted(set(self.tokens)) or self.tokens[0] < 1:
            raise ValueError(f"tokens must be increasing counts >= 1, got {self.tokens}")
        if any(s <= 0 for s in self.seconds):
            raise ValueError(f"seconds must be positive, got {self.seconds}")

    def __call__(self, tokens: int) -> float:
        xs, ys = self.tokens, self.seconds
        i = min(max(bisect.bisect_left(xs, tokens), 1), len(xs) - 1)
        slope = (ys[i] - ys[i - 1]) / (xs[i] - xs[i - 1])
        return max(ys[i - 1] + slope * (tokens - xs[i - 1]), min(ys))

    @classmethod
    @torch.inference_mode()
    def probe(
        cls, runtime: Runtime, per_row: tuple[int, ...], *, repeats: int = BudgetDefaults.repeats
    ) -> StepCost:
        """Time forwards of ``per_row`` new tokens in every row of ``runtime`` (points at
        ``rows x n`` tokens in all), median of ``repeats`` after one warm-up each; empties the
        runtime."""
        rows = runtime.batch_size
        device = runtime.device
        points: dict[int, float] = {}
        for n in per_row:
            ids = torch.zeros(rows, n, dtype=torch.long, device=device)
            positions = torch.arange(n, device=device).expand(rows, n)
            mask = chain_mask(n, device=device)
            times = []
            for _ in range(repeats + 1):
                runtime.reset()
                _synchronize(device)
                started = time.perf_counter()
                runtime.forward(ids, positions, mask, logits="all")
                _synchronize(device)
                times.append(time.perf_counter() - started)
            points[rows * n] = sorted(times[1:])[len(times[1:]) // 2]
        runtime.reset()
        measured = sorted(points)
        return cls(tuple(measured), tuple(points[t] for t in measured))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@cache
def expected_length(tree: TokenTree, acceptance: float) -> float:
    """Expected tokens a step of ``tree`` commits (accepted nodes + the correction / bonus) when
    each candidate is accepted with probability ``acceptance`` once its earlier siblings were
    rejected (see the module docstring)."""

    def below(node: int) -> float:
        expected, reach = 0.0, 1.0
        for child in tree.children(node):
            expected += reach * acceptance * (1.0 + below(child))
            reach *= 1.0 - acceptance
        return expected

    return 1.0 + below(ROOT)


@cache
def ladder(tree: TokenTree) -> tuple[TokenTree, ...]:
    """``tree`` and its breadth-first prefixes of half, a quarter, ... its nodes, down to one
    node (a prefix in BFS order is a tree: parents come first)."""
    trees, n = [tree], tree.num_nodes // 2
    while n >= 1:
        trees.append(TokenTree(tree.parents[:n]))
        n //= 2
    return tuple(trees)


def draft_widths(tree: TokenTree) -> tuple[int, ...]:
    """Tokens per row of each draft forward of a step: the uncached token(s), then every level's
    nodes with children."""
    runs = [sum(1 for u in level if tree.children(u)) for level in tree.levels]
    return (1, *(r for r in runs if r))


@dataclass(frozen=True)
class TreeBudget:
    """The tree for a batch of ``B`` speculating rows (``tree_for``), from the step-cost models
    of the target and the draft (see the module docstring). ``None`` is plain decoding."""

    tree: TokenTree  # the configured tree: the largest one a row grows
    target: StepCost
    draft: StepCost
    acceptance: float = BudgetDefaults.acceptance

    def __post_init__(self) -> None:
        if not 0.0 <= self.acceptance <= 1.0:
            raise ValueError(f"acceptance must be in [0, 1], got {self.acceptance!r}")

    def step_time(self, tree: TokenTree | None, rows: int) -> float:
        if tree is None:
            return self.target(rows)
        drafting = sum(self.draft(rows * w) for w in draft_widths(tree))
        return self.target(rows * (tree.num_nodes + 1)) + drafting

    def rate(self, tree: TokenTree | None, rows: int) -> float:
        """Expected tokens per second of a batch of ``rows`` growing ``tree``."""
        length = 1.0 if tree is None else expected_length(tree, self.acceptance)
        return rows * length / self.step_time(tree, rows)

    def tree_for(self, rows: int) -> TokenTree | None:
        """The ladder's tree with the highest ``rate`` at ``rows`` rows (None: plain)."""
        options: list[TokenTree | None] = [*ladder(self.tree), None]
        return max(options, key=lambda tree: self.rate(tree, rows))


def probe_budget(
    tree: TokenTree,
    target: Runtime,
    draft: Runtime,
    *,
    acceptance: float = BudgetDefaults.acceptance,
    repeats: int = BudgetDefaults.repeats,
) -> TreeBudget:
    """A ``TreeBudget`` for ``tree`` from forwards measured on ``target`` and ``draft`` (at their
    batch sizes): 1, 2, 4, ... tokens per row up to the tree's ``N + 1`` (target) and its widest
    draft forward (draft)."""

    def counts(largest: int) -> tuple[int, ...]:
        return tuple(sorted({*(1 << i for i in range(largest.bit_length())), largest, 2}))

    return TreeBudget(
        tree,
        StepCost.probe(target, counts(tree.num_nodes + 1), repeats=repeats),
        StepCost.probe(draft, counts(max(draft_widths(tree))), repeats=repeats),
        acceptance,
    )
