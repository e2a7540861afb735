"""Mixed trees: the draft model's tree and the context's tree below the same pending token.

Each step the draft model grows its static tree (``mcsd.draft.model``) and the context proposer
its tree of copied continuations (``mcsd.draft.context``); the step's tree holds both, level by
level, with the context's nodes first at every depth, so below the root the deterministic
(context) candidates come before the drawn siblings. The proposal flags every node
(``Proposal.deterministic``) and the verifier applies ``mcsd.verify.node.Mixed`` where a node's
children are of both kinds: the one-hot rule for the context candidates, then the step's rule
for the drawn ones on the residual. When the context has no match the step is the draft's tree.

The drawn candidates keep the draft's own q (they are drawn before the context tree is known):
a drawn token equal to a context sibling is then always rejected (the residual gives it no mass),
which costs acceptance but not losslessness.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mcsd.draft.base import Proposal
from mcsd.draft.context import ContextProposer
from mcsd.draft.model import ModelProposer
from mcsd.tree import ROOT, TokenTree


@dataclass(frozen=True)
class Merged:
    """The union of a context tree (C nodes) and a draft tree (D nodes), in BFS order."""

    tree: TokenTree
    order: Tensor  # [C + D] long: node u of the union is entry order[u] of [context, draft]
    q_rows: Tensor  # [C + D + 1] long: the union's q rows in [draft q rows, one zero row]
    deterministic: tuple[bool, ...]
    draft_node: tuple[int, ...]  # the union's node -> the draft tree's node, -1 for context


def merge(context: TokenTree, draft: TokenTree, device: torch.device) -> Merged:
    """Both trees below one root, depth by depth, the context's nodes first."""
    c = context.num_nodes
    sources = [(context, 0), (draft, c)]
    new: dict[int, int] = {}  # entry of [context, draft] -> node of the union
    parents: list[int] = []
    order: list[int] = []
    for depth in range(1, max(context.max_depth, draft.max_depth) + 1):
        for tree, offset in sources:
            for u in range(tree.num_nodes):
                if tree.depth[u] != depth:
                    continue
                parent = tree.parents[u]
                new[offset + u] = len(parents)
                parents.append(ROOT if parent == ROOT else new[offset + parent])
                order.append(offset + u)
    zero_row = draft.num_nodes + 1
    q_rows = [0] + [e - c + 1 if e >= c else zero_row for e in order]
    return Merged(
        TokenTree(tuple(parents)),
        torch.tensor(order, dtype=torch.long, device=device),
        torch.tensor(q_rows, dtype=torch.long, device=device),
        tuple(e < c for e in order),
        tuple(e - c if e >= c else -1 for e in order),
    )


class MixedProposer:
    """Draft-model and context candidates in one tree (see the module docstring)."""

    def __init__(self, model: ModelProposer, context: ContextProposer) -> None:
        self.model = model
        self.context = context
        self._merged: dict[TokenTree, Merged] = {}  # by context tree (the draft's is static)
        self._last: Merged | None = None

    @property
    def max_context(self) -> int | None:
        return self.model.max_context

    @property
    def max_depth(self) -> int:
        return max(self.model.max_depth, self.context.max_depth)

    def start(self, prompt_ids: Sequence[int]) -> None:
        self.model.start(prompt_ids)
        self.context.start(prompt_ids)

    def propose(self, committed: Sequence[int], generator: torch.Generator) -> Proposal:
        drawn = self.model.propose(committed, generator)
        found = self.context.propose_host(committed)
        if found is None:
            self._last = None
            return drawn
        merged = self._merged.get(found.tree)
        if merged is None:
            merged = self._merged[found.tree] = merge(found.tree, drawn.tree, drawn.tokens.device)
        self._last = merged
        context_tokens = torch.tensor(found.tokens, dtype=torch.long, device=drawn.tokens.device)
        tokens = torch.cat([context_tokens, drawn.tokens])[merged.order]  # [C + D]
        q = None
        if drawn.q is not None:
            q = torch.cat([drawn.q, torch.zeros_like(drawn.q[:1])])[merged.q_rows]  # [C+D+1, V]
        return Proposal(merged.tree, tokens, q, merged.deterministic)

    def commit(self, accepted: Sequence[int], tokens: Sequence[int]) -> None:
        merged = self._last
        if merged is None or not accepted or not merged.deterministic[accepted[0]]:
            drafted = accepted if merged is None else [merged.draft_node[a] for a in accepted]
            self.model.commit(drafted, tokens)
        else:  # a context path: the draft ran none of it
            self.model.commit([], tokens)
        self.context.commit(accepted, tokens)
