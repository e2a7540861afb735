"""Verification rules: accept a draft candidate or emit a correction, so output ~ p exactly.

Glossary (one decoding step emits ``accepted + 1`` tokens):
- p: the target's (warped) distribution at a tree node; q: the draft distribution that node's
  children were drawn from.
- accepted token: a candidate the rule keeps; the walk then descends into that child.
- correction token: drawn from the residual distribution after every candidate of a node was
  rejected (for ``greedy`` it is the target argmax).
- bonus token: drawn from p at an accepted leaf (every candidate on the path was accepted).

Rules at one node with candidates c_1..c_k, visited in the order they were sampled (DESIGN 3):
- ``sps``      (k = 1) accept c w.p. min(1, p(c)/q(c)); else correct from norm(max(0, p - q)).
- ``mcss``     c_i iid ~ q. Accept c_i w.p. min(1, p(c_i)/q(c_i)); else p <- norm(max(0, p - q)).
- ``mcss-wor`` c_i ~ qbar_{i-1} (q without c_1..c_{i-1}, renormalised). Accept c_i w.p.
               min(1, p(c_i)/qbar_{i-1}(c_i)); else p <- norm(max(0, p - qbar_{i-1})).
- ``topk``     deterministic candidates (q one-hot at each): accept c_i w.p. p(c_i); else
               p[c_i] <- 0 and renormalise.
- ``mcns``     naive: y ~ p, accept the first c_i equal to y, else emit y. Implemented as the
               ``topk`` recursion, which has exactly that outcome distribution (P(accept c_i) =
               p(c_i) for the first occurrence of each token; otherwise y ~ p off the candidates).
- ``greedy``   accept the child equal to argmax p, else emit argmax p.
In every case the last residual p is the correction distribution.

Beyond the paper (issue 7; each class docstring below gives the proof idea):
- ``kseq``      SpecTr's K-SEQ (c_i iid ~ q): accept c_i w.p. min(1, p(c_i) / (rho q(c_i))) with
                one rho per node (``mcsd.optimal.kseq_rho``); all rejected: the K-SEQ residual.
- ``optimal``   c_i iid ~ q: the optimal transport. Select one candidate with the plan of
                ``mcsd.optimal.transport_plan`` (selection marginal r), then single-draft
                speculative sampling of p against r. Acceptance = alpha*, the bound.
- ``traversal`` Traversal Verification (Weng et al. 2025): sequence-level, leaf to root, over the
                whole tree (``verify_tree``); siblings drawn without replacement. At a single
                node it is ``mcss-wor``.

The sequential rules are two pure functions on float64 tensors: the probability of accepting
the current candidate given that the earlier ones were rejected, and the state update after a
rejection. Every rule is a ``NodeRule``: ``verify`` flips the coins, ``outcome`` computes the
exact outcome distribution for fixed candidates (what the exact enumeration tests and
``mcsd check`` use); ``verify_node`` and ``node_outcome`` dispatch on the rule name.

Numerics: a candidate with q(c) = 0 is rejected (it cannot have been drawn from q; dividing
would give NaN); a residual whose mass is zero in exact arithmetic (p = q) can only be reached
through such measure-zero events, and then p is kept unchanged. This module imports only torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from mcsd.config import RULES, check_rule
from mcsd.optimal import TransportPlan, kseq_rho, transport_plan
from mcsd.sampling import normalize, sample, uniform
from mcsd.tree import ROOT, TokenTree

NONE_ACCEPTED = -1  # NodeResult.accepted when every candidate was rejected
DISTRIBUTION_TOLERANCE = 1e-3  # |sum - 1| allowed for float32 softmax over large vocabularies
RULES_WITHOUT_Q = ("greedy", "topk", "mcns")


@dataclass(frozen=True)
class NodeResult:
    accepted: int  # index into candidates, or NONE_ACCEPTED
    token: int  # the accepted candidate, or the correction token


@dataclass
class _State:
    """Mutable per-node state of the sequential rules (local to one call)."""

    p: Tensor  # [V] float64, the current residual target distribution
    q: Tensor | None  # [V] float64, the current draft distribution (qbar for mcss-wor)


# ---------------------------------------------------------------- the rules, one pair each
def _ratio(state: _State, c: int) -> float:
    assert state.q is not None
    qc = float(state.q[c])
    if qc <= 0.0:
        return 0.0  # q(c) = 0: c cannot have been drawn from q; reject rather than divide by 0
    return min(1.0, float(state.p[c]) / qc)


def _subtract_q(state: _State, c: int) -> None:
    assert state.q is not None
    residual = normalize(torch.clamp(state.p - state.q, min=0.0))
    if residual is not None:
        state.p = residual


def _subtract_q_then_remove(state: _State, c: int) -> None:
    _subtract_q(state, c)
    assert state.q is not None
    qbar = state.q.clone()
    qbar[c] = 0.0
    state.q = normalize(qbar)
    if state.q is None:
        state.q = qbar  # all of q's support was drawn: later candidates have qbar = 0


def _p_of_candidate(state: _State, c: int) -> float:
    return float(state.p[c])


def _remove_from_p(state: _State, c: int) -> None:
    removed = state.p.clone()
    removed[c] = 0.0
    residual = normalize(removed)
    if residual is not None:
        state.p = residual


def _is_argmax(state: _State, c: int) -> float:
    return 1.0 if int(state.p.argmax()) == c else 0.0


def _unchanged(state: _State, c: int) -> None:
    return None


def _coin(a: float, generator: torch.Generator | None, device: torch.device) -> bool:
    """True with probability ``a``; a uniform is drawn only when 0 < a < 1."""
    return a >= 1.0 or (a > 0.0 and uniform(generator, device) < a)


_AcceptFn = Callable[[_State, int], float]
_RejectFn = Callable[[_State, int], None]


class NodeRule:
    """How one rule verifies the k candidates of one node (``candidates`` are token ids in the
    order they were sampled; p and q are ``[V]``)."""

    def verify(
        self, p: Tensor, q: Tensor | None, candidates: list[int], generator: torch.Generator | None
    ) -> NodeResult:
        raise NotImplementedError

    def outcome(self, p: Tensor, q: Tensor | None, candidates: list[int]) -> tuple[Tensor, Tensor]:
        """``accept`` ``[k]`` float64 (P(candidate i is the accepted one)) and ``correction``
        ``[V]`` float64 (P(every candidate rejected and this correction token))."""
        raise NotImplementedError


class _Sequential(NodeRule):
    """Visit the candidates in order: accept the current one with ``accept_fn``, else update the
    state with ``reject_fn``; after the last rejection, correct from the state's residual p."""

    def __init__(self, name: str, accept_fn: _AcceptFn, reject_fn: _RejectFn) -> None:
        self.name = name
        self.accept_fn = accept_fn
        self.reject_fn = reject_fn

    def _state(self, p: Tensor, q: Tensor | None) -> _State:
        return _State(p.double(), None if q is None or self.name in RULES_WITHOUT_Q else q.double())

    def verify(self, p, q, candidates, generator):
        state = self._state(p, q)
        for i, c in enumerate(candidates):
            a = self.accept_fn(state, c)
            if _coin(a, generator, p.device):
                return NodeResult(i, c)
            self.reject_fn(state, c)
        return NodeResult(NONE_ACCEPTED, _correction(self.name, state.p, generator))

    def outcome(self, p, q, candidates):
        state = self._state(p, q)
        accept = torch.zeros(len(candidates), dtype=torch.float64)
        reach = 1.0  # probability that every earlier candidate was rejected
        for i, c in enumerate(candidates):
            a = self.accept_fn(state, c)
            accept[i] = reach * a
            reach *= 1.0 - a
            if reach <= 0.0:
                break
            self.reject_fn(state, c)
        if self.name == "greedy":
            residual = torch.zeros_like(state.p)
            residual[int(state.p.argmax())] = 1.0
        else:
            residual = state.p
        return accept, reach * residual.cpu()


class _PlanCache:
    """Per-node plans keyed by (p, q, k) for small vocabularies: the exact enumeration calls
    ``outcome`` once per candidate tuple with the same (p, q)."""

    MAX_VOCAB = 4096
    MAX_ENTRIES = 64

    def __init__(self, build: Callable[[Tensor, Tensor, int], object]) -> None:
        self.build = build
        self.entries: dict[tuple[bytes, bytes, int], object] = {}

    def __call__(self, p: Tensor, q: Tensor, k: int):  # returns the plan build() makes
        if p.shape[-1] > self.MAX_VOCAB:
            return self.build(p, q, k)
        key = (p.double().cpu().numpy().tobytes(), q.double().cpu().numpy().tobytes(), k)
        plan = self.entries.get(key)
        if plan is None:
            if len(self.entries) >= self.MAX_ENTRIES:
                self.entries.clear()
            plan = self.entries[key] = self.build(p, q, k)
        return plan


class _KSeq(NodeRule):
    """SpecTr's K-SEQ (Sun et al., NeurIPS 2023) for k iid candidates from q.

    Proof idea: every candidate is accepted with the same a(x) = min(1, p(x) / (rho q(x))), so
    step i accepts token x with probability (1 - beta)^(i-1) min(q(x), p(x) / rho), beta =
    sum_x min(q(x), p(x) / rho). Summed over the k steps, token x is accepted with probability
    m(x) = min(q(x), p(x) / rho) (1 - (1 - beta)^k) / beta, which is <= p(x) exactly when
    1 - (1 - beta)^k <= rho beta (``kseq_rho`` takes the smallest such rho >= 1). Every
    candidate rejected, probability (1 - beta)^k, the correction comes from
    (p - m) / (1 - beta)^k >= 0, so the emitted token is p. Acceptance 1 - (1 - beta)^k, within
    a factor 1 - 1/e of alpha*; rho = 1 for k = 1 (SpS).

    Cost per node: ~7-10 passes over the vocabulary to find rho (bench/rule_cost.py, V = 151,936,
    k = 4: ~27 ms on one CPU core, ~2 ms on an H100; mcss-wor: ~0.5 / 0.3 ms)."""

    name = "kseq"

    def __init__(self) -> None:
        self._plan = _PlanCache(self._build)

    @staticmethod
    def _build(p: Tensor, q: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """Accept probability ``[V]``, residual ``[V]`` and P(all rejected) as a 0-dim tensor."""
        p64, q64 = p.double(), q.double()
        p64, q64 = p64 / p64.sum(), q64 / q64.sum()  # float32 softmax: off by ~1e-6
        rho = kseq_rho(p64, q64, k)
        kept = torch.minimum(q64, p64 / rho)  # [V] min(q, p / rho)
        beta = kept.sum()
        accept = torch.where(q64 > 0, kept / torch.where(q64 > 0, q64, 1.0), 0.0)  # [V]
        none = (1.0 - beta).clamp(min=0.0) ** k  # P(every candidate rejected)
        if float(beta) <= 0.0:
            return accept, p64, none
        accepted = kept * (1.0 - none) / beta  # [V] m(x) above
        residual = normalize(torch.clamp(p64 - accepted, min=0.0))
        return accept, p64 if residual is None else residual, none

    def verify(self, p, q, candidates, generator):
        assert q is not None
        accept, residual, _ = self._plan(p, q, len(candidates))
        for i, c in enumerate(candidates):
            a = float(accept[c])
            if _coin(a, generator, p.device):
                return NodeResult(i, c)
        return NodeResult(NONE_ACCEPTED, sample(residual, generator))

    def outcome(self, p, q, candidates):
        assert q is not None
        accept_of, residual, _ = self._plan(p, q, len(candidates))
        accept = torch.zeros(len(candidates), dtype=torch.float64)
        reach = 1.0
        for i, c in enumerate(candidates):
            a = float(accept_of[c])
            accept[i] = reach * a
            reach *= 1.0 - a
        return accept, reach * residual.cpu()


class _Optimal(NodeRule):
    """The optimal transport for k iid candidates from q (``mcsd.optimal``).

    Proof idea: the plan selects one candidate so that the selected token has a known marginal
    r (``TransportPlan.selection``, computed from the plan actually used, so exact); accepting
    the selected token z with min(1, p(z) / r(z)) and otherwise emitting from
    norm(max(0, p - r)) emits min(p, r) + max(0, p - r) = p (single-draft speculative sampling
    with r as the draft). The plan's r is the lexicographically optimal base of the coverage
    polymatroid, for which sum min(p, r) = alpha* = 1 - max_H [q(H)^k - p(H)]: no lossless rule
    accepts more (max-flow/min-cut; with more than ``MAX_ATOMS`` candidate tokens light ones are
    pooled and the gap to alpha* is ~1e-5 relative on real distributions).

    Candidates must be drawn with replacement (iid): the selection probabilities assume it.
    A candidate with q(c) = 0 cannot have been drawn and is never selected.

    Cost per node: O(V) tensor work (a top-k, a few bincounts) and O(A log A) Python work for
    A <= ``MAX_ATOMS`` atoms (bench/rule_cost.py, V = 151,936, k = 4: ~18 ms on one CPU core,
    ~12 ms on an H100, where host round trips dominate)."""

    name = "optimal"

    def __init__(self) -> None:
        self.plan: Callable[[Tensor, Tensor, int], TransportPlan] = _PlanCache(transport_plan)

    def verify(self, p, q, candidates, generator):
        assert q is not None
        plan = self.plan(p, q, len(candidates))
        chosen = plan.select(candidates, generator)
        p64 = p.double().cpu()
        p64 = p64 / p64.sum()
        if chosen is None:  # no candidate could have been drawn from q: emit from p itself
            return NodeResult(NONE_ACCEPTED, sample(p, generator))
        token = candidates[chosen]
        a = _ratio_of(float(p64[token]), float(plan.selection[token]))
        if _coin(a, generator, p.device):
            return NodeResult(chosen, token)
        residual = _optimal_residual(p64, plan.selection).to(p.device)  # the generator's device
        return NodeResult(NONE_ACCEPTED, sample(residual, generator))

    def outcome(self, p, q, candidates):
        assert q is not None
        plan = self.plan(p, q, len(candidates))
        p64 = p.double().cpu()
        p64 = p64 / p64.sum()
        selected = plan.selection_probabilities(candidates)
        accept = torch.zeros(len(candidates), dtype=torch.float64)
        for i, (c, s) in enumerate(zip(candidates, selected, strict=True)):
            accept[i] = s * _ratio_of(float(p64[c]), float(plan.selection[c]))
        rejected = max(0.0, 1.0 - float(accept.sum()))
        if sum(selected) <= 0.0:
            return accept, p64.clone()
        return accept, rejected * _optimal_residual(p64, plan.selection)


def _ratio_of(p: float, r: float) -> float:
    """min(1, p / r); 0 for r = 0 (a token the plan never selects)."""
    return 0.0 if r <= 0.0 else min(1.0, p / r)


def _optimal_residual(p: Tensor, selection: Tensor) -> Tensor:
    residual = normalize(torch.clamp(p - selection, min=0.0))
    return p if residual is None else residual


_NODE_RULES: dict[str, NodeRule] = {
    "sps": _Sequential("sps", _ratio, _subtract_q),
    "mcss": _Sequential("mcss", _ratio, _subtract_q),
    "mcss-wor": _Sequential("mcss-wor", _ratio, _subtract_q_then_remove),
    "topk": _Sequential("topk", _p_of_candidate, _remove_from_p),
    "mcns": _Sequential("mcns", _p_of_candidate, _remove_from_p),
    "greedy": _Sequential("greedy", _is_argmax, _unchanged),
    "kseq": _KSeq(),
    "optimal": _Optimal(),
    # one node of a traversal is mcss-wor; the tree walk differs (verify_tree, _traverse)
    "traversal": _Sequential("traversal", _ratio, _subtract_q_then_remove),
}
assert tuple(_NODE_RULES) == RULES


def _correction(rule: str, residual: Tensor, generator: torch.Generator | None) -> int:
    if rule == "greedy":
        return int(residual.argmax())
    return sample(residual, generator)


# ---------------------------------------------------------------- one node
def verify_node(
    rule: str,
    p: Tensor,  # [V] target distribution at the node
    q: Tensor | None,  # [V] draft distribution the candidates were drawn from
    candidates: Tensor,  # [k] long, in the order they were sampled
    generator: torch.Generator | None = None,
) -> NodeResult:
    """Run ``rule`` at one node: accept one candidate or emit a correction token."""
    return _verify_node(rule, p, q, _check_inputs(rule, p, q, candidates), generator)


def _verify_node(
    rule: str, p: Tensor, q: Tensor | None, candidates: list[int], generator: torch.Generator | None
) -> NodeResult:
    return _NODE_RULES[rule].verify(p, q, candidates, generator)


def node_outcome(
    rule: str,
    p: Tensor,  # [V]
    q: Tensor | None,  # [V]
    candidates: Tensor,  # [k] long
) -> tuple[Tensor, Tensor]:
    """Exact outcome distribution of ``verify_node`` for fixed candidates.

    Returns ``accept`` ``[k]`` float64 (probability that candidate i is the accepted one) and
    ``correction`` ``[V]`` float64 (probability of each correction token, times the probability
    that every candidate was rejected).
    """
    tokens = _check_inputs(rule, p, q, candidates)
    return _NODE_RULES[rule].outcome(p, q, tokens)


# ---------------------------------------------------------------- the tree walk
@dataclass(frozen=True)
class TreeResult:
    accepted: tuple[int, ...]  # accepted node indices, root side first
    ranks: tuple[int, ...]  # sibling rank of each accepted node
    token: int  # the correction token, or the bonus token after an accepted leaf
    bonus: bool  # True when ``token`` is a bonus token


def verify_tree(
    tree: TokenTree,
    tokens: Tensor,  # [N] long, the candidate token of every node
    p: Tensor,  # [N+1, V] target distribution at the root (row 0) and after every node
    q: Tensor | None,  # [N+1, V] draft distribution each row's children were drawn from
    rule: str,
    generator: torch.Generator | None = None,
) -> TreeResult:
    """Walk ``tree`` from the root, verifying each node's children with ``rule``."""
    n = tree.num_nodes
    _check_distributions(rule, p, None, rows=n + 1, need_q=False)
    if q is not None:
        if not isinstance(q, Tensor) or q.dim() != 2 or len(q) != n + 1:
            shape = tuple(q.shape) if isinstance(q, Tensor) else type(q).__name__
            raise ValueError(f"q must have shape [{n + 1}, V], got {shape}")
        # Only rows whose children were drawn are read (the engine leaves leaf rows empty).
        inner = [0] + [u + 1 for u in range(n) if tree.children(u)]
        _check_distributions(rule, p[inner], q[inner], rows=len(inner))
    elif rule not in RULES_WITHOUT_Q:
        raise ValueError(f"rule {rule!r} needs the draft distribution q (got None)")
    if rule == "sps" and tree.max_children != 1:
        raise ValueError(
            f"rule 'sps' verifies one candidate per node, but tree {tree.describe()} has nodes "
            f"with {tree.max_children} children"
        )
    if not isinstance(tokens, Tensor) or tokens.shape != (n,):
        shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
        raise ValueError(f"tokens must have shape [{n}] (one per tree node), got {shape}")
    node_tokens = _check_token_ids("tokens", tokens, p.shape[-1])
    if rule == "traversal":
        return _traverse(tree, node_tokens, p, q, generator)
    accepted: list[int] = []
    ranks: list[int] = []
    node = ROOT
    while True:
        children = tree.children(node)
        row = node + 1
        if not children:
            bonus = _correction(rule, p[row], generator)
            return TreeResult(tuple(accepted), tuple(ranks), bonus, True)
        result = _verify_node(
            rule,
            p[row],
            None if q is None else q[row],
            [node_tokens[c] for c in children],
            generator,
        )
        if result.accepted == NONE_ACCEPTED:
            return TreeResult(tuple(accepted), tuple(ranks), result.token, False)
        node = children[result.accepted]
        accepted.append(node)
        ranks.append(result.accepted)


def _traverse(
    tree: TokenTree,
    node_tokens: list[int],
    p: Tensor,  # [N+1, V]
    q: Tensor | None,  # [N+1, V]
    generator: torch.Generator | None,
) -> TreeResult:
    """Traversal Verification (Weng et al., NeurIPS 2025): sequence-level acceptance, deciding
    each subtree from its leaves up before its parent.

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
            removed = qbar.clone()
            removed[b] = 0.0
            qbar = normalize(removed)
            if qbar is None:
                qbar = removed  # the draft's support is exhausted: later children have q = 0
        mass = float(mu.sum())
        if mass >= 1.0 or uniform(generator, device) < mass:
            residual = normalize(mu)
            return True, [], [], sample(p[row] if residual is None else residual, generator), False
        return False, [], [], -1, False

    _, path, ranks, token, bonus = visit(ROOT, 1.0)
    return TreeResult(tuple(path), tuple(ranks), token, bonus)


# ---------------------------------------------------------------- validation
# verify_node runs once per tree node and per Monte Carlo trial of ``mcsd check``, so the checks
# below use few tensor reductions (each costs a few microseconds of dispatch on small vectors).
def _check_inputs(rule: str, p: Tensor, q: Tensor | None, candidates: Tensor) -> list[int]:
    """Validate one node's inputs; return the candidates as a list of ints."""
    check_rule(rule)
    _check_distributions(rule, p, q, rows=None)
    if not isinstance(candidates, Tensor) or candidates.dim() != 1 or candidates.numel() < 1:
        raise ValueError("candidates must be a non-empty LongTensor[k]")
    tokens = _check_token_ids("candidates", candidates, p.shape[-1])
    if rule == "sps" and len(tokens) != 1:
        raise ValueError(f"rule 'sps' takes exactly one candidate, got k={len(tokens)}")
    return tokens


def _check_token_ids(name: str, ids: Tensor, vocab: int) -> list[int]:
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    values = ids.tolist()
    if values and (min(values) < 0 or max(values) >= vocab):
        raise ValueError(f"{name} must be token ids in [0, {vocab}), got {values}")
    return values


def _check_distributions(
    rule: str, p: Tensor, q: Tensor | None, rows: int | None, need_q: bool = True
) -> None:
    check_rule(rule)
    expected = "[V]" if rows is None else f"[{rows}, V]"
    dims = 1 if rows is None else 2
    for name, x in (("p", p), ("q", q)):
        if x is None:
            if name == "q" and need_q and rule not in RULES_WITHOUT_Q:
                raise ValueError(f"rule {rule!r} needs the draft distribution q (got None)")
            continue
        if (
            not isinstance(x, Tensor)
            or x.dim() != dims
            or x.shape[-1] == 0
            or (rows is not None and len(x) != rows)
        ):
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} must have shape {expected}, got {shape}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point probability tensor, got {x.dtype}")
        if x.shape[-1] != p.shape[-1]:
            raise ValueError(
                f"p and q must share the vocabulary size: {p.shape[-1]} vs {x.shape[-1]}"
            )
        # min and sum propagate NaN; an infinite entry makes the sum infinite.
        lowest = float(x.min())
        sums = x.sum(dim=-1, dtype=torch.float64)  # [] or [rows]
        worst = abs(float(sums) - 1.0) if rows is None else float((sums - 1.0).abs().max())
        if not lowest >= 0.0 or not math.isfinite(worst):
            raise ValueError(f"{name} must have finite, non-negative entries")
        if worst > DISTRIBUTION_TOLERANCE:
            raise ValueError(f"{name} must sum to 1 (probability vectors); off by {worst:.6f}")
