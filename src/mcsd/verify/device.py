"""Tree verification as batched tensor operations, with one host transfer per step.

``mcsd.verify.walk.walk_path`` visits the tree in Python, node by node, which on a GPU costs a
host synchronisation per visited candidate. These verifiers compute every node's outcome at once
on the device; the host reads back one small tensor and follows the accepted children.

- ``GreedyTreeVerifier`` (rule ``greedy``), a closed form: a node *matches* when its token is the
  target argmax at its parent (row ``parent + 1``); the rule visits siblings in order and accepts
  the first match, so a node is *chosen* when it matches and no earlier sibling does; a node is
  on the accepted path when it and all its ancestors are chosen (those nodes form a chain from
  the root, the deepest one is the accepted leaf); the emitted token is the target argmax after
  the leaf (a bonus token when the leaf has no children, else the correction).
- ``SampledTreeVerifier`` (rules ``sps``, ``mcss``, ``mcss-wor``, ``topk``, ``mcns``): the
  sequential node rule of ``mcsd.verify.node`` for every node at once, batched over the nodes
  with the same number of children. Candidates are visited in draw order with the primitives of
  ``mcsd.verify.residual``: accept c with min(1, p'(c) / q'(c)) (``one_hot``: with p'(c)); on
  rejection p' <- norm(max(p' - q', 0)) (``one_hot``: p' without c), and for draws without
  replacement q' <- q' without c; then one token is drawn from each node's final residual (for a
  node without children: from p itself, the bonus token). In a tree that mixes deterministic
  (context) candidates with drawn ones, the deterministic ones take the one-hot steps
  (``mcsd.verify.node.Mixed``). Each node uses its own fresh uniforms,
  so the outcomes of the nodes off the path are independent of the walk and discarding them
  changes nothing: the walk has exactly the law of the sequential one (the whole-engine tests
  check it, ``mcsd check --engine``).

Each verifier's ``launch(tokens, logits, q, generator)`` queues the device work and
``finish(launched)`` makes the one host transfer and returns the ``TreeResult`` and the accepted
tokens, like ``mcsd.verify.walk.HostTreeVerifier``; the registry (``mcsd.verify.rules``) says
which rule uses which.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mcsd.sampling import draw_children, warp
from mcsd.tree import ROOT, TokenTree
from mcsd.verify.residual import accept_ratio, one_hot_reject, residual, wor_reject
from mcsd.verify.walk import TreeResult

if TYPE_CHECKING:
    from mcsd.sampling import SamplingConfig

NO_NODE = -1  # padding in the fetched path; "no child accepted" per row


class GreedyTreeVerifier:
    """Precomputed tree structure on one device; call it once per step."""

    def __init__(self, tree: TokenTree, device: torch.device | str) -> None:
        n = tree.num_nodes
        parents = torch.tensor(tree.parents, dtype=torch.long)  # [N]
        self.tree = tree
        self.parent_row = (parents + 1).to(device)  # [N] row of p at each node's parent
        index = torch.arange(n)
        self.earlier_sibling = (  # [N, N]: j is an earlier sibling of i
            (parents[:, None] == parents[None, :]) & (index[None, :] < index[:, None])
        ).to(device)
        self.ancestors = tree.ancestor_mask(device)  # [N, N]: j is i or an ancestor of i
        self.depth = torch.tensor(tree.depth, dtype=torch.long, device=device)  # [N]
        path = torch.full((n, tree.max_depth), NO_NODE, dtype=torch.long)  # [N, D]
        for i in range(n):
            chain = tree.ancestors(i)
            path[i, : len(chain)] = torch.tensor(chain)
        self.path = path.to(device)
        self.rank = tree.rank

    def device_result(self, tokens: Tensor, target_argmax: Tensor) -> Tensor:
        """``tokens`` ``[N]`` node tokens, ``target_argmax`` ``[N+1]`` argmax of p per row.

        Returns a long vector ``[2 + 2D]`` on the device: accepted length m, emitted token,
        the accepted node indices (``NO_NODE``-padded) and their tokens."""
        match = tokens == target_argmax[self.parent_row]  # [N]
        chosen = match & ~(self.earlier_sibling & match[None, :]).any(dim=1)  # [N]
        on_path = ~(self.ancestors & ~chosen[None, :]).any(dim=1)  # [N]
        score = torch.where(on_path, self.depth, 0)  # [N]
        m, leaf = score.max(dim=0, keepdim=True)  # [1], [1]; ties only at 0 (none accepted)
        row = torch.where(m > 0, leaf + 1, 0)  # [1]
        # Index with [1]-shaped tensors only: a 0-dim index tensor is read back to the host.
        depths = torch.arange(self.path.shape[1], device=tokens.device)  # [D]
        nodes = torch.where(depths < m, self.path[leaf][0], NO_NODE)  # [D]
        node_tokens = torch.where(nodes >= 0, tokens[nodes.clamp(min=0)], NO_NODE)  # [D]
        return torch.cat([m, target_argmax[row], nodes, node_tokens])

    def result(self, fetched: list[int]) -> tuple[TreeResult, list[int]]:
        """Host side of ``device_result`` (after its one ``.tolist()``): the ``TreeResult`` and
        the accepted tokens."""
        m, token = fetched[0], fetched[1]
        depth = self.path.shape[1]
        accepted = fetched[2 : 2 + m]
        accepted_tokens = fetched[2 + depth : 2 + depth + m]
        leaf = accepted[-1] if accepted else ROOT
        bonus = not self.tree.children(leaf)
        ranks = tuple(self.rank[a] for a in accepted)
        return TreeResult(
            accepted=tuple(accepted), ranks=ranks, token=token, bonus=bonus
        ), accepted_tokens

    def __call__(self, tokens: Tensor, target_argmax: Tensor) -> TreeResult:
        return self.result(self.device_result(tokens, target_argmax).tolist())[0]

    def launch(
        self, tokens: Tensor, logits: Tensor, q: Tensor | None, generator: torch.Generator | None
    ) -> Tensor:
        """``tokens`` ``[N]``, ``logits`` ``[N+1, V]``: p is one-hot at the argmax, so the
        argmax of the logits is all the rule reads. Queues the work; no host transfer."""
        return self.device_result(tokens, logits.argmax(dim=-1))

    def finish(self, launched: Tensor) -> tuple[TreeResult, list[int]]:
        """The one host transfer, then the ``TreeResult`` and the accepted tokens."""
        return self.result(launched.tolist())


class SampledTreeVerifier:
    """The sequential sampled rules for a whole tree on the device (see the module docstring).

    ``without_replacement``: siblings were drawn without replacement (mcss-wor), so q' loses each
    rejected candidate; ``one_hot``: deterministic candidates (topk; mcns's recursion), accepted
    with p'(c) and removed from p' when rejected, q unused. ``dtype``: of the residual work and
    the coins (float32 on GPUs: half the bytes over every node's vocabulary; float64 on CPUs,
    where the work is small)."""

    def __init__(
        self,
        tree: TokenTree,
        device: torch.device | str,
        target: SamplingConfig,
        *,
        without_replacement: bool = False,
        one_hot: bool = False,
        deterministic: tuple[bool, ...] | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.tree = tree
        self.target = target
        self.dtype = dtype
        self.without_replacement = without_replacement
        self.one_hot = one_hot
        n = tree.num_nodes
        # [N] bool: deterministic (context) candidates among drawn ones, verified one-hot
        self.deterministic = (
            None
            if deterministic is None or one_hot
            else torch.tensor(deterministic, dtype=torch.bool, device=device)
        )
        by_k: dict[int, list[int]] = {}
        for row in range(n + 1):
            node = ROOT if row == 0 else row - 1
            by_k.setdefault(len(tree.children(node)), []).append(row)
        # (k, rows [R], children [R, k]) per group of rows with k >= 1 children
        self.groups = [
            (
                k,
                torch.tensor(rows, dtype=torch.long, device=device),
                torch.tensor(
                    [tree.children(ROOT if r == 0 else r - 1) for r in rows],
                    dtype=torch.long,
                    device=device,
                ),
            )
            for k, rows in sorted(by_k.items())
            if k > 0
        ]

    def device_result(
        self, tokens: Tensor, p: Tensor, q: Tensor | None, generator: torch.Generator | None
    ) -> Tensor:
        """``tokens`` ``[N]``, ``p`` and ``q`` ``[N+1, V]`` (rows as in ``walk_path``; q unused
        for ``one_hot``).

        Returns ``[2, N+1]`` long on the device: per row the index of the accepted child (in
        draw order, ``NO_NODE`` when none) and the token drawn from the row's final residual."""
        rows_total = p.shape[0]
        left = p.to(self.dtype)  # [N+1, V]; rows without children keep p (their bonus draw)
        chosen = torch.full((rows_total,), NO_NODE, dtype=torch.long, device=p.device)  # [N+1]
        for k, rows, children in self.groups:
            p_row = left[rows]  # [R, V]
            q_row = None if self.one_hot else q[rows].to(self.dtype)  # [R, V]
            candidates = tokens[children]  # [R, k]
            fixed = None if self.deterministic is None else self.deterministic[children]  # [R, k]
            u = torch.rand(len(rows), k, generator=generator, dtype=self.dtype, device=p.device)
            picked = torch.full((len(rows),), NO_NODE, dtype=torch.long, device=p.device)  # [R]
            for j in range(k):
                c = candidates[:, j : j + 1]  # [R, 1]
                if q_row is None:
                    ratio = p_row.gather(1, c)[:, 0]  # [R] q one-hot at c: accept with p'(c)
                    p_row = one_hot_reject(p_row, c)
                else:
                    ratio = accept_ratio(p_row, q_row, c)  # [R]
                    if self.without_replacement:
                        p_next, q_next = wor_reject(p_row, q_row, c)
                    else:
                        p_next, q_next = residual(p_row, q_row), q_row
                    if fixed is not None:  # deterministic candidates: the one-hot rule
                        f = fixed[:, j : j + 1]  # [R, 1]
                        ratio = torch.where(f[:, 0], p_row.gather(1, c)[:, 0], ratio)
                        p_next = torch.where(f, one_hot_reject(p_row, c), p_next)
                        q_next = torch.where(f, q_row, q_next)
                    p_row, q_row = p_next, q_next
                accept = (picked == NO_NODE) & ((ratio >= 1.0) | (u[:, j] < ratio))  # [R]
                picked = torch.where(accept, j, picked)
            # Rows that accepted a child keep updating p_row above, but their draw is unused.
            left = left.index_copy(0, rows, p_row)
            chosen = chosen.index_copy(0, rows, picked)
        draw = draw_children(left, 1, replacement=True, generator=generator)[:, 0]  # [N+1]
        return torch.stack([chosen, draw])

    def result(self, fetched: list[list[int]]) -> TreeResult:
        """Host side of ``device_result`` (after its one ``.tolist()``): follow the accepted
        children from the root."""
        chosen, draw = fetched
        accepted: list[int] = []
        ranks: list[int] = []
        node = ROOT
        while True:
            row = 0 if node == ROOT else node + 1
            children = self.tree.children(node)
            if not children:
                return TreeResult(
                    accepted=tuple(accepted), ranks=tuple(ranks), token=draw[row], bonus=True
                )
            j = chosen[row]
            if j == NO_NODE:
                return TreeResult(
                    accepted=tuple(accepted), ranks=tuple(ranks), token=draw[row], bonus=False
                )
            node = children[j]
            accepted.append(node)
            ranks.append(self.tree.rank[node])

    def __call__(
        self, tokens: Tensor, p: Tensor, q: Tensor | None, generator: torch.Generator | None = None
    ) -> TreeResult:
        return self.result(self.device_result(tokens, p, q, generator).tolist())

    def launch(
        self, tokens: Tensor, logits: Tensor, q: Tensor | None, generator: torch.Generator | None
    ) -> Tensor:
        """One step's device work: warp the logits ``[N+1, V]`` into p, verify every node."""
        outcome = self.device_result(tokens, warp(logits, self.target), q, generator)
        return torch.cat([outcome.flatten(), tokens])  # [2 (N+1) + N]

    def finish(self, launched: Tensor) -> tuple[TreeResult, list[int]]:
        """The one host transfer: the outcome and the node tokens; the accepted path."""
        fetched = launched.tolist()
        rows = self.tree.num_nodes + 1
        result = self.result([fetched[:rows], fetched[rows : 2 * rows]])
        node_list = fetched[2 * rows :]
        return result, [node_list[a] for a in result.accepted]
