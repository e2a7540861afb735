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
