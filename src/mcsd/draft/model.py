"""Draft-model trees: a small LM grows a static token tree, one forward per tree level.

The draft runtime's committed cache holds a prefix of the committed tokens; the rest
(``uncached``: the pending token, sometimes after an accepted leaf the draft never ran) is run
first in each step. Then, level by level, every node of a depth that has children runs through
the draft in one forward with the tree mask over the pending block (the uncached tokens, then
the inner nodes of earlier levels, in BFS order: a node's *slot*), and its children are picked
from that node's q: sampled (iid or without replacement, as the rule needs) or, for
deterministic rules and greedy drafts, the draft's top-k. Committing keeps the uncached tokens
and the accepted nodes the draft ran; index tensors are built once, so a level issues no host
synchronisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mcsd.config import SamplingConfig, SpecConfig
from mcsd.draft.base import Proposal
from mcsd.models.base import Runtime, chain_mask, to_device
from mcsd.sampling import draw_children, warp
from mcsd.tree import TokenTree
from mcsd.verify.rules import Rule, get_rule


@dataclass(frozen=True)
class _Level:
    """What the proposer does at one tree depth; static for a given tree."""

    picks: tuple[tuple[Tensor, Tensor], ...]  # parents with k children: (rows [P], children [P, k])
    run: tuple[int, ...]  # nodes of this depth that have children: run through the draft
    run_index: Tensor  # [len(run)] long, the same nodes as a device tensor
    tree_mask: Tensor  # [len(run), inner nodes before + len(run)] bool, over the tree slots
    offsets: Tensor  # [len(run)] long, position of each run node relative to the root


class DraftModelProposer:
    """What every draft-model proposer shares (static trees here, dynamic ones in
    ``mcsd.draft.dynamic``): the draft's committed cache, the step's first forward over the
    uncached tokens, and the commit of the accepted nodes the draft ran (``slot``: node -> index
    of its entry in the pending block, after the uncached tokens)."""

    def __init__(self, draft: Runtime, sampling: SamplingConfig, *, vocab_size: int) -> None:
        self.draft = draft
        self.sampling = sampling
        self.vocab_size = vocab_size
        self.slot: dict[int, int] = {}
        self._uncached: list[int] = []

    @classmethod
    def for_spec(cls, draft: Runtime, spec: SpecConfig, vocab_size: int) -> DraftModelProposer:
        """The proposer ``spec`` asks for: its tree (static, or grown per step), its draft
        sampling, candidates drawn the way its rule needs."""
        rule: Rule = get_rule(spec.resolved_rule())
        dynamic = spec.dynamic
        if dynamic is not None:
            from mcsd.draft.dynamic import DynamicProposer

            return DynamicProposer(
                draft,
                dynamic,
                spec.draft_sampling,
                vocab_size=vocab_size,
                deterministic=rule.deterministic,
                return_q=rule.reads_q,
            )
        return ModelProposer(
            draft,
            spec.token_tree(),
            spec.draft_sampling,
            vocab_size=vocab_size,
            replacement=rule.replacement,
            deterministic=rule.deterministic,
            return_q=rule.reads_q,
        )

    @property
    def max_context(self) -> int | None:
        return self.draft.max_context

    def start(self, prompt_ids: Sequence[int]) -> None:
        self.draft.reset()
        prefix = list(prompt_ids[:-1])
        if prefix:
            device = self.draft.device
            ids = to_device([prefix], device)  # [1, T]
            positions = torch.arange(len(prefix), device=device)[None]  # [1, T]
            self.draft.forward(
                ids, positions, chain_mask(len(prefix), device=device), logits="none"
            )
            self.draft.commit()
        self._uncached = list(prompt_ids[-1:])

    def run_uncached(self, committed: Sequence[int]) -> tuple[Tensor, int, int]:
        """The step's first draft forward, over the uncached tokens: the logits after the
        pending token ``[V]`` (cut to the common vocabulary), the number of uncached tokens and
        the pending token's position."""
        draft, device = self.draft, self.draft.device
        uncached = self._uncached
        n = len(uncached)
        start = draft.cache_lengths()[0]
        pending = len(committed) - 1  # position of the pending token
        assert start + n == pending + 1, "draft cache out of step with the committed tokens"
        ids = to_device([[*uncached, *range(start, start + n)]], device)  # [1, 2n]
        logits = draft.forward(ids[:, :n], ids[:, n:], chain_mask(n, device=device), logits="last")
        return logits[0, -1, : self.vocab_size], n, pending

    def commit(self, accepted: Sequence[int], tokens: Sequence[int]) -> None:
        """Keep the uncached tokens and the accepted nodes the draft ran; the accepted tokens it
        has not run and the correction / bonus token are uncached for the next step."""
        kept = [a for a in accepted if a in self.slot]
        assert kept == list(accepted[: len(kept)]), "only the accepted leaf can be missing"
        n = len(self._uncached)
        self.draft.commit([[*range(n), *(n + self.slot[a] for a in kept)]])
        self._uncached = list(tokens[len(kept) :])


class ModelProposer(DraftModelProposer):
    """Grows ``tree`` with the ``draft`` runtime (see the module docstring).

    ``replacement`` / ``deterministic`` say how a node's children are picked (from the rule's
    record: ``Rule.replacement`` and ``Rule.deterministic``, or a greedy draft); ``return_q``
    whether the proposal carries q (the rule reads it)."""

    def __init__(
        self,
        draft: Runtime,
        tree: TokenTree,
        sampling: SamplingConfig,
        *,
        vocab_size: int,
        replacement: bool,
        deterministic: bool,
        return_q: bool,
    ) -> None:
        super().__init__(draft, sampling, vocab_size=vocab_size)
        self.tree = tree
        self.replacement = replacement
        self.deterministic = deterministic or sampling.greedy
        self.return_q = return_q
        device = draft.device
        ancestors = tree.ancestor_mask(device)  # [N, N]
        inner = [u for u in range(tree.num_nodes) if tree.children(u)]
        self.slot = {u: i for i, u in enumerate(inner)}  # node -> index among the inner nodes
        self.levels: list[_Level] = []
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
            self.levels.append(_Level(picks, run, run_index, mask, offsets))

    # ------------------------------------------------------------------ protocol
    @property
    def max_depth(self) -> int:
        return self.tree.max_depth

    def propose(self, committed: Sequence[int], generator: torch.Generator) -> Proposal:
        """Node tokens ``[N]`` and q ``[N+1, V]`` (row 0 the root, row u+1 node u; rows of nodes
        without children stay zero), or None for q when neither the picking nor the rule reads
        it (deterministic drafts under greedy / top-k verification)."""
        tree, draft, device = self.tree, self.draft, self.draft.device
        root_logits, n, pending = self.run_uncached(committed)
        need_q = not self.deterministic or self.return_q
        row_logits = torch.zeros(tree.num_nodes + 1, self.vocab_size, device=device)  # [N+1, V]
        row_logits[0] = root_logits
        q = torch.zeros_like(row_logits) if need_q else None  # [N+1, V]
        if q is not None:
            q[0] = warp(row_logits[0], self.sampling)
        node_tokens = torch.zeros(tree.num_nodes, dtype=torch.long, device=device)  # [N]
        seen_uncached = torch.ones(1, n, dtype=torch.bool, device=device)  # [1, n]
        for level in self.levels:
            for rows, children in level.picks:  # every parent of the level at once
                k = children.shape[1]
                if self.deterministic:
                    node_tokens[children] = torch.topk(row_logits[rows], k, dim=-1).indices
                else:
                    assert q is not None
                    node_tokens[children] = draw_children(
                        q[rows], k, replacement=self.replacement, generator=generator
                    )  # [P, k]
            if not level.run:
                continue
            r = len(level.run)
            mask = torch.cat([seen_uncached.expand(r, n), level.tree_mask], dim=1)  # [r, P + r]
            rows = level.run_index + 1
            out = draft.forward(
                node_tokens[level.run_index][None], (pending + level.offsets)[None], mask
            )
            row_logits[rows] = out[0, :, : self.vocab_size]
            if q is not None:
                q[rows] = warp(row_logits[rows], self.sampling)
        return Proposal(tree, node_tokens, q if self.return_q else None)
