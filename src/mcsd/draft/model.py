"""The draft model's side of a step, for any set of rows: its cache per row, the step's first
forward, static trees grown level by level, and the commit of the accepted nodes it ran.

The draft runtime's committed cache of a row holds a prefix of the request's committed tokens;
the rest (``DraftCursor.uncached``: the pending token, sometimes after an accepted leaf the
draft never ran, or tokens of plain steps) is read first in each step, every drafted row in one
forward, left-padded to one length (padding sees only itself). Then each tree grows in the
pending block after it: the rows growing the same static tree share one forward per level (every
node of a depth that has children, with the tree mask over the row's uncached tokens and the
inner nodes of earlier levels); a dynamic tree (``mcsd.draft.dynamic``) runs forwards of its own
row. Each row records where its entries sit in the block (``DraftCursor.entries``), so the
commit keeps its uncached tokens and the accepted nodes the draft ran, whatever ran beside it.

A node's children are picked from its q (the draft's warped logits, under each request's own
draft sampling): the draft's top-k for deterministic candidates, else drawn with or without
replacement (``mcsd.plan.Candidates``), each request from its own generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mcsd.config import DRAFT_CATCH_UP_TOKENS
from mcsd.draft.base import Proposal
from mcsd.models.base import Runtime, chain_mask, keep_rows, reset_row, rows_forward, to_device
from mcsd.request import Request
from mcsd.sampling import SamplingConfig, draw_children, warp
from mcsd.tree import TokenTree


@dataclass
class DraftCursor:
    """One request's draft-model state."""

    uncached: list[int]  # committed tokens the draft has not cached; the last one is pending
    block: tuple[int, int] = (0, 0)  # this step: the pending entries of its uncached tokens
    entries: dict[int, int] = field(default_factory=dict)  # this step: node -> pending entry


@dataclass(frozen=True)
class _Level:
    """What drafting does at one depth of a static tree."""

    picks: tuple[tuple[Tensor, Tensor], ...]  # parents with k children: (rows [P], children [P, k])
    run: tuple[int, ...]  # nodes of this depth that have children: run through the draft
    run_index: Tensor  # [len(run)] long, the same nodes as a device tensor
    tree_mask: Tensor  # [len(run), inner nodes before + len(run)] bool, over the tree's entries
    offsets: Tensor  # [len(run)] long, position of each run node relative to the root


@dataclass(frozen=True)
class _TreePlan:
    """A static tree's drafting work: the inner nodes' entries and the levels."""

    slot: dict[int, int]  # inner node -> its index among the inner nodes (entry after the start)
    levels: tuple[_Level, ...]


@dataclass(frozen=True)
class Uncached:
    """The step's first draft forward: every drafted row's logits after its pending token."""

    logits: Tensor  # [b, V] float32, cut to the common vocabulary
    seen: Tensor  # [b, n] bool: the row's uncached entries (False: its left padding)


class DraftRows:
    """The draft runtime's rows (see the module docstring)."""

    def __init__(self, draft: Runtime, vocab_size: int) -> None:
        self.draft = draft
        self.vocab_size = vocab_size
        self._plans: dict[TokenTree, _TreePlan] = {}

    @property
    def device(self) -> torch.device:
        return self.draft.device

    def start(self, request: Request) -> DraftCursor:
        """A new request in its row: the prompt is uncached, read when the row is first drafted
        for (``catch_up``), so a request an adaptive budget decodes plainly never costs the
        draft a forward."""
        assert request.row is not None
        reset_row(self.draft, request.row)
        return DraftCursor(list(request.committed))

    def remove(self, row: int) -> None:
        reset_row(self.draft, row)

    # ------------------------------------------------------------------ the first forward
    def catch_up(self, requests: Sequence[Request]) -> None:
        """Every request with more than ``DRAFT_CATCH_UP_TOKENS`` uncached tokens reads all but
        the pending one in a forward of its own (logits none), so the step's first forward stays
        a few tokens for every row."""
        device = self.device
        for request in requests:
            cursor, row = request.cursor.draft, request.row
            prefix = cursor.uncached[:-1]
            if len(prefix) < DRAFT_CATCH_UP_TOKENS:
                continue
            start = self.draft.cache_lengths()[row]
            ids = to_device([prefix], device)  # [1, T]
            positions = torch.arange(start, start + len(prefix), device=device)[None]  # [1, T]
            mask = chain_mask(len(prefix), device=device)
            rows_forward(self.draft, [row], ids, positions, mask, logits="none")
            self.draft.commit(keep_rows(self.draft.batch_size, {row: list(range(len(prefix)))}))
            cursor.uncached = cursor.uncached[-1:]

    def read_uncached(self, requests: Sequence[Request]) -> Uncached:
        """The step's first forward, over every request's uncached tokens (rows in increasing
        order): the logits after each pending token."""
        self.catch_up(requests)
        draft, device = self.draft, self.device
        rows = [r.row for r in requests]
        uncached = [r.cursor.draft.uncached for r in requests]
        n = max(map(len, uncached))
        lengths = draft.cache_lengths()
        for request, tokens in zip(requests, uncached, strict=True):
            pending = len(request.committed) - 1
            assert lengths[request.row] + len(tokens) == pending + 1, "draft cache out of step"
        pads = [n - len(tokens) for tokens in uncached]
        ids = to_device(
            [
                [*[0] * pad, *tokens, *[lengths[row]] * pad, *range(lengths[row], len(r.committed))]
                for r, row, tokens, pad in zip(requests, rows, uncached, pads, strict=True)
            ],
            device,
        )  # [b, 2n]
        seen = to_device([[0] * pad + [1] * (n - pad) for pad in pads], device).bool()  # [b, n]
        if any(pads):  # [b, n, n]: real tokens a chain after the padding, padding only itself
            mask = chain_mask(n, device=device) & seen[:, None, :]
            mask |= torch.eye(n, dtype=torch.bool, device=device)
        else:
            mask = chain_mask(n, device=device)  # [n, n]
        assert draft.pending_length == 0, "the draft's pending block starts each step empty"
        logits = self.forward(rows, ids[:, :n], ids[:, n:], mask, logits="last")  # [b, 1, V]
        for request, pad in zip(requests, pads, strict=True):
            request.cursor.draft.block = (pad, n)
            request.cursor.draft.entries = {}
        return Uncached(logits[:, -1], seen)

    def forward(
        self,
        rows: Sequence[int],
        tokens: Tensor,  # [b, r] long
        positions: Tensor,  # [b, r] long
        mask: Tensor,  # [r, P + r] or [b, r, P + r] bool
        *,
        logits: str = "all",
    ) -> Tensor:
        """A draft forward of ``rows``: logits ``[b, r, V]`` of those rows, in their order."""
        out = rows_forward(self.draft, rows, tokens, positions, mask, logits=logits)
        if len(rows) < self.draft.batch_size:
            out = out[to_device(list(rows), self.device)]
        return out[..., : self.vocab_size]

    def seen_columns(self, requests: Sequence[Request], seen: Tensor, width: int) -> Tensor:
        """``[b, width]`` bool: each request's uncached entries among the first ``width``
        pending entries (what every node of its tree sees)."""
        columns = torch.zeros(len(requests), width, dtype=torch.bool, device=self.device)
        columns[:, : seen.shape[1]] = seen
        return columns

    # ------------------------------------------------------------------ static trees
    def static_tree(
        self,
        requests: Sequence[Request],
        tree: TokenTree,
        first: Uncached,
    ) -> list[Proposal]:
        """Grow ``tree`` for ``requests`` (rows in increasing order; ``first``: their rows of the
        step's first forward), one forward per level for all of them. Per request: node tokens
        ``[N]`` and q ``[N+1, V]`` (row 0 the root, row u+1 node u; rows of nodes without
        children stay zero), or None when neither the picking nor the rule reads it."""
        draft, device, plan = self.draft, self.device, self._plan(tree)
        b, rows = len(requests), [r.row for r in requests]
        start = draft.pending_length  # the tree's entries follow: start + slot[node]
        schemes = [r.plan.candidates for r in requests]
        picked_by_top = [s.deterministic for s in schemes]
        # requests whose q is computed, by draft sampling: one warp per sampling a level
        warped = _by_sampling(
            [r.plan.draft for r in requests],
            [not s.deterministic or s.return_q for s in schemes],
            device,
        )
        row_logits = torch.zeros(b, tree.num_nodes + 1, self.vocab_size, device=device)
        row_logits[:, 0] = first.logits  # [b, N+1, V]
        q = torch.zeros_like(row_logits) if warped else None  # [b, N+1, V]
        _warp_into(q, row_logits, warped, slice(0, 1))
        node_tokens = torch.zeros(b, tree.num_nodes, dtype=torch.long, device=device)  # [b, N]
        starts = to_device([len(r.committed) - 1 for r in requests], device)[:, None]  # [b, 1]
        top = to_device([i for i, t in enumerate(picked_by_top) if t], device)
        for level in plan.levels:
            for parents, children in level.picks:  # every parent of the level at once
                k = children.shape[1]
                if all(picked_by_top):
                    node_tokens[:, children] = torch.topk(row_logits[:, parents], k, dim=-1).indices
                elif any(picked_by_top):
                    chosen = torch.topk(row_logits[top][:, parents], k, dim=-1).indices
                    node_tokens[top[:, None, None], children[None]] = chosen  # [d, P, k]
                for i, request in enumerate(requests):  # each row its own randomness
                    if picked_by_top[i]:
                        continue
                    assert q is not None
                    node_tokens[i, children] = draw_children(
                        q[i, parents],
                        k,
                        replacement=schemes[i].replacement,
                        generator=request.generator,
                    )  # [P, k]
            if not level.run:
                continue
            r = len(level.run)
            width = draft.pending_length
            mask = torch.cat(
                [
                    self.seen_columns(requests, first.seen, start)[:, None, :].expand(b, r, start),
                    level.tree_mask.expand(b, -1, -1),
                ],
                dim=2,
            )  # [b, r, P + r]
            assert mask.shape[2] == width + r, "a static tree's levels run back to back"
            out = self.forward(rows, node_tokens[:, level.run_index], starts + level.offsets, mask)
            nodes = level.run_index + 1
            row_logits[:, nodes] = out
            _warp_into(q, row_logits, warped, nodes)
        entries = {u: start + s for u, s in plan.slot.items()}
        proposals = []
        for i, request in enumerate(requests):
            request.cursor.draft.entries = entries
            row_q = q[i] if schemes[i].return_q and q is not None else None
            proposals.append(Proposal(tree, node_tokens[i], row_q))
        return proposals

    def _plan(self, tree: TokenTree) -> _TreePlan:
        """The static per-level work for ``tree`` (built once per tree)."""
        if tree in self._plans:
            return self._plans[tree]
        device = self.device
        ancestors = tree.ancestor_mask(device)  # [N, N]
        inner = [u for u in range(tree.num_nodes) if tree.children(u)]
        slot = {u: i for i, u in enumerate(inner)}  # node -> index among the inner nodes
        levels: list[_Level] = []
        for level in tree.levels:
            parents = list(dict.fromkeys(tree.parents[u] for u in level))
            run = tuple(u for u in level if tree.children(u))
            before = [u for u in inner if u < level.start]
            mask = torch.cat(
                [
                    ancestors[list(run)][:, before],
                    torch.eye(len(run), dtype=torch.bool, device=device),
                ],
                dim=1,
            )
            offsets = torch.tensor([tree.depth[u] for u in run], device=device)
            by_k: dict[int, list[int]] = {}
            for parent in parents:
                by_k.setdefault(len(tree.children(parent)), []).append(parent)
            picks = tuple(
                (
                    torch.tensor([parent + 1 for parent in same], device=device),
                    torch.tensor([tree.children(parent) for parent in same], device=device),
                )
                for same in by_k.values()
            )
            run_index = torch.tensor(run, dtype=torch.long, device=device)
            levels.append(_Level(picks, run, run_index, mask, offsets))
        self._plans[tree] = _TreePlan(slot, tuple(levels))
        return self._plans[tree]

    # ------------------------------------------------------------------ commits
    def commit(
        self,
        requests: Sequence[Request],
        accepted: Sequence[Sequence[int]],
        tokens: Sequence[Sequence[int]],
    ) -> None:
        """Per request drafted this step: keep its uncached entries and the accepted nodes the
        draft ran (``accepted``: nodes of the tree the draft grew); the step's committed
        ``tokens`` it has not run (the accepted leaf it never ran, the correction / bonus token)
        become its uncached tokens."""
        keep = {}
        for request, nodes, committed in zip(requests, accepted, tokens, strict=True):
            cursor = request.cursor.draft
            kept = [a for a in nodes if a in cursor.entries]
            assert kept == list(nodes[: len(kept)]), "only the accepted leaf can be missing"
            keep[request.row] = [*range(*cursor.block), *(cursor.entries[a] for a in kept)]
            cursor.uncached = list(committed[len(kept) :])
            cursor.entries = {}
        self.draft.commit(keep_rows(self.draft.batch_size, keep))


def _by_sampling(
    samplings: Sequence[SamplingConfig], needed: Sequence[bool], device: torch.device
) -> list[tuple[SamplingConfig, Tensor | None]]:
    """The rows whose q is needed, grouped by draft sampling: ``(sampling, rows)`` with
    ``rows`` None when the group is every row (plain slicing then)."""
    groups: dict[SamplingConfig, list[int]] = {}
    for i, (sampling, need) in enumerate(zip(samplings, needed, strict=True)):
        if need:
            groups.setdefault(sampling, []).append(i)
    everyone = len(samplings)
    return [
        (sampling, None if len(rows) == everyone else to_device(rows, device))
        for sampling, rows in groups.items()
    ]


def _warp_into(
    q: Tensor | None,  # [b, N+1, V]
    row_logits: Tensor,  # [b, N+1, V]
    warped: list[tuple[SamplingConfig, Tensor | None]],
    nodes: Tensor | slice,  # the q rows to fill
) -> None:
    """``q[rows, nodes] = warp(row_logits[rows, nodes])`` for each sampling group."""
    for sampling, rows in warped:
        assert q is not None
        if rows is None:
            q[:, nodes] = warp(row_logits[:, nodes], sampling)
        elif isinstance(nodes, slice):
            q[rows, nodes] = warp(row_logits[rows, nodes], sampling)
        else:
            q[rows[:, None], nodes[None]] = warp(row_logits[rows[:, None], nodes[None]], sampling)
