"""``Drafter``: the one proposer (``mcsd.draft.base.Proposer``), for every plan and any rows.

Each request's plan (``mcsd.plan.Plan``) says how its trees grow: the draft model's static tree
(``mcsd.draft.model``), a dynamic tree (``mcsd.draft.dynamic``), the context's (``mcsd.draft.
context``, no draft forward) or both in one tree (``mcsd.draft.mixed``). In one ``propose``,
every request the draft model drafts for reads its uncached tokens in one shared forward; the
requests growing the same static tree then share one forward per level, a dynamic tree runs
forwards of its own row; context trees cost no forward. Requests of every kind can be rows of
one engine, side by side in one step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mcsd.draft.base import Proposal, RowStep
from mcsd.draft.context import RequestStore, SuffixIndex, context_proposal, context_tree
from mcsd.draft.dynamic import grow
from mcsd.draft.mixed import Merged, drafted_nodes, mixed_proposal
from mcsd.draft.model import DraftCursor, DraftRows, Uncached
from mcsd.errors import ParamError
from mcsd.models.base import Runtime, to_device
from mcsd.plan import Plan
from mcsd.request import Request
from mcsd.tree import TokenTree


@dataclass
class Cursor:
    """A request's proposer state (``Request.cursor``)."""

    draft: DraftCursor | None  # the draft model's (plans it drafts for)
    index: SuffixIndex | None  # the request's own tokens, indexed (plans that copy)
    merged: Merged | None = None  # this step's union of a mixed tree (the commit maps it)


class Drafter:
    """Proposes for requests of any plan (see the module docstring). ``draft``: the draft
    runtime, with as many rows as the engine's target (None: context drafting only);
    ``device``: where context candidates go (the target's; default the draft's); ``store``:
    earlier requests the context may copy from (read only; the caller adds to it)."""

    def __init__(
        self,
        draft: Runtime | None,
        *,
        vocab_size: int,
        device: torch.device | str | None = None,
        store: RequestStore | None = None,
    ) -> None:
        if device is None:
            if draft is None:
                raise ValueError("device: a Drafter without a draft model needs the target's")
            device = draft.device
        self.model = None if draft is None else DraftRows(draft, vocab_size)
        self.device = torch.device(device)
        self.store = store

    @property
    def batch_size(self) -> int | None:
        """The rows it follows: its draft's (None without one: any number)."""
        return None if self.model is None else self.model.draft.batch_size

    def check(self, plan: Plan) -> None:
        if plan.drafts and self.model is None:
            raise ParamError(
                f"proposer {plan.proposer!r} needs a draft model; got none (this pair was loaded "
                "without one: use proposer 'context')",
                param="proposer",
                allowed="context (no draft model loaded)",
            )

    def max_context(self, plan: Plan) -> int | None:
        return self.model.draft.max_context if plan.drafts and self.model is not None else None

    def start(self, request: Request) -> None:
        plan = request.plan
        draft = self.model.start(request) if plan.drafts and self.model is not None else None
        index = None
        if plan.copies:
            index = SuffixIndex(plan.context.max_ngram, request.committed)
        request.cursor = Cursor(draft, index)

    def remove(self, request: Request) -> None:
        cursor = request.cursor
        if cursor is not None and cursor.draft is not None and self.model is not None:
            assert request.row is not None
            self.model.remove(request.row)
        request.cursor = None

    def extend(self, request: Request, tokens: Sequence[int]) -> None:
        """Tokens committed by a plain step: uncached for the draft, indexed for the context."""
        cursor = request.cursor
        if cursor.draft is not None:
            cursor.draft.uncached += list(tokens)
        if cursor.index is not None:
            cursor.index.extend(tokens)

    def propose(
        self, requests: Sequence[Request], trees: Sequence[TokenTree | None]
    ) -> list[Proposal]:
        """One proposal per request (rows in increasing order); ``trees[i]``: the static tree
        request ``i`` grows this step (None: its plan's own)."""
        proposals: list[Proposal | None] = [None] * len(requests)
        drafted = [i for i, r in enumerate(requests) if r.plan.drafts]
        if drafted:
            assert self.model is not None
            model = self.model
            first = model.read_uncached([requests[i] for i in drafted])
            groups: dict[TokenTree, list[int]] = {}  # static tree -> positions in ``drafted``
            for j, i in enumerate(drafted):
                plan = requests[i].plan
                if plan.dynamic is not None:
                    continue
                tree = trees[i] if trees[i] is not None else plan.tree
                assert tree is not None
                groups.setdefault(tree, []).append(j)
            for tree, members in groups.items():
                rows = first  # every drafted request grows this tree: no gather
                if len(members) < len(drafted):
                    index = to_device(members, first.logits.device)  # no host synchronisation
                    rows = Uncached(first.logits[index], first.seen[index])
                grown = model.static_tree([requests[drafted[j]] for j in members], tree, rows)
                for j, proposal in zip(members, grown, strict=True):
                    proposals[drafted[j]] = proposal
            for j, i in enumerate(drafted):
                if requests[i].plan.dynamic is not None:
                    proposals[i] = grow(model, requests[i], first.logits[j], first.seen[j])
        for i, request in enumerate(requests):
            cursor = request.cursor
            if cursor.index is None:
                continue
            found = context_tree(cursor.index, request.committed, request.plan.context, self.store)
            drawn = proposals[i]
            if drawn is None:
                proposals[i] = context_proposal(found, request.committed, self.device)
            else:
                proposals[i], cursor.merged = mixed_proposal(drawn, found)
        assert all(p is not None for p in proposals)
        return proposals  # type: ignore[return-value]

    def commit(self, requests: Sequence[Request], steps: Sequence[RowStep]) -> None:
        """Each request's step (``RowStep``): the draft keeps what it ran of the accepted path,
        the context indexes the committed tokens."""
        drafted, accepted, tokens = [], [], []
        for request, step in zip(requests, steps, strict=True):
            cursor = request.cursor
            if cursor.draft is not None:
                drafted.append(request)
                accepted.append(drafted_nodes(cursor.merged, step.accepted))
                tokens.append(step.tokens)
            if cursor.index is not None:
                cursor.index.extend(step.tokens)
            cursor.merged = None
        if drafted:
            assert self.model is not None
            self.model.commit(drafted, accepted, tokens)
