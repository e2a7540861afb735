"""The tree walks on the host: accept a path of a token tree, node by node.

- ``walk_path``: from the root, verify each node's children with a node rule
  (``mcsd.verify.node``); descend into the accepted child; stop at the first node whose
  children are all rejected (a correction token) or at a leaf (a bonus token from p). Visits only
  the nodes on the accepted path.
- ``traverse``: Traversal Verification (Weng et al., NeurIPS 2025), a rule of the whole tree
  that decides each subtree from its leaves up before its parent.

Both take the node tokens as a list and p, q as ``[N+1, V]`` (row 0 the root, row u + 1 the
node u; rows of leaves in q are never read). The validated entry point, which picks the walk
from the rule registry, is ``mcsd.verify.rules.verify_tree``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mcsd.sampling import normalize, sample, uniform, warp
from mcsd.tree import ROOT, TokenTree
from mcsd.verify.node import NONE_ACCEPTED, Mixed, NodeRule
from mcsd.verify.residual import remove_token

if TYPE_CHECKING:
    from mcsd.sampling import SamplingConfig


@dataclass(frozen=True, kw_only=True)
class TreeResult:
    accepted: tuple[int, ...]  # accepted node indices, root side first
    ranks: tuple[int, ...]  # sibling rank of each accepted node
    token: int  # the correction token, or the bonus token after an accepted leaf
    bonus: bool  # True when ``token`` is a bonus token


def walk_path(
    tree: TokenTree,
    node_tokens: list[int],
    p: Tensor,  # [N+1, V]
    q: Tensor | None,  # [N+1, V]
    rule: NodeRule,
    generator: torch.Generator | None,
    *,
    fixed: Sequence[int] | None = None,
) -> TreeResult:
    """Walk ``tree`` from the root, verifying each node's children with ``rule``. ``fixed``:
    per row (0 the root, u + 1 node u), how many of its first children are deterministic
    candidates in a tree that mixes them with drawn ones (``mcsd.verify.node.Mixed``)."""
    accepted: list[int] = []
    ranks: list[int] = []
    node = ROOT
    while True:
        children = tree.children(node)
        row = node + 1
        if not children:
            bonus = rule.emitted(p[row], generator)
            return TreeResult(accepted=tuple(accepted), ranks=tuple(ranks), token=bonus, bonus=True)
        node_rule = rule if fixed is None or not fixed[row] else Mixed(rule, fixed[row])
        result = node_rule.verify(
            p[row], None if q is None else q[row], [node_tokens[c] for c in children], generator
        )
        if result.accepted == NONE_ACCEPTED:
            return TreeResult(
                accepted=tuple(accepted), ranks=tuple(ranks), token=result.token, bonus=False
            )
        node = children[result.accepted]
        accepted.append(node)
        ranks.append(result.accepted)


def traverse(
    tree: TokenTree,
    node_tokens: list[int],
    p: Tensor,  # [N+1, V]
    q: Tensor | None,  # [N+1, V]
    rule: NodeRule,
    generator: torch.Generator | None,
) -> TreeResult:
    """Traversal Verification (Weng et al., NeurIPS 2025): sequence-level acceptance, deciding
    each subtree from its leaves up before its parent (``rule`` is unused: the walk is the rule).

    ``visit(u, w)`` accepts node u (the path root..u) with probability exactly w and, when it
    does, emits a continuation after u distributed as the target. Proof by induction on the
    subtree: u's node keeps a target *sub*-measure mu = w p_u (mass w) against the draft qbar
    its children came from. Child c (token b ~ qbar) gets weight min(1, mu(b) / qbar(b)) and is
    visited first (leaf to root): by induction it is accepted with exactly that probability,
    so step i takes min(qbar, mu) of mu. After a rejection mu <- max(0, mu - qbar) / (1 - beta)
    (beta = sum min(mu, qbar), the chance the child was accepted) and, siblings being drawn
    without replacement, b leaves qbar. With no child left u is accepted with probability
    mass(mu) and emits a correction from norm(mu). Total: min(qbar, mu) + (1 - beta) mu' = mu,
    the sub-measure w p_u; at the root w = 1 and the mass stays 1, so a token is always
    emitted. On a chain this is block verification (Sun et al. 2024), the optimal chain rule;
    the weight carries a child's surplus p/q up to its ancestors (0.5 then 4/3 gives 2/3, not
    0.5), and a rejected child's siblings still get their turn.

    Cost: O(V) per visited node; a step may visit every node of the tree (bench/rule_cost.py,
    a 4,2,2 tree over V = 151,936: ~1.9 ms on an H100 against ~1.3 ms for mcss-wor)."""
    assert q is not None
    device = p.device

    def visit(node: int, weight: float) -> tuple[bool, list[int], list[int], int, bool]:
        """(accepted, path below node, sibling ranks on it, emitted token, bonus)."""
        row = node + 1
        children = tree.children(node)
        if not children:  # a leaf: accept with its weight, then a bonus token from p
            if weight >= 1.0 or uniform(generator, device) < weight:
                return True, [], [], sample(p[row], generator), True
            return False, [], [], -1, False
        mu = weight * p[row].double()  # [V] target sub-measure of mass `weight`
        qbar = q[row].double()  # [V] the distribution the next child was drawn from
        for rank, child in enumerate(children):
            b = node_tokens[child]
            qb = float(qbar[b])
            a = 0.0 if qb <= 0.0 else min(1.0, float(mu[b]) / qb)
            if a > 0.0:
                accepted, path, ranks, token, bonus = visit(child, a)
                if accepted:
                    return True, [child, *path], [rank, *ranks], token, bonus
            beta = float(torch.minimum(mu, qbar).sum())
            mu = torch.clamp(mu - qbar, min=0.0)
            if 1.0 - beta > 0.0:
                mu = mu / (1.0 - beta)
            qbar = remove_token(qbar, torch.tensor([b], device=device))
        mass = float(mu.sum())
        if mass >= 1.0 or uniform(generator, device) < mass:
            left = normalize(mu)
            return True, [], [], sample(p[row] if left is None else left, generator), False
        return False, [], [], -1, False

    _, path, ranks, token, bonus = visit(ROOT, 1.0)
    return TreeResult(accepted=tuple(path), ranks=tuple(ranks), token=token, bonus=bonus)


Walk = Callable[
    [TokenTree, list[int], Tensor, "Tensor | None", NodeRule, "torch.Generator | None"], TreeResult
]


class HostTreeVerifier:
    """One step's verification by a walk on the host (the engine's path for the rules without a
    device verifier, and on CPUs): warp the logits into p, walk, return the accepted tokens."""

    def __init__(
        self,
        tree: TokenTree,
        walk: Walk,
        rule: NodeRule,
        target: SamplingConfig,
        *,
        reads_q: bool,
    ) -> None:
        self.tree = tree
        self.walk = walk
        self.rule = rule
        self.target = target
        self.reads_q = reads_q

    def launch(
        self, tokens: Tensor, logits: Tensor, q: Tensor | None, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor, Tensor | None, torch.Generator | None]:
        """``tokens`` ``[N]``, ``logits`` ``[N+1, V]``, ``q`` ``[N+1, V]`` or None: p queued;
        the walk itself (host round trips) is ``finish``."""
        return tokens, warp(logits, self.target), q if self.reads_q else None, generator

    def finish(self, launched) -> tuple[TreeResult, list[int]]:
        tokens, p, q, generator = launched
        node_tokens = tokens.tolist()
        result = self.walk(self.tree, node_tokens, p, q, self.rule, generator)
        return result, [node_tokens[a] for a in result.accepted]
