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

Each rule is two pure functions on float64 tensors: the probability of accepting the current
candidate given that the earlier ones were rejected, and the state update after a rejection.
``verify_node`` flips the coins; ``node_outcome`` computes the exact outcome distribution from
the same two functions, which is what the exact enumeration tests and ``mcsd check`` use.

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


_AcceptFn = Callable[[_State, int], float]
_RejectFn = Callable[[_State, int], None]
_RULES: dict[str, tuple[_AcceptFn, _RejectFn]] = {
    "sps": (_ratio, _subtract_q),
    "mcss": (_ratio, _subtract_q),
    "mcss-wor": (_ratio, _subtract_q_then_remove),
    "topk": (_p_of_candidate, _remove_from_p),
    "mcns": (_p_of_candidate, _remove_from_p),
    "greedy": (_is_argmax, _unchanged),
}
assert tuple(_RULES) == RULES


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
    accept_fn, reject_fn = _RULES[rule]
    state = _State(p.double(), None if q is None or rule in RULES_WITHOUT_Q else q.double())
    for i, c in enumerate(candidates):
        a = accept_fn(state, c)
        if a >= 1.0 or (a > 0.0 and uniform(generator, p.device) < a):
            return NodeResult(i, c)
        reject_fn(state, c)
    return NodeResult(NONE_ACCEPTED, _correction(rule, state.p, generator))


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
    accept_fn, reject_fn = _RULES[rule]
    state = _State(p.double(), None if q is None or rule in RULES_WITHOUT_Q else q.double())
    accept = torch.zeros(len(tokens), dtype=torch.float64)
    reach = 1.0  # probability that every earlier candidate was rejected
    for i, c in enumerate(tokens):
        a = accept_fn(state, c)
        accept[i] = reach * a
        reach *= 1.0 - a
        if reach <= 0.0:
            break
        reject_fn(state, c)
    if rule == "greedy":
        residual = torch.zeros_like(state.p)
        residual[int(state.p.argmax())] = 1.0
    else:
        residual = state.p
    return accept, reach * residual.cpu()


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
