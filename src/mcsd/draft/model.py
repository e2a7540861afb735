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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mcsd.config import DRAFT_CATCH_UP_TOKENS, SamplingConfig, SpecConfig
from mcsd.draft.base import Proposal, RowStep
from mcsd.models.base import Runtime, chain_mask, keep_rows, reset_row, rows_forward, to_device
from mcsd.sampling import draw_children, warp
from mcsd.tree import TokenTree
from mcsd.verify.rules import Rule, get_rule


@dataclass(frozen=True)
class _Plan:
    """A tree's drafting work: the inner nodes' slots and the levels."""

    slot: dict[int, int]  # inner node -> its index among the inner nodes (its draft entry)
    levels: list[_Level]


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
    ``mcsd.draft.dynamic``): the draft's committed cache per row (``start_row`` reads a prompt
    into it), the step's first forward over the uncached tokens, and the commit of the accepted
    nodes the draft ran (``slot``: node -> index of its entry in the pending block, after the
    uncached tokens). ``run_uncached`` and ``commit`` work on row 0 (one-row proposers; the
    ``ModelProposer`` drafts for several rows at once)."""

    def __init__(self, draft: Runtime, sampling: SamplingConfig, *, vocab_size: int) -> None:
        self.draft = draft
        self.sampling = sampling
        self.vocab_size = vocab_size
        self.slot: dict[int, int] = {}
        self._uncached: dict[int, list[int]] = {}  # per row

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
        self.start_row(0, prompt_ids)

    def start_row(self, row: int, prompt_ids: Sequence[int]) -> None:
        """A new sequence in ``row``: its prompt is uncached, read when the row is first drafted
        for (``catch_up``), so a row that never speculates (an adaptive budget decoding
        plainly) never costs the draft a forward."""
        reset_row(self.draft, row)
        self._uncached[row] = list(prompt_ids)

    def catch_up(self, rows: Sequence[int]) -> None:
        """Before a step's draft forward: every row of ``rows`` with more than
        ``DRAFT_CATCH_UP_TOKENS`` uncached tokens reads all but the pending one in a forward of
        its own (logits none), so the step's first forward stays a few tokens for every row."""
        device = self.draft.device
        for row in rows:
            prefix = self._uncached[row][:-1]
            if len(prefix) < DRAFT_CATCH_UP_TOKENS:
                continue
            start = self.draft.cache_lengths()[row]
            ids = to_device([prefix], device)  # [1, T]
            positions = torch.arange(start, start + len(prefix), device=device)[None]  # [1, T]
            mask = chain_mask(len(prefix), device=device)
            rows_forward(self.draft, [row], ids, positions, mask, logits="none")
            self.draft.commit(keep_rows(self.draft.batch_size, {row: list(range(len(prefix)))}))
            self._uncached[row] = self._uncached[row][-1:]

    def extend_row(self, row: int, tokens: Sequence[int]) -> None:
        """Tokens committed without a proposal: uncached, the draft runs them next step."""
        self._uncached[row] += list(tokens)

    def remove_row(self, row: int) -> None:
        reset_row(self.draft, row)
        self._uncached.pop(row, None)

    def run_uncached(self, committed: Sequence[int]) -> tuple[Tensor, int, int]:
        """The step's first draft forward, over row 0's uncached tokens: the logits after the
        pending token ``[V]`` (cut to the common vocabulary), the number of uncached tokens and
        the pending token's position."""
        self.catch_up([0])
        draft, device = self.draft, self.draft.device
        uncached = self._uncached[0]
        n = len(uncached)
        start = draft.cache_lengths()[0]
        pending = len(committed) - 1  # position of the pending token
        assert start + n == pending + 1, "draft cache out of step with the committed tokens"
        ids = to_device([[*uncached, *range(start, start + n)]], device)  # [1, 2n]
        logits = draft.forward(ids[:, :n], ids[:, n:], chain_mask(n, device=device), logits="last")
        return logits[0, -1, : self.vocab_size], n, pending

    def commit(self, accepted: Sequence[int], tokens: Sequence[int]) -> None:
        """Keep row 0's uncached tokens and the accepted nodes the draft ran; the accepted
        tokens it has not run and the correction / bonus token are uncached for the next
        step."""
        kept = [a for a in accepted if a in self.slot]
        assert kept == list(accepted[: len(kept)]), "only the accepted leaf can be missing"
        n = len(self._uncached[0])
        self.draft.commit([[*range(n), *(n + self.slot[a] for a in kept)]])
        self._uncached[0] = list(tokens[len(kept) :])


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
        self._plans: dict[TokenTree, _Plan] = {}
        self._proposed: TokenTree = tree  # the tree of the last proposal (commit reads it)
        self._plan(tree)

    def _plan(self, tree: TokenTree) -> _Plan:
        """The static per-level work for ``tree`` (built once per tree)."""
        if tree in self._plans:
            return self._plans[tree]
        device = self.draft.device
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
        self._plans[tree] = _Plan(slot, levels)
        return self._plans[tree]

    # ------------------------------------------------------------------ protocol
    @property
    def max_depth(self) -> int:
        return self.tree.max_depth

    @property
    def batch_size(self) -> int:
        return self.draft.batch_size

    def propose(self, committed: Sequence[int], generator: torch.Generator) -> Proposal:
        return self.propose_rows([0], [committed], [generator])[0]

    def commit(self, accepted: Sequence[int], tokens: Sequence[int]) -> None:
        self.commit_rows({0: (accepted, tokens)})

    # ------------------------------------------------------------------ rows
    def check_spec(self, spec: SpecConfig) -> None:
        """Refuse a row whose spec draws candidates otherwise than this proposer does (another
        draft sampling, with / without replacement, top-k, or a rule reading q it omits)."""
        if spec.dynamic is not None or spec.proposer != "model":
            raise ValueError(
                f"spec: tree {spec.describe_tree()} with proposer {spec.proposer!r} is grown per "
                "step by a one-row proposer; this engine's proposer grows static draft trees "
                "(use an engine built for it, of batch size 1)"
            )
        rule = get_rule(spec.resolved_rule())
        sampling = spec.draft_sampling
        if (
            sampling != self.sampling
            or rule.replacement != self.replacement
            or (rule.deterministic or sampling.greedy) != self.deterministic
            or (rule.reads_q and not self.return_q)
        ):
            raise ValueError(
                f"spec: rule {rule.name} with draft sampling {sampling} needs candidates drawn "
                "otherwise than this engine's proposer draws them; use an engine built for it"
            )

    def propose_rows(
        self,
        rows: Sequence[int],
        committed: Sequence[Sequence[int]],
        generators: Sequence[torch.Generator],
        tree: TokenTree | None = None,
    ) -> list[Proposal]:
        """Per row: node tokens ``[N]`` and q ``[N+1, V]`` (row 0 the root, row u+1 node u;
        rows of nodes without children stay zero), or None for q when neither the picking nor
        the rule reads it (deterministic drafts under greedy / top-k verification). ``tree``:
        this step's tree (default the proposer's own). The rows' uncached tokens are left-padded
        to one length (padding sees only itself)."""
        tree = self.tree if tree is None else tree
        self.catch_up(rows)
        draft, device, plan = self.draft, self.draft.device, self._plan(tree)
        self._proposed = tree
        b = len(rows)
        uncached = [self._uncached[row] for row in rows]
        n = max(map(len, uncached))
        lengths = draft.cache_lengths()
        pending = [len(c) - 1 for c in committed]  # position of each row's pending token
        for row, tokens, last in zip(rows, uncached, pending, strict=True):
            assert lengths[row] + len(tokens) == last + 1, "draft cache out of step"
        need_q = not self.deterministic or self.return_q
        pads = [n - len(tokens) for tokens in uncached]
        ids = to_device(
            [
                [*[0] * pad, *tokens, *[lengths[row]] * pad, *range(lengths[row], last + 1)]
                for row, tokens, last, pad in zip(rows, uncached, pending, pads, strict=True)
            ],
            device,
        )  # [b, 2n]
        seen_uncached = to_device([[0] * pad + [1] * (n - pad) for pad in pads], device).bool()
        if any(pads):  # [b, n, n]: real tokens a chain after the padding, padding only itself
            mask = chain_mask(n, device=device) & seen_uncached[:, None, :]
            mask |= torch.eye(n, dtype=torch.bool, device=device)
        else:
            mask = chain_mask(n, device=device)  # [n, n]
        logits = rows_forward(draft, rows, ids[:, :n], ids[:, n:], mask, logits="last")
        logits = logits[to_device(list(rows), device)] if b < self.batch_size else logits
        row_logits = torch.zeros(b, tree.num_nodes + 1, self.vocab_size, device=device)
        row_logits[:, 0] = logits[:, -1, : self.vocab_size]  # [b, N+1, V]
        q = torch.zeros_like(row_logits) if need_q else None  # [b, N+1, V]
        if q is not None:
            q[:, 0] = warp(row_logits[:, 0], self.sampling)
        node_tokens = torch.zeros(b, tree.num_nodes, dtype=torch.long, device=device)  # [b, N]
        starts = to_device(pending, device)[:, None]  # [b, 1]
        selected = to_device(list(rows), device)
        for level in plan.levels:
            for parents, children in level.picks:  # every parent of the level at once
                k = children.shape[1]
                if self.deterministic:
                    node_tokens[:, children] = torch.topk(row_logits[:, parents], k, dim=-1).indices
                    continue
                assert q is not None
                for i, generator in enumerate(generators):  # each row its own randomness
                    node_tokens[i, children] = draw_children(
                        q[i, parents], k, replacement=self.replacement, generator=generator
                    )  # [P, k]
            if not level.run:
                continue
            r = len(level.run)
            level_mask = torch.cat(
                [seen_uncached[:, None, :].expand(b, r, n), level.tree_mask.expand(b, -1, -1)],
                dim=2,
            )  # [b, r, n + P + r]
            out = rows_forward(
                draft, rows, node_tokens[:, level.run_index], starts + level.offsets, level_mask
            )
            out = out[selected] if b < self.batch_size else out
            nodes = level.run_index + 1
            row_logits[:, nodes] = out[:, :, : self.vocab_size]
            if q is not None:
                q[:, nodes] = warp(row_logits[:, nodes], self.sampling)
        return [
            Proposal(tree, node_tokens[i], q[i] if self.return_q and q is not None else None)
            for i in range(b)
        ]

    def commit_rows(self, steps: Mapping[int, RowStep]) -> None:
        """Per row: keep its uncached tokens (after its padding) and the accepted nodes the
        draft ran; the accepted tokens it has not run and the correction / bonus token are
        uncached for the next step. Rows not in ``steps`` keep nothing of the block."""
        n = max(len(self._uncached[row]) for row in steps)
        slot = self._plan(self._proposed).slot
        keep = {}
        for row, (accepted, tokens) in steps.items():
            kept = [a for a in accepted if a in slot]
            assert kept == list(accepted[: len(kept)]), "only the accepted leaf can be missing"
            pad = n - len(self._uncached[row])
            keep[row] = [*range(pad, n), *(n + slot[a] for a in kept)]
            self._uncached[row] = list(tokens[len(kept) :])
        self.draft.commit(keep_rows(self.batch_size, keep))
