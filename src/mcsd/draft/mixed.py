"""Mixed trees: the draft model's tree and the context's tree below the same pending token.

Each step the draft model grows its static tree (``mcsd.draft.model``) and the context its
tree of copied continuations (``mcsd.draft.context``); the step's tree holds both as one trie
(``merge``): where a context path and a draft path agree, the draft's drawn children continue
below the context node, and below every node the deterministic (context) candidates come before
the drawn siblings. The proposal flags every node
(``Proposal.deterministic``) and the verifier applies ``mcsd.verify.node.Mixed`` where a node's
children are of both kinds: the one-hot rule for the context candidates, then the step's rule
for the drawn ones on the residual. When the context has no match the step is the draft's tree.

The drawn candidates keep the draft's own q (they are drawn before the context tree is known):
a drawn token equal to a context sibling is then always rejected (the residual gives it no mass),
which costs a node but not losslessness; its drawn children live on below the context twin.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mcsd.draft.base import Proposal
from mcsd.draft.context import ContextTree
from mcsd.tree import ROOT, TokenTree


@dataclass(frozen=True)
class Merged:
    """The union of a context tree (C nodes) and a draft tree (D nodes), in BFS order."""

    tree: TokenTree
    order: Tensor  # [C + D] long: node u of the union is entry order[u] of [context, draft]
    q_rows: Tensor  # [C + D + 1] long: the union's q rows in [draft q rows, one zero row]
    deterministic: tuple[bool, ...]
    draft_node: tuple[int, ...]  # the union's node -> the draft tree's node (or twin), else -1


def merge(
    context: TokenTree,
    context_tokens: Sequence[int],
    draft: TokenTree,
    draft_tokens: Sequence[int],
    device: torch.device,
) -> Merged:
    """Both trees below one root, as one trie where they agree: a context node whose token
    equals a draft sibling's (its *twin*, same path, so the same draft distribution) takes the
    twin's drawn children after its own context children, and the twin stays a childless
    candidate (the rules that sample must still see every draw: it is always rejected, the
    residual giving its token no mass). Context children come before drawn siblings."""
    c = context.num_nodes
    parents: list[int] = []
    order: list[int] = []
    holds: list[int] = []  # the draft node whose drawn children hang below each union node
    draft_node: list[int] = []
    queue: deque[tuple[int, int | None, int | None]] = deque([(ROOT, ROOT, ROOT)])
    while queue:  # breadth first: the union comes out in BFS order
        node, context_parent, draft_parent = queue.popleft()
        drawn = draft.children(draft_parent) if draft_parent is not None else ()
        twins: set[int] = set()
        for child in context.children(context_parent) if context_parent is not None else ():
            twin = next(
                (d for d in drawn if d not in twins and draft_tokens[d] == context_tokens[child]),
                None,
            )
            if twin is not None:
                twins.add(twin)
            queue.append((len(parents), child, twin))
            parents.append(node)
            order.append(child)
            holds.append(-1 if twin is None else twin)
            draft_node.append(-1 if twin is None else twin)
        for d in drawn:
            queue.append((len(parents), None, None if d in twins else d))
            parents.append(node)
            order.append(c + d)
            holds.append(-1 if d in twins else d)
            draft_node.append(d)
    zero_row = draft.num_nodes + 1
    q_rows = [0] + [zero_row if h < 0 else h + 1 for h in holds]
    return Merged(
        TokenTree(tuple(parents)),
        torch.tensor(order, dtype=torch.long, device=device),
        torch.tensor(q_rows, dtype=torch.long, device=device),
        tuple(e < c for e in order),
        tuple(draft_node),
    )


def mixed_proposal(drawn: Proposal, found: ContextTree | None) -> tuple[Proposal, Merged | None]:
    """The step's union of the draft's ``drawn`` proposal and the context tree ``found`` (the
    draft's proposal alone when the context has no match), and the union (what the commit maps
    accepted nodes back to the draft's tree with: ``Merged.draft_node``)."""
    if found is None:
        return drawn, None
    device = drawn.tokens.device
    draft_tokens = drawn.tokens.tolist()  # the twins depend on the drawn tokens
    merged = merge(found.tree, found.tokens, drawn.tree, draft_tokens, device)
    context_tokens = torch.tensor(found.tokens, dtype=torch.long, device=device)
    tokens = torch.cat([context_tokens, drawn.tokens])[merged.order]  # [C + D]
    q = None
    if drawn.q is not None:
        q = torch.cat([drawn.q, torch.zeros_like(drawn.q[:1])])[merged.q_rows]  # [C+D+1, V]
    return Proposal(merged.tree, tokens, q, merged.deterministic), merged


def drafted_nodes(merged: Merged | None, accepted: Sequence[int]) -> list[int]:
    """The accepted nodes of a union as nodes of the draft's tree: those it drafted or has a
    twin of (a path of its tree from the root), up to the first it never saw."""
    if merged is None:
        return list(accepted)
    drafted = []
    for a in accepted:
        if merged.draft_node[a] < 0:
            break
        drafted.append(merged.draft_node[a])
    return drafted
