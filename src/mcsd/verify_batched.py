"""Greedy tree verification as a few tensor operations, with one host transfer per step.

``mcsd.verify.verify_tree`` walks the tree in Python, node by node, which on a GPU costs a host
synchronisation per visited candidate. Under the greedy rule the walk has a closed form, so the
whole step runs on the device and the host reads back one small vector:

- a node *matches* when its token is the target argmax at its parent (row ``parent + 1``);
- the rule visits siblings in order and accepts the first match, so a node is *chosen* when it
  matches and no earlier sibling does;
- a node is on the accepted path when it and all its ancestors are chosen; those nodes form a
  chain from the root, and the deepest one is the accepted leaf;
- the emitted token is the target argmax after the leaf (a bonus token when the leaf has no
  children, else the correction), exactly what ``verify_tree`` emits.

``tests/test_verify_batched.py`` checks the result equals ``verify_tree(..., rule="greedy")`` on
random trees, including duplicate sibling tokens. This module imports only torch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mcsd.sampling import EMPTY_MASS, draw_children
from mcsd.tree import ROOT, TokenTree
from mcsd.verify import TreeResult

NO_NODE = -1  # padding in the fetched path


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
        return TreeResult(tuple(accepted), ranks, token, bonus), accepted_tokens

    def __call__(self, tokens: Tensor, target_argmax: Tensor) -> TreeResult:
        return self.result(self.device_result(tokens, target_argmax).tolist())[0]


SAMPLED_RULES = ("sps", "mcss", "mcss-wor")  # the sequential rules SampledTreeVerifier runs


class SampledTreeVerifier:
    """The paper's sampled rules (``sps``, ``mcss``, ``mcss-wor``) for a whole tree on the device,
    with one host transfer per step.

    ``verify_tree`` visits only the nodes on the accepted path, one host round trip per
    candidate. Here every node's outcome is computed at once, batched over the nodes that have
    the same number of children: the candidates are visited in draw order exactly as in
    ``mcsd.verify`` (accept candidate c with min(1, p'(c) / q'(c)), 0 when q'(c) = 0; on
    rejection p' <- norm(max(p' - q', 0)), kept when that mass is below ``EMPTY_MASS``; for
    mcss-wor also q' <- q' without c, renormalised), then one token is drawn from each node's final
    residual (for a node without children: from p itself, the bonus token). The host then follows
    the accepted children from the root. Each node uses its own fresh uniforms, so the outcomes
    of the nodes off the path are independent of the walk and discarding them changes nothing:
    the walk has exactly the law of the sequential one (the engine tests check it through the
    whole engine, ``mcsd check --engine``)."""

    def __init__(self, tree: TokenTree, rule: str, device: torch.device | str) -> None:
        if rule not in SAMPLED_RULES:
            raise ValueError(f"rule must be one of {', '.join(SAMPLED_RULES)}, got {rule!r}")
        self.tree = tree
        self.without_replacement = rule == "mcss-wor"
        n = tree.num_nodes
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
        self, tokens: Tensor, p: Tensor, q: Tensor, generator: torch.Generator | None
    ) -> Tensor:
        """``tokens`` ``[N]``, ``p`` and ``q`` ``[N+1, V]`` (rows as in ``verify_tree``).

        Returns ``[2, N+1]`` long on the device: per row the index of the accepted child (in
        draw order, ``NO_NODE`` when none) and the token drawn from the row's final residual."""
        rows_total = p.shape[0]
        residual = p.double()  # [N+1, V]; rows without children keep p (their bonus draw)
        chosen = torch.full((rows_total,), NO_NODE, dtype=torch.long, device=p.device)  # [N+1]
        for k, rows, children in self.groups:
            p_row, q_row = residual[rows], q[rows].double()  # [R, V]
            candidates = tokens[children]  # [R, k]
            u = torch.rand(len(rows), k, generator=generator, dtype=torch.float64, device=p.device)
            picked = torch.full((len(rows),), NO_NODE, dtype=torch.long, device=p.device)  # [R]
            for j in range(k):
                c = candidates[:, j : j + 1]  # [R, 1]
                qc, pc = q_row.gather(1, c)[:, 0], p_row.gather(1, c)[:, 0]  # [R]
                ratio = torch.where(qc > 0, (pc / qc.clamp(min=1e-300)).clamp(max=1.0), 0.0)
                accept = (picked == NO_NODE) & ((ratio >= 1.0) | (u[:, j] < ratio))  # [R]
                picked = torch.where(accept, j, picked)
                left = torch.clamp(p_row - q_row, min=0.0)  # [R, V]
                mass = left.sum(dim=-1, keepdim=True)  # [R, 1]
                p_row = torch.where(mass > EMPTY_MASS, left / mass.clamp(min=EMPTY_MASS), p_row)
                if self.without_replacement:
                    q_bar = q_row.scatter(1, c, 0.0)
                    q_mass = q_bar.sum(dim=-1, keepdim=True)
                    q_norm = q_bar / q_mass.clamp(min=1e-300)
                    q_row = torch.where(q_mass > EMPTY_MASS, q_norm, q_bar)
            # Rows that accepted a child keep updating p_row above, but their draw is unused.
            residual = residual.index_copy(0, rows, p_row)
            chosen = chosen.index_copy(0, rows, picked)
        draw = draw_children(residual, 1, replacement=True, generator=generator)[:, 0]  # [N+1]
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
                return TreeResult(tuple(accepted), tuple(ranks), draw[row], True)
            j = chosen[row]
            if j == NO_NODE:
                return TreeResult(tuple(accepted), tuple(ranks), draw[row], False)
            node = children[j]
            accepted.append(node)
            ranks.append(self.tree.rank[node])

    def __call__(
        self, tokens: Tensor, p: Tensor, q: Tensor, generator: torch.Generator | None = None
    ) -> TreeResult:
        return self.result(self.device_result(tokens, p, q, generator).tolist())
