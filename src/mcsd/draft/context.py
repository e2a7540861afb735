"""Context drafting: candidates copied from the tokens already seen, no model forward.

A ``SuffixIndex`` keeps, for every n-gram (n <= ``max_ngram``) of one growing token sequence,
the positions right after its occurrences; appending a token costs O(max_ngram), so the index
follows the prompt and the generated tokens without re-scanning them. Each step the proposer
matches the longest suffix of the committed tokens (ending with the pending token) in the live
index and, opt-in, in a ``RequestStore`` of earlier requests (an object the caller owns and
passes, e.g. one per server; ``mcsd.draft.proposer.Drafter`` reads it). The occurrences of
that suffix vote for what comes next: a node's children are the distinct tokens that followed
its path, most frequent first (at most ``max_children``), and the tree grows best first by the
share of occurrences that follow each path (SuffixDecoding's frequency score), within
``max_nodes`` and ``max_depth`` (``mcsd.config.ContextConfig``).

The candidates are deterministic (a function of the committed tokens), so a sampling target
verifies them with the one-hot rule (``topk``: accept c with the residual's p(c), else zero c
and renormalise) and a greedy one by argmax match. When nothing matches, the step proposes a
single node (the pending token repeated): a two-token target forward, verified like any other.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mcsd.config import ContextConfig
from mcsd.draft.base import Proposal
from mcsd.tree import ROOT, TokenTree

# An occurrence: a token sequence and the index in it of the first continuation token.
Occurrence = tuple[Sequence[int], int]


class SuffixIndex:
    """Positions after every n-gram (n = 1..``max_ngram``) of one growing token sequence."""

    def __init__(self, max_ngram: int, tokens: Sequence[int] = ()) -> None:
        self.max_ngram = max_ngram
        self.tokens: list[int] = []
        self._after: dict[tuple[int, ...], list[int]] = {}  # n-gram -> positions after it
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        """Append ``tokens``: O(max_ngram) per token."""
        for token in tokens:
            self.tokens.append(token)
            end = len(self.tokens)  # the position right after the n-grams ending here
            for n in range(1, min(self.max_ngram, end) + 1):
                self._after.setdefault(tuple(self.tokens[end - n :]), []).append(end)

    def occurrences(self, suffix: Sequence[int], n: int, limit: int) -> list[Occurrence]:
        """The ``limit`` most recent occurrences of the last ``n`` tokens of ``suffix`` that
        have a continuation, oldest first."""
        if n > len(suffix):
            return []
        after = self._after.get(tuple(suffix[len(suffix) - n :]), ())
        found: list[Occurrence] = []
        for position in reversed(after):
            if position < len(self.tokens):
                found.append((self.tokens, position))
                if len(found) == limit:
                    break
        return found[::-1]


class RequestStore:
    """Recent requests (prompt and output tokens), each indexed once, for context drafting
    across requests. Opt-in: the caller owns it (e.g. one per server) and passes it to every
    ``Drafter`` that may copy from it; it keeps the ``capacity`` most recent."""

    def __init__(self, capacity: int, max_ngram: int) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an integer >= 1, got {capacity!r}")
        self.capacity = capacity
        self.max_ngram = max_ngram
        self.indexes: list[SuffixIndex] = []

    def add(self, tokens: Sequence[int]) -> None:
        self.indexes.append(SuffixIndex(self.max_ngram, tokens))
        del self.indexes[: -self.capacity]


def match(
    indexes: Sequence[SuffixIndex], committed: Sequence[int], config: ContextConfig
) -> list[Occurrence]:
    """Occurrences of the longest suffix of ``committed`` (at most ``max_ngram`` tokens) found
    in any of ``indexes`` (earlier ones first, at most ``max_occurrences`` in all)."""
    for n in range(min(config.max_ngram, len(committed)), 0, -1):
        found: list[Occurrence] = []
        for index in indexes:
            found += index.occurrences(committed, n, config.max_occurrences - len(found))
            if len(found) == config.max_occurrences:
                break
        if found:
            return found
    return []


@dataclass(frozen=True)
class ContextTree:
    """A context proposal on the host: the tree and its node tokens."""

    tree: TokenTree
    tokens: tuple[int, ...]


def build_tree(occurrences: Sequence[Occurrence], config: ContextConfig) -> ContextTree | None:
    """Grow the tree of continuations best first (see the module docstring); None without
    occurrences."""
    # A candidate node: (-score, order, parent, depth, token, occurrences following its path).
    heap: list[tuple[float, int, int, int, int, list[Occurrence]]] = []
    order = 0

    def push_children(parent: int, depth: int, score: float, found: list[Occurrence]) -> None:
        nonlocal order
        groups: dict[int, list[Occurrence]] = {}
        for tokens, position in found:
            if position + depth - 1 < len(tokens):
                groups.setdefault(tokens[position + depth - 1], []).append((tokens, position))
        ranked = sorted(groups.items(), key=lambda item: (-len(item[1]), item[0]))
        for token, group in ranked[: config.max_children]:
            heapq.heappush(
                heap, (-score * len(group) / len(found), order, parent, depth, token, group)
            )
            order += 1

    push_children(ROOT, 1, 1.0, list(occurrences))
    picked: list[tuple[int, int, int, int]] = []  # (order, parent, depth, token), best first
    while heap and len(picked) < config.max_nodes:
        score, rank, parent, depth, token, group = heapq.heappop(heap)
        picked.append((rank, parent, depth, token))
        if depth < config.max_depth:
            push_children(len(picked) - 1, depth + 1, -score, group)
    if not picked:
        return None
    # BFS order: by depth, then by the parent's new index, then by sibling rank (push order).
    new_index: dict[int, int] = {ROOT: ROOT}  # index in ``picked`` -> node index
    parents: list[int] = []
    tokens: list[int] = []
    for depth in range(1, max(d for _, _, d, _ in picked) + 1):
        level = [i for i in range(len(picked)) if picked[i][2] == depth]
        level.sort(key=lambda i: (new_index[picked[i][1]], picked[i][0]))
        for i in level:
            new_index[i] = len(parents)
            parents.append(new_index[picked[i][1]])
            tokens.append(picked[i][3])
    return ContextTree(TokenTree(tuple(parents)), tuple(tokens))


def context_tree(
    index: SuffixIndex,
    committed: Sequence[int],
    config: ContextConfig,
    store: RequestStore | None = None,
) -> ContextTree | None:
    """A request's context tree for this step (``index``: its own tokens, which must follow
    ``committed``; ``store``: earlier requests, read only), or None when no suffix of
    ``committed`` occurred before."""
    assert len(index.tokens) == len(committed), "index out of step with the tokens"
    indexes = [index, *(store.indexes[::-1] if store is not None else ())]
    return build_tree(match(indexes, committed, config), config)


def context_proposal(
    found: ContextTree | None, committed: Sequence[int], device: torch.device
) -> Proposal:
    """The proposal of a context tree (every node deterministic); with nothing to copy, one
    cheap node (the pending token repeated), verified like any other."""
    if found is None:
        found = ContextTree(TokenTree((ROOT,)), (committed[-1],))
    tokens = torch.tensor(found.tokens, dtype=torch.long, device=device)  # [N]
    return Proposal(found.tree, tokens, None, (True,) * found.tree.num_nodes)
