"""Step costs, expected lengths, and speculation that adapts to load: the tree a row grows
shrinks as the batch grows.

A tree that is free at batch 1 (a forward of 1 + N tokens costs what a forward of one token
costs: the weights' bytes dominate) is not free at batch 16 (16 x (1 + N) tokens are compute).
The one step-cost model (the budget, ``mcsd tune``'s sweep and the optimiser use it):
``StepCost`` interpolates a runtime's measured forward time of ``T`` tokens in all (rows x
tokens per row; ``StepCost.probe``, the one probe, times a few), and ``PairCost`` prices a step
of ``B`` rows growing an ``N``-node tree:

    (1 + o) (target(B (N + 1)) + draft(B u) + sum over levels draft(B r_l)) + f

with ``u`` the tokens per row the draft runs first (the pending one, and those of plain steps
it skipped), ``r_l`` the nodes of level l that have children, and a speculative step's work
outside its forwards (verification, sampling, commits) as a fraction ``o`` of them
(``BudgetDefaults.overhead``) or in seconds ``f`` (``mcsd tune`` measures it). Plain decoding
is ``target(B)``.

One acceptance model (``expected_length``): a node of depth d and sibling rank r is accepted
with probability ``acceptance[d-1][r]`` once its parent was, and a step commits ``AL = 1 +
sum over nodes of P(path accepted)`` tokens (the 1: the correction or bonus). The optimiser and
``mcsd tune`` measure the whole table offline from thousands of draft ranks (a top-k draft's
are far from geometric); the budget learns from the few steps run so far, so it fits the
one-parameter family ``(1 - a)^r a``: siblings tried in order, each accepted with probability
``a`` once the earlier ones were rejected.

``TreeBudget`` picks, for a batch of ``B`` speculating rows, the tree of a ladder (the
configured tree, the user's or ``mcsd tune``'s, and its breadth-first prefixes, halving in size,
down to plain decoding) with the most expected tokens per second at ``a`` (a prior,
``DEFAULT_ACCEPTANCE``). The choice changes which tree is verified, never how: every tree is
verified losslessly, so the output distribution is the target's whatever the budget picks.

``AdaptiveTree`` (one per engine, the only mutable piece) learns ``a`` online. Under the
sibling model every candidate the verification visits is one Bernoulli(``a``) trial: on the
accepted path each depth tried the accepted node's earlier siblings (rejected) and the node
itself (accepted), and where the path ends at a node with children all of them were rejected
(a correction; at a leaf nothing was tried: a bonus). ``acceptance_events`` counts these exactly
from a step's sibling ranks, and the estimate is accepted / tried over exponentially weighted
counts (``BudgetDefaults.weight``) that start from the prior as ``prior_trials`` pseudo-trials:
the maximum-likelihood ``a`` of the recent steps. When the best choice is plain decoding, every
``reprobe`` plain steps one step grows the ladder's smallest tree, so the estimate still sees
the acceptance change. A re-probe also runs the draft over the ``reprobe`` tokens it skipped
(the draft must see every token to draft after them): on llama.cpp's CPU kernels that forward
costs several target steps, so re-probes are skipped when even ``a = 1`` would not make the
re-probe step beat a plain one (``TreeBudget.reprobe_pays``): the measured costs alone then rule
speculation out, and the draft is never run again.

Why the choice stays lossless: the tree of a step is chosen (``AdaptiveTree.choose``) before the
step draws anything, from the measured costs (fixed after the probe) and the ranks of earlier
steps only; ``choose`` is given a row count and nothing else, so it cannot see this step's draft
candidates, target logits or random numbers. Given everything before the step, each emitted
token is the target's conditional whatever fixed tree verifies it, so a choice that is a
function of the past leaves the sequence distribution the target's (a controller that peeked at
this step's draft, e.g. speculating only when the first candidate is the target's argmax, would
not be: tests/test_budget.py shows the difference). Seeded output is reproducible for a given
cost model: the same costs and the same past give the same choices.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import KW_ONLY, dataclass
from functools import cache, lru_cache

import torch

from mcsd.config import EXPECTED_LENGTH_CACHE, BudgetDefaults
from mcsd.models.base import Runtime, chain_mask, rows_forward
from mcsd.tree import ROOT, TokenTree


@dataclass(frozen=True)
class StepCost:
    """Seconds per forward of one runtime of ``tokens[i]`` tokens in all (``seconds[i]``),
    increasing tokens; linear between the points, and beyond the last one at the last segment's
    slope."""

    tokens: tuple[int, ...]
    seconds: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.tokens) < 2 or len(self.tokens) != len(self.seconds):
            raise ValueError("StepCost needs at least two (tokens, seconds) points of each")
        if list(self.tokens) != sorted(set(self.tokens)) or self.tokens[0] < 1:
            raise ValueError(f"tokens must be increasing counts >= 1, got {self.tokens}")
        if any(not (s >= 0 and math.isfinite(s)) for s in self.seconds):
            raise ValueError(f"seconds must be finite and >= 0, got {self.seconds}")

    def __call__(self, tokens: int) -> float:
        xs, ys = self.tokens, self.seconds
        i = min(max(bisect.bisect_left(xs, tokens), 1), len(xs) - 1)
        slope = (ys[i] - ys[i - 1]) / (xs[i] - xs[i - 1])
        return max(ys[i - 1] + slope * (tokens - xs[i - 1]), min(ys))

    def describe(self) -> str:
        pairs = zip(self.tokens, self.seconds, strict=True)
        return ", ".join(f"{t} tok {1e3 * s:.1f} ms" for t, s in pairs)

    @classmethod
    @torch.inference_mode()
    def probe(
        cls,
        runtime: Runtime,
        per_row: Sequence[int],
        *,
        context: Sequence[int] = (),
        repeats: int = BudgetDefaults.repeats,
    ) -> StepCost:
        """Time forwards of ``per_row`` new tokens in every row of ``runtime`` (points at
        ``rows x n`` tokens in all) after ``context`` (token ids, committed in every row first;
        none: an empty cache), the median of ``repeats`` after one warm-up each; on a runtime
        that computes only the rows it is given (``computed_rows``) also forwards of one row,
        for the totals below those (fewer busy rows than the batch holds). Empties the
        runtime."""
        rows, device, c = runtime.batch_size, runtime.device, len(context)
        synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda device: None
        runtime.reset()
        if c:
            ids = torch.tensor([list(context)] * rows, device=device)  # [rows, c]
            positions = torch.arange(c, device=device).expand(rows, c)  # [rows, c]
            runtime.forward(ids, positions, chain_mask(c, device=device))
            runtime.commit()

        def median_time(timed: list[int], n: int) -> float:
            ids = torch.zeros(len(timed), n, dtype=torch.long, device=device)  # [R, n] any token
            positions = torch.arange(c, c + n, device=device).expand(len(timed), n)  # [R, n]
            mask = chain_mask(n, device=device)  # [n, n]: nothing pending
            times = []
            for _ in range(repeats + 1):
                synchronize(device)
                started = time.perf_counter()
                rows_forward(runtime, timed, ids, positions, mask, logits="all")
                synchronize(device)
                times.append(time.perf_counter() - started)
                runtime.commit([[]] * rows)  # drop the timed tokens
            return sorted(times[1:])[len(times[1:]) // 2]

        points = {rows * n: median_time(list(range(rows)), n) for n in per_row}
        if rows > 1 and runtime.computed_rows([0]) == 1:
            for n in per_row:
                if n < rows * min(per_row):
                    points[n] = median_time([0], n)
        runtime.reset()
        measured = sorted(points)
        return cls(tokens=tuple(measured), seconds=tuple(points[t] for t in measured))


@dataclass(frozen=True, kw_only=True)
class PairCost:
    """Seconds of one step of a target and a draft (``step_time``; the module docstring)."""

    target: StepCost
    draft: StepCost
    # a speculative step's work outside its forwards, as a fraction of them (BudgetDefaults)
    overhead: float = BudgetDefaults.overhead
    fixed: float = 0.0  # the same in seconds per speculative step (mcsd tune measures it)

    def __post_init__(self) -> None:
        for name in ("overhead", "fixed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (value >= 0.0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")

    def step_time(self, tree: TokenTree | None, rows: int = 1, uncached: int = 1) -> float:
        """Seconds of one step of ``rows`` rows growing ``tree`` (None: plain decoding);
        ``uncached``: tokens per row the draft runs first."""
        if tree is None:
            return self.target(rows)
        _, *levels = draft_widths(tree)
        drafting = sum(self.draft(rows * w) for w in (uncached, *levels))
        forwards = self.target(rows * (tree.num_nodes + 1)) + drafting
        return (1.0 + self.overhead) * forwards + self.fixed


def computed_rows(runtime: Runtime, rows: Sequence[int]) -> int:
    """The rows a forward of ``rows`` (runtime row indices) computes, what the budget is asked
    for: the runtime's ``computed_rows`` (every row where the others run as padding, a row
    bucket on hf, hf-static and fast, just those rows on llama.cpp)."""
    return runtime.computed_rows(rows)


def expected_length(tree: TokenTree, acceptance: float | Sequence[Sequence[float]]) -> float:
    """Expected tokens a step of ``tree`` commits (accepted nodes + the correction / bonus) when
    a node of depth d and sibling rank r is accepted with probability ``acceptance[d-1][r]``
    once its parent was (a rank or depth beyond the table: never), or ``(1 - a)^r a`` for a
    number ``a`` (see the module docstring)."""
    if not isinstance(acceptance, int | float):
        acceptance = tuple(tuple(float(a) for a in row) for row in acceptance)
    return _expected_length(tree, acceptance)


@lru_cache(maxsize=EXPECTED_LENGTH_CACHE)  # bounded: an online estimate is a new key per step
def _expected_length(tree: TokenTree, acceptance: float | tuple[tuple[float, ...], ...]) -> float:
    reach = [0.0] * tree.num_nodes  # P(path to node u accepted)
    for u, parent in enumerate(tree.parents):
        d, r = tree.depth[u], tree.rank[u]
        if isinstance(acceptance, tuple):
            a = acceptance[d - 1][r] if d <= len(acceptance) and r < len(acceptance[d - 1]) else 0.0
        else:
            a = (1.0 - acceptance) ** r * acceptance
        reach[u] = a * (1.0 if parent == ROOT else reach[parent])
    return 1.0 + sum(reach)


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
    """The tree for a batch of ``B`` speculating rows (``tree_for``), from the pair's step
    ``costs`` (see the module docstring). ``None`` is plain decoding. ``acceptance`` is the
    prior; ``prior_trials``, ``weight`` and ``reprobe`` configure the online estimate of an
    ``AdaptiveTree`` (``BudgetDefaults``)."""

    tree: TokenTree  # the configured tree: the largest one a row grows
    _: KW_ONLY
    costs: PairCost
    acceptance: float = BudgetDefaults.acceptance
    prior_trials: float = BudgetDefaults.prior_trials
    weight: float = BudgetDefaults.weight
    reprobe: int = BudgetDefaults.reprobe

    def __post_init__(self) -> None:
        if not 0.0 <= self.acceptance <= 1.0:
            raise ValueError(f"acceptance must be in [0, 1], got {self.acceptance!r}")
        if isinstance(self.prior_trials, bool) or not self.prior_trials > 0:
            raise ValueError(f"prior_trials must be a number > 0, got {self.prior_trials!r}")
        if isinstance(self.weight, bool) or not 0.0 < self.weight <= 1.0:
            raise ValueError(f"weight must be in (0, 1], got {self.weight!r}")
        if isinstance(self.reprobe, bool) or not isinstance(self.reprobe, int) or self.reprobe < 1:
            raise ValueError(f"reprobe must be an integer >= 1, got {self.reprobe!r}")

    def reprobe_pays(self, rows: int) -> bool:
        """Whether a re-probe after ``reprobe`` plain steps (the smallest tree, the draft
        catching up on the tokens it skipped) would beat a plain step if every candidate were
        accepted: if not, no acceptance can make re-probing worth it."""
        smallest = ladder(self.tree)[-1]
        step = self.costs.step_time(smallest, rows, self.reprobe + 1)
        return rows * expected_length(smallest, 1.0) / step > self.rate(None, rows)

    def rate(self, tree: TokenTree | None, rows: int, acceptance: float | None = None) -> float:
        """Expected tokens per second of a batch of ``rows`` growing ``tree`` when a candidate
        is accepted with probability ``acceptance`` (default: the prior)."""
        a = self.acceptance if acceptance is None else acceptance
        length = 1.0 if tree is None else expected_length(tree, a)
        return rows * length / self.costs.step_time(tree, rows)

    def tree_for(self, rows: int, acceptance: float | None = None) -> TokenTree | None:
        """The ladder's tree with the highest ``rate`` at ``rows`` rows (None: plain)."""
        options: list[TokenTree | None] = [*ladder(self.tree), None]
        return max(options, key=lambda tree: self.rate(tree, rows, acceptance))

    def describe(self, rows: int) -> str:
        """One log line: the measured costs and what they imply at ``rows`` rows."""

        def name(tree: TokenTree | None) -> str:
            return "plain decoding" if tree is None else f"tree {tree.describe()}"

        plain = "once plain, stays plain (a re-probe never pays)"
        if self.reprobe_pays(rows):
            plain = f"re-probes every {self.reprobe} plain steps"
        target, draft = self.costs.target.describe(), self.costs.draft.describe()
        return (
            f"measured step cost: target {target}; draft {draft}; at the prior acceptance "
            f"{self.acceptance:.2f}: {name(self.tree_for(rows))}, at acceptance 1: "
            f"{name(self.tree_for(rows, 1.0))}; {plain}"
        )


def acceptance_events(tree: TokenTree, ranks: Sequence[int]) -> tuple[int, int]:
    """``(accepted, tried)`` candidates of one verification of ``tree`` whose accepted path has
    sibling ``ranks`` (see the module docstring): each depth tried ``rank + 1`` candidates and
    accepted one; below the path's last node all its children were tried and rejected."""
    node, tried = ROOT, 0
    for rank in ranks:
        tried += rank + 1
        node = tree.children(node)[rank]
    return len(ranks), tried + len(tree.children(node))


class AcceptanceEstimate:
    """The per-candidate acceptance rate from exponentially weighted accept / trial counts,
    starting from a prior worth ``prior_trials`` trials (see the module docstring)."""

    def __init__(self, prior: float, prior_trials: float, weight: float) -> None:
        self.accepted, self.tried = prior * prior_trials, prior_trials
        self.weight = weight

    @property
    def value(self) -> float:
        return self.accepted / self.tried

    def add(self, accepted: int, tried: int) -> None:
        """One step's events (every row of it): the past decays by ``1 - weight`` first."""
        keep = 1.0 - self.weight
        self.accepted = keep * self.accepted + accepted
        self.tried = keep * self.tried + tried


class AdaptiveTree:
    """An engine's tree choice under ``budget``: the acceptance estimate it learns from the
    steps it ran, and the count of plain steps since the last speculative one (re-probes; see
    the module docstring). ``choose`` before a step, ``observe`` after it."""

    def __init__(self, budget: TreeBudget) -> None:
        self.budget = budget
        self.estimate = AcceptanceEstimate(budget.acceptance, budget.prior_trials, budget.weight)
        self.plain_run = 0  # plain steps since the last speculative one

    def choose(self, rows: int) -> TokenTree | None:
        """This step's tree for ``rows`` computed rows (None: plain decoding)."""
        budget = self.budget
        best = budget.tree_for(rows, self.estimate.value)
        if best is not None:
            self.plain_run = 0
            return best
        if self.plain_run >= budget.reprobe and budget.reprobe_pays(rows):
            self.plain_run = 0
            return ladder(budget.tree)[-1]
        self.plain_run += 1
        return None

    def observe(self, tree: TokenTree, ranks: Iterable[Sequence[int]]) -> None:
        """A speculative step of ``tree``: the accepted paths' sibling ranks, one per row."""
        accepted = tried = 0
        for row_ranks in ranks:
            a, t = acceptance_events(tree, row_ranks)
            accepted, tried = accepted + a, tried + t
        self.estimate.add(accepted, tried)


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

    costs = PairCost(
        target=StepCost.probe(target, counts(tree.num_nodes + 1), repeats=repeats),
        draft=StepCost.probe(draft, counts(max(draft_widths(tree))), repeats=repeats),
    )
    return TreeBudget(tree, costs=costs, acceptance=acceptance)
