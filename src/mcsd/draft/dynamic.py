"""Dynamic draft-model trees (EAGLE-2 style): a new tree every step, grown by path probability.

A node's *score* is the draft's probability of its path, P(u) = prod of q along the path from
the pending token. Level by level, the ``width`` highest-scoring nodes of the newest depth run
through the draft (one forward per level of the request's own row, tree mask over its
uncached tokens and its tree's entries in the pending block, ``mcsd.draft.model.DraftRows``)
and get children, down to ``max_depth``. How the children are picked decides which
verification rule is lossless:

- **deterministic** (rules ``topk`` and ``greedy``): every expanded node gets the draft's top
  ``width`` tokens; when the tree is grown, the ``budget`` nodes of highest score are kept (the
  set of the B most probable paths is a tree: a child never scores above its parent; ties go to
  the earlier node, the parent). The candidates are a function of the draft alone, so the one-hot
  rule (accept c with the residual's p(c), else zero it) is lossless for any such selection.
- **sampled** (rule ``mcss-wor``): every node's children are a draw without replacement from its
  q, and the node keeps the *whole* draw. How many children a node gets is decided *before* its
  children are drawn: the level's ``min(width, budget left)`` child slots go to the expanded
  nodes with the highest expected scores P(u) * (j-th largest q_u), which depend only on tokens
  drawn at earlier levels. MCSS without replacement is lossless for such a draw: after each
  rejection the residual norm(max(0, p - qbar)) does not depend on the rejected token, so
  stopping after any number of draws fixed in advance emits exactly p. Pruning the draws by their
  own probabilities instead (keeping the most probable of more draws, as the deterministic mode
  does) would keep a subset that is no longer a draw without replacement: biased
  (``tests/test_dynamic_tree.py`` shows the whole-engine test catching it).

The tree is laid out in BFS order with siblings in draw (or top-k) order; it has exactly
``budget`` nodes in both modes (``DynamicTreeConfig`` asks for ``width * max_depth >= budget``;
draws without replacement beyond the draft's support are zero-mass padding, rejected by the
rule), so the target's forward keeps one padded shape of the slot runtimes (a CUDA graph per
power-of-two bucket, ``mcsd.models.slots``) and the draft's levels at most ``width`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from mcsd.config import DynamicTreeConfig
from mcsd.draft.base import Proposal
from mcsd.draft.model import DraftRows
from mcsd.request import Request
from mcsd.sampling import draw_children, warp
from mcsd.tree import ROOT, TokenTree


@dataclass
class _Grown:
    """The nodes grown so far in one step (indices in growth order)."""

    parent: list[int] = field(default_factory=list)  # growth index of the parent, ROOT
    token: list[int] = field(default_factory=list)
    depth: list[int] = field(default_factory=list)
    score: list[float] = field(default_factory=list)  # draft path probability P(u)
    entry: dict[int, int] = field(default_factory=dict)  # run node -> its draft pending entry
    q: dict[int, Tensor] = field(default_factory=dict)  # ROOT / run node -> q its children had

    def add(self, parent: int, tokens: list[int], scores: list[float], depth: int) -> None:
        for token, score in zip(tokens, scores, strict=True):
            self.parent.append(parent)
            self.token.append(token)
            self.depth.append(depth)
            self.score.append(score)


def grow(draft: DraftRows, request: Request, root_logits: Tensor, seen: Tensor) -> Proposal:
    """Grow ``request``'s tree for this step (see the module docstring) below the root logits
    ``[V]`` of the step's first draft forward (``seen`` ``[n]``: the row's uncached entries);
    node tokens ``[N]``, q ``[N+1, V]`` (rows of nodes without children zero) or None when the
    rule does not read it."""
    plan = request.plan
    config, sampling, scheme = plan.dynamic, plan.draft, plan.candidates
    assert config is not None and scheme is not None
    device = draft.device
    grown = _Grown()
    frontier = [ROOT]  # nodes whose children this level picks
    frontier_logits = root_logits[None]  # [F, V]
    left = config.budget
    for depth in range(1, config.max_depth + 1):
        q = warp(frontier_logits, sampling)  # [F, V] what the children are drawn from
        # [F, V] what ranks them: q, or for a greedy draft (one-hot q) its softmax
        scores = torch.softmax(frontier_logits.float(), -1) if sampling.greedy else q
        for u, row in zip(frontier, q, strict=True):
            grown.q[u] = row
        first = len(grown.token)
        k = min(config.width, draft.vocab_size)
        parent_scores = torch.tensor(
            [1.0 if u == ROOT else grown.score[u] for u in frontier], device=device
        )  # [F]
        if scheme.prune:  # every expanded node gets k children, the best are kept below
            counts = [k] * len(frontier)
        else:  # the level's slots, allotted before anything is drawn
            counts = _counts(scores, parent_scores, min(left, k))
            left -= sum(counts)
        if scheme.deterministic:
            top = torch.topk(scores, k, dim=-1).indices  # [F, k] the draft's top-k per node
        for i, (u, count) in enumerate(zip(frontier, counts, strict=True)):
            if count == 0:
                continue
            if scheme.deterministic:
                tokens = top[i, :count]
            else:
                tokens = draw_children(
                    q[i : i + 1], count, replacement=False, generator=request.generator
                )[0]  # [count] in draw order
            child_scores = (parent_scores[i] * scores[i, tokens]).tolist()
            grown.add(u, tokens.tolist(), child_scores, depth)
        newest = range(first, len(grown.token))
        if depth == config.max_depth or left == 0 or not newest:
            break
        ranked = sorted(newest, key=lambda v: (-grown.score[v], v))
        frontier = sorted(ranked[: config.width])
        frontier_logits = _run_level(draft, request, grown, frontier, seen)
    return _proposal(draft, request, grown, config, prune=scheme.prune)


def _counts(scores: Tensor, parent_scores: Tensor, slots: int) -> list[int]:
    """Children per frontier node for a sampled level: the ``slots`` best expected child
    scores P(u) * (j-th largest q_u(.)), j < ``slots``. Depends only on the frontier's own
    q and scores, never on the draws it allots."""
    expected = parent_scores[:, None] * torch.topk(scores, slots, dim=-1).values  # [F, s]
    best = torch.topk(expected.flatten(), slots).indices  # [slots]
    return torch.bincount(best // slots, minlength=len(parent_scores)).tolist()


def _run_level(
    draft: DraftRows, request: Request, grown: _Grown, frontier: list[int], seen: Tensor
) -> Tensor:
    """Run ``frontier`` (nodes of one depth) through the draft on the request's row: logits
    ``[F, V]``. Each sees the row's uncached tokens, its ancestors (run at earlier levels, at
    their pending entries) and itself."""
    device = draft.device
    width = draft.draft.pending_length
    f = len(frontier)
    mask = torch.zeros(f, width + f, dtype=torch.bool)  # [F, P + F]
    mask[:, : seen.shape[0]] = seen.cpu()
    for i, u in enumerate(frontier):
        mask[i, width + i] = True
        ancestor = grown.parent[u]
        while ancestor != ROOT:
            mask[i, grown.entry[ancestor]] = True
            ancestor = grown.parent[ancestor]
        grown.entry[u] = width + i
    pending = len(request.committed) - 1
    tokens = torch.tensor([[grown.token[u] for u in frontier]], device=device)  # [1, F]
    positions = torch.tensor([[pending + grown.depth[u] for u in frontier]], device=device)
    out = draft.forward([request.row], tokens, positions, mask.to(device))  # [1, F, V]
    return out[0]


def _proposal(
    draft: DraftRows, request: Request, grown: _Grown, config: DynamicTreeConfig, *, prune: bool
) -> Proposal:
    """Keep the best ``budget`` nodes (deterministic mode) and lay them out in BFS order,
    siblings in draw order; record the pending entries of the kept nodes the draft ran."""
    device = draft.device
    nodes = range(len(grown.token))
    kept = sorted(nodes, key=lambda v: (-grown.score[v], v))[: config.budget]
    if not prune:
        kept = list(nodes)
    index: dict[int, int] = {ROOT: ROOT}
    order = sorted(kept, key=lambda v: (grown.depth[v], v))
    # BFS: by depth, then by the parent's new index, then in draw order
    layout: list[int] = []
    for depth in sorted({grown.depth[v] for v in order}):
        level = [v for v in order if grown.depth[v] == depth]
        level.sort(key=lambda v: (index[grown.parent[v]], v))
        for v in level:
            index[v] = len(layout)
            layout.append(v)
    tree = TokenTree(tuple(index[grown.parent[v]] for v in layout))
    tokens = torch.tensor([grown.token[v] for v in layout], device=device)  # [N]
    request.cursor.draft.entries = {index[u]: grown.entry[u] for u in layout if u in grown.entry}
    q = None
    if request.plan.candidates.return_q:
        q = torch.zeros(len(layout) + 1, draft.vocab_size, device=device)  # [N+1, V]
        q[0] = grown.q[ROOT]
        for u in layout:
            if tree.children(index[u]):
                q[index[u] + 1] = grown.q[u]
    return Proposal(tree, tokens, q)
