"""One tree node: the verification math of every rule (DESIGN section 3), as pure functions.

Glossary (one decoding step emits ``accepted + 1`` tokens):
- p: the target's (warped) distribution at a tree node; q: the draft distribution that node's
  children were drawn from.
- accepted token: a candidate the rule keeps; the walk then descends into that child.
- correction token: drawn from the residual distribution after every candidate of a node was
  rejected (for ``greedy`` it is the target argmax).
- bonus token: drawn from p at an accepted leaf (every candidate on the path was accepted).

Rules at one node with candidates c_1..c_k, visited in the order they were sampled:
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
- ``kseq``     SpecTr's K-SEQ (c_i iid ~ q): accept c_i w.p. min(1, p(c_i) / (rho q(c_i))) with
               one rho per node (``mcsd.verify.optimal.kseq_rho``); all rejected: its residual.
- ``optimal``  c_i iid ~ q: the optimal transport. Select one candidate with the plan of
               ``mcsd.verify.optimal.transport_plan`` (selection marginal r), then single-draft
               speculative sampling of p against r. Acceptance = alpha*, the bound.
In every case the last residual p is the correction distribution. (``traversal`` is a rule of
the whole tree, ``mcsd.verify.walk``; at a single node it is ``mcss-wor``.)

The sequential rules are pairs of pure functions on float64 tensors: the probability of
accepting the current candidate given that the earlier ones were rejected, and the state update
after a rejection (``mcsd.verify.residual``, shared with the device verifiers). Every rule is a
``NodeRule``: ``verify`` flips the coins, ``outcome`` computes the exact outcome distribution for
fixed candidates (what the exact enumeration tests and ``mcsd check`` use). The registry of
rules, and the dispatch by name, is ``mcsd.verify.rules``.

Numerics: a candidate with q(c) = 0 is rejected (it cannot have been drawn from q; dividing
would give NaN); a residual whose mass is zero in exact arithmetic (p = q) can only be reached
through such measure-zero events, and then p is kept unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from mcsd.sampling import sample, uniform
from mcsd.verify.optimal import TransportPlan, kseq_rho, transport_plan
from mcsd.verify.residual import accept_ratio, one_hot_reject, residual, wor_reject

NONE_ACCEPTED = -1  # NodeResult.accepted when every candidate was rejected


@dataclass(frozen=True, kw_only=True)
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
    return float(accept_ratio(state.p, state.q, _index(c, state.p)))


def _subtract_q(state: _State, c: int) -> None:
    assert state.q is not None
    state.p = residual(state.p, state.q)


def _subtract_q_then_remove(state: _State, c: int) -> None:
    assert state.q is not None
    state.p, state.q = wor_reject(state.p, state.q, _index(c, state.p))


def _p_of_candidate(state: _State, c: int) -> float:
    return float(state.p[c])


def _remove_from_p(state: _State, c: int) -> None:
    state.p = one_hot_reject(state.p, _index(c, state.p))


def _index(c: int, like: Tensor) -> Tensor:
    """Token ``c`` as the ``[1]`` index the residual updates take."""
    return torch.tensor([c], device=like.device)


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

    def emitted(self, residual: Tensor, generator: torch.Generator | None) -> int:
        """The correction token drawn from a residual, or the bonus token drawn from p at an
        accepted leaf: a sample (the argmax for the greedy rule)."""
        return sample(residual, generator)


class _Sequential(NodeRule):
    """Visit the candidates in order: accept the current one with ``accept_fn``, else update the
    state with ``reject_fn``; after the last rejection, correct from the state's residual p.
    ``reads_q=False``: q is not part of the state (deterministic candidates)."""

    def __init__(self, accept_fn: _AcceptFn, reject_fn: _RejectFn, *, reads_q: bool) -> None:
        self.accept_fn = accept_fn
        self.reject_fn = reject_fn
        self.reads_q = reads_q

    def _state(self, p: Tensor, q: Tensor | None) -> _State:
        return _State(p.double(), q.double() if q is not None and self.reads_q else None)

    def verify(self, p, q, candidates, generator):
        state = self._state(p, q)
        for i, c in enumerate(candidates):
            a = self.accept_fn(state, c)
            if _coin(a, generator, p.device):
                return NodeResult(accepted=i, token=c)
            self.reject_fn(state, c)
        return NodeResult(accepted=NONE_ACCEPTED, token=self.emitted(state.p, generator))

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
        return accept, reach * self.correction_distribution(state.p).cpu()

    def correction_distribution(self, residual: Tensor) -> Tensor:
        """The law of ``emitted(residual)``."""
        return residual


class _Greedy(_Sequential):
    """Accept the child equal to argmax p; emit argmax p (the correction and the bonus)."""

    def __init__(self) -> None:
        super().__init__(_is_argmax, _unchanged, reads_q=False)

    def emitted(self, residual, generator):
        return int(residual.argmax())

    def correction_distribution(self, residual):
        return one_hot(residual)


def one_hot(p: Tensor) -> Tensor:
    """float64 ``[V]`` one-hot at the first argmax of ``p``: what the greedy rule emits."""
    target = torch.zeros(p.shape, dtype=torch.float64, device=p.device)
    target[int(p.argmax())] = 1.0
    return target


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
        return accept, residual(p64, accepted), none

    def verify(self, p, q, candidates, generator):
        assert q is not None
        accept, residual, _ = self._plan(p, q, len(candidates))
        for i, c in enumerate(candidates):
            a = float(accept[c])
            if _coin(a, generator, p.device):
                return NodeResult(accepted=i, token=c)
        return NodeResult(accepted=NONE_ACCEPTED, token=sample(residual, generator))

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
    """The optimal transport for k iid candidates from q (``mcsd.verify.optimal``).

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

    def __init__(self) -> None:
        self.plan: Callable[[Tensor, Tensor, int], TransportPlan] = _PlanCache(transport_plan)

    def verify(self, p, q, candidates, generator):
        assert q is not None
        plan = self.plan(p, q, len(candidates))
        chosen = plan.select(candidates, generator)
        p64 = p.double().cpu()
        p64 = p64 / p64.sum()
        if chosen is None:  # no candidate could have been drawn from q: emit from p itself
            return NodeResult(accepted=NONE_ACCEPTED, token=sample(p, generator))
        token = candidates[chosen]
        a = _ratio_of(float(p64[token]), float(plan.selection[token]))
        if _coin(a, generator, p.device):
            return NodeResult(accepted=chosen, token=token)
        left = residual(p64, plan.selection).to(p.device)  # the generator's device
        return NodeResult(accepted=NONE_ACCEPTED, token=sample(left, generator))

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
        return accept, rejected * residual(p64, plan.selection)


def _ratio_of(p: float, r: float) -> float:
    """min(1, p / r); 0 for r = 0 (a token the plan never selects)."""
    return 0.0 if r <= 0.0 else min(1.0, p / r)


class Mixed(NodeRule):
    """A node whose first ``fixed`` children are deterministic candidates (copied from the
    context: q one-hot at each) and whose other children were drawn from q for the rule
    ``drawn``.

    Proof: the deterministic phase is the one-hot rule, which accepts c_i with the residual's
    p'(c_i) and else zeroes c_i: token x is accepted there with probability p(x) for the first
    occurrence of each x among c_1..c_fixed, and otherwise (probability ``reach``) the residual
    p' is p conditioned on not being one of them. The drawn candidates are independent of those
    coins, so running any rule that is lossless for candidates drawn from q against the target
    p' emits p' there; in total p. The drawn candidates may come from any q, the draft's own or
    the draft's with the deterministic tokens removed, as long as the same q is verified."""

    def __init__(self, drawn: NodeRule, fixed: int) -> None:
        self.drawn = drawn
        self.fixed = fixed

    def verify(self, p, q, candidates, generator):
        state = _State(p.double(), None)
        for i, c in enumerate(candidates[: self.fixed]):
            if _coin(_p_of_candidate(state, c), generator, p.device):
                return NodeResult(accepted=i, token=c)
            _remove_from_p(state, c)
        rest = candidates[self.fixed :]
        if not rest:
            return NodeResult(accepted=NONE_ACCEPTED, token=self.drawn.emitted(state.p, generator))
        result = self.drawn.verify(state.p, q, rest, generator)
        if result.accepted == NONE_ACCEPTED:
            return result
        return NodeResult(accepted=result.accepted + self.fixed, token=result.token)

    def outcome(self, p, q, candidates):
        state = _State(p.double(), None)
        accept = torch.zeros(len(candidates), dtype=torch.float64)
        reach = 1.0
        for i, c in enumerate(candidates[: self.fixed]):
            a = _p_of_candidate(state, c)
            accept[i] = reach * a
            reach *= 1.0 - a
            if reach <= 0.0:
                return accept, torch.zeros(p.shape[-1], dtype=torch.float64)
            _remove_from_p(state, c)
        rest = candidates[self.fixed :]
        if not rest:
            return accept, reach * state.p.cpu()
        drawn_accept, correction = self.drawn.outcome(state.p, q, rest)
        accept[self.fixed :] = reach * drawn_accept
        return accept, reach * correction


# The node rules, one object each (a rule of the registry, ``mcsd.verify.rules``, names one).
SPECULATIVE = _Sequential(_ratio, _subtract_q, reads_q=True)  # sps and mcss
WITHOUT_REPLACEMENT = _Sequential(_ratio, _subtract_q_then_remove, reads_q=True)  # mcss-wor
ONE_HOT = _Sequential(_p_of_candidate, _remove_from_p, reads_q=False)  # topk and mcns
GREEDY = _Greedy()
KSEQ = _KSeq()
OPTIMAL = _Optimal()
