"""Tree shapes under node budgets: which tree is best for a pair on this machine?

Running every shape on real prompts would take hours on a CPU, so greedy sweeps are simulated
exactly and only the winners are run:

1. ``reference outputs``: the target's greedy answer to each prompt (any lossless method gives it;
   a short chain is the fastest way to get it);
2. ``draft ranks``: one teacher-forced draft forward over prompt + answer gives, for every answer
   token, its rank among the draft's logits given the true prefix;
3. ``simulate``: with deterministic (top-k) drafting and greedy verification, a tree accepts
   child ``i`` of a node exactly when the next answer token has draft rank ``i``, so the accepted
   length of any tree on these answers follows from the ranks alone (up to bf16 near-ties between
   a tree forward and the teacher-forced chain forward);
4. ``costs``: predicted tokens/s = accepted length / the step time of ``mcsd.budget.PairCost``;
5. the best shapes by predicted tokens/s are then run for real (``mcsd.bench.tune`` runs it all).

Candidate shapes: every non-increasing k-config up to the largest budget, the optimiser's pick
for each budget (``mcsd.bench.optimise``: a dynamic program on the rank frequencies and the
measured costs), plus for each budget and depth limit the "top-B tree": the B nodes of highest
path probability when each sibling rank r is accepted with its observed frequency P(rank = r)
(the Sequoia / EAGLE-2 idea; the set of the B most probable paths is always a tree, because a
path is never more probable than its prefix).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from mcsd.bench.defaults import SweepDefaults
from mcsd.bench.optimise import tree_name
from mcsd.budget import PairCost
from mcsd.models.base import Runtime, score
from mcsd.tree import ROOT, TokenTree

MAX_DEPTH = SweepDefaults.max_depth


# ------------------------------------------------------------------------------ ranks


@torch.inference_mode()
def draft_ranks(
    draft: Runtime, prompt_ids: Sequence[int], answer: Sequence[int], vocab_size: int
) -> list[int]:
    """Rank (0 = the draft's top token) of each answer token among the draft's logits given the
    prompt and the answer before it: one teacher-forced forward."""
    if not answer:
        return []
    tokens = [*prompt_ids, *answer]
    logits = score(draft, tokens)  # [L, V]
    rows = logits[len(prompt_ids) - 1 : len(tokens) - 1, :vocab_size]  # [T, V]
    wanted = torch.tensor(answer, device=draft.device)[:, None]  # [T, 1]
    chosen = rows.gather(1, wanted)  # [T, 1]
    return (rows > chosen).sum(dim=1).tolist()


# ------------------------------------------------------------------------------ simulation


@dataclass(frozen=True)
class Simulated:
    steps: int  # verification steps
    tokens: int  # answer tokens they produce

    @property
    def mean_accepted_length(self) -> float:
        return self.tokens / self.steps if self.steps else 0.0


def simulate(tree: TokenTree, traces: Iterable[Sequence[int]]) -> Simulated:
    """Steps and tokens a greedy top-k tree needs to reproduce answers with these draft ranks.

    Each step starts at the next answer token and walks down: a node's i-th child (the draft's
    i-th best token) is accepted when the answer's next token has rank i; the step then adds the
    target's own token (correction or bonus)."""
    children = [tree.children(ROOT), *(tree.children(u) for u in range(tree.num_nodes))]
    steps = tokens = 0
    for ranks in traces:
        j, n = 0, len(ranks)
        while j < n:
            node, accepted = ROOT, 0
            while j + accepted < n - 1:  # the last token is always the step's own
                kids = children[node + 1]
                rank = ranks[j + accepted]
                if rank >= len(kids):
                    break
                node = kids[rank]
                accepted += 1
            steps += 1
            j += accepted + 1
        tokens += n
    return Simulated(steps=steps, tokens=tokens)


def rank_frequencies(traces: Iterable[Sequence[int]], width: int = 16) -> list[float]:
    """P(rank = r) over all answer tokens, r < width."""
    ranks = [r for trace in traces for r in trace]
    return [ranks.count(r) / len(ranks) if ranks else 0.0 for r in range(width)]


def top_paths_tree(frequencies: Sequence[float], budget: int, max_depth: int) -> TokenTree:
    """The ``budget`` most probable rank paths of depth <= ``max_depth`` when sibling rank r is
    accepted with probability ``frequencies[r]`` independently at every depth."""
    heap: list[tuple[float, tuple[int, ...]]] = [(-frequencies[0], (0,))]
    chosen: list[tuple[int, ...]] = []
    while heap and len(chosen) < budget:
        negative, path = heapq.heappop(heap)
        chosen.append(path)
        value = -negative
        rank = path[-1]
        if rank + 1 < len(frequencies) and frequencies[rank] > 0:  # next sibling
            sibling = (*path[:-1], rank + 1)
            heapq.heappush(heap, (-value / frequencies[rank] * frequencies[rank + 1], sibling))
        if len(path) < max_depth:  # first child
            heapq.heappush(heap, (-value * frequencies[0], (*path, 0)))
    return TokenTree.from_paths(chosen)


def k_configs(max_nodes: int, max_depth: int = MAX_DEPTH) -> list[tuple[int, ...]]:
    """Every non-increasing k-config with at most ``max_nodes`` nodes."""
    found = []

    def grow(prefix: tuple[int, ...], width: int, nodes: int) -> None:
        if prefix:
            found.append(prefix)
        if len(prefix) == max_depth:
            return
        top = prefix[-1] if prefix else max_nodes
        for k in range(1, top + 1):
            if nodes + width * k > max_nodes:
                break
            grow((*prefix, k), width * k, nodes + width * k)

    grow((), 1, 0)
    return found


def candidate_trees(
    traces: Sequence[Sequence[int]], budgets: Sequence[int], max_depth: int = MAX_DEPTH
) -> list[TokenTree]:
    """k-configs up to the largest budget and the top-path trees of every budget and depth."""
    frequencies = rank_frequencies(traces)
    trees = {TokenTree.from_config(k): None for k in k_configs(max(budgets), max_depth)}
    for budget in budgets:
        for depth in range(1, max_depth + 1):
            trees.setdefault(top_paths_tree(frequencies, budget, depth), None)
    return list(trees)


# ------------------------------------------------------------------------------ ranking


@dataclass(frozen=True, kw_only=True)
class Candidate:
    tree: TokenTree
    simulated: Simulated
    step_time: float  # predicted seconds per step

    @property
    def name(self) -> str:
        return tree_name(self.tree)

    @property
    def tokens_per_s(self) -> float:
        return self.simulated.mean_accepted_length / self.step_time if self.step_time else 0.0


def rank_candidates(
    trees: Iterable[TokenTree], traces: Sequence[Sequence[int]], costs: PairCost
) -> list[Candidate]:
    """Every tree simulated and costed (one row), best predicted tokens/s first."""
    candidates = [
        Candidate(tree=t, simulated=simulate(t, traces), step_time=costs.step_time(t))
        for t in trees
    ]
    return sorted(candidates, key=lambda c: -c.tokens_per_s)


def best_per_budget(
    candidates: Sequence[Candidate], budgets: Sequence[int]
) -> dict[int, dict[str, Candidate]]:
    """For each budget: the best candidate within it by accepted length and by tokens/s."""
    best = {}
    for budget in sorted(budgets):
        within = [c for c in candidates if c.tree.num_nodes <= budget]
        if within:
            best[budget] = {
                "by_accepted_length": max(
                    within, key=lambda c: (c.simulated.mean_accepted_length, -c.tree.num_nodes)
                ),
                "by_tokens_per_s": max(within, key=lambda c: c.tokens_per_s),
            }
    return best
