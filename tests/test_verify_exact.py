"""Exact tests of the verification rules (DESIGN 4): no sampling, only enumeration.

1. A pure-Python reference of each rule (written from DESIGN 3, enumerating the accept coins;
   ``mcns`` and ``greedy`` straight from their definitions, ``kseq`` from SpecTr's) must agree
   with ``mcsd.verify.node_outcome`` on arbitrary candidates, duplicates and q(c) = 0 included.
   ``optimal`` has no closed-form reference: tests/test_rules_optimal.py checks it against a
   linear program and an exact enumeration of its selection.
2. For V in 2..6 and k in 1..4, random (p, q) pairs (Dirichlet, with zeros, p = q, disjoint
   supports, one-hot p, one-hot q): enumerate every candidate tuple with its probability under
   the rule's candidate sampling (``mcsd.check.exact_outcome``) and check the emitted-token
   distribution equals p (one-hot argmax p for greedy) to 1e-9.
3. Closed forms of the acceptance probability where they exist, and monotonicity in k.
4. The enumeration is able to fail: known-wrong setups give a visibly different distribution.
"""

from __future__ import annotations

import itertools
from collections import defaultdict

import pytest
import torch
from torch import Tensor

from mcsd.checks.node import RULE_SCHEME, candidate_tuples, exact_outcome
from mcsd.verify import RULE_NAMES as RULES
from mcsd.verify import node_outcome, verify_node

TOLERANCE = 1e-9
KINDS = ("dirichlet", "zeros", "p=q", "disjoint", "one-hot-p", "one-hot-q")
DRAWS_PER_KIND = 2


# ---------------------------------------------------------------- random (p, q) pairs
def random_distribution(vocab: int, generator: torch.Generator, support: list[int]) -> Tensor:
    """Dirichlet(1) on ``support``, float64 ``[V]``."""
    weights = torch.zeros(vocab, dtype=torch.float64)
    draws = -torch.log1p(-torch.rand(len(support), generator=generator, dtype=torch.float64))
    weights[support] = draws
    return weights / weights.sum()


def random_pair(kind: str, vocab: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    tokens = torch.randperm(vocab, generator=generator).tolist()
    everything = list(range(vocab))
    if kind == "dirichlet":
        return random_distribution(vocab, generator, everything), random_distribution(
            vocab, generator, everything
        )
    if kind == "zeros":  # random supports of random sizes
        size_p = int(torch.randint(1, vocab + 1, (), generator=generator))
        size_q = int(torch.randint(1, vocab + 1, (), generator=generator))
        q_tokens = torch.randperm(vocab, generator=generator).tolist()[:size_q]
        p = random_distribution(vocab, generator, tokens[:size_p])
        return p, random_distribution(vocab, generator, q_tokens)
    if kind == "p=q":
        p = random_distribution(vocab, generator, everything)
        return p, p.clone()
    if kind == "disjoint":
        cut = int(torch.randint(1, vocab, (), generator=generator))
        p = random_distribution(vocab, generator, tokens[:cut])
        return p, random_distribution(vocab, generator, tokens[cut:])
    if kind == "one-hot-p":
        return random_distribution(vocab, generator, tokens[:1]), random_distribution(
            vocab, generator, everything
        )
    if kind == "one-hot-q":
        return random_distribution(vocab, generator, everything), random_distribution(
            vocab, generator, tokens[:1]
        )
    raise AssertionError(kind)


def pairs(vocab: int, seed: int) -> list[tuple[str, Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (kind, *random_pair(kind, vocab, generator))
        for kind in KINDS
        for _ in range(DRAWS_PER_KIND)
    ]


def can_draw(rule: str, q: Tensor, k: int) -> bool:
    """Whether the rule's candidate scheme can draw k candidates from q."""
    scheme = RULE_SCHEME[rule]
    if scheme == "wor":
        return int((q > 0).sum()) >= k
    return scheme == "iid" or k <= q.shape[-1]


def rule_ks(rule: str) -> range:
    return range(1, 2) if rule == "sps" else range(1, 5)


# ---------------------------------------------------------------- the reference rules
Outcome = dict[tuple[str, int], float]  # ("accept", i) or ("emit", token) -> probability


def _normalised(weights: list[float]) -> list[float] | None:
    total = sum(weights)
    return None if total <= 1e-12 else [w / total for w in weights]


def kseq_reference(p: list[float], q: list[float], k: int) -> tuple[list[float], list[float]]:
    """SpecTr's K-SEQ from its definition: the per-candidate acceptance min(1, p / (rho q)) and
    the residual, with rho the smallest value >= 1 (to 1e-13) at which the residual is >= 0."""

    def accepted(rho: float) -> tuple[list[float], float]:
        kept = [min(b, a / rho) for a, b in zip(p, q, strict=True)]
        beta = sum(kept)
        scale = (1.0 - (1.0 - beta) ** k) / beta if beta > 0 else 0.0
        return [x * scale for x in kept], beta

    low, high = 1.0, float(k)
    if all(m <= a + 1e-15 for m, a in zip(accepted(1.0)[0], p, strict=True)):
        high = 1.0
    while high - low > 1e-13:
        middle = 0.5 * (low + high)
        ok = all(m <= a + 1e-15 for m, a in zip(accepted(middle)[0], p, strict=True))
        low, high = (low, middle) if ok else (middle, high)
    mass, beta = accepted(high)
    accept = [0.0 if b == 0.0 else min(1.0, a / (high * b)) for a, b in zip(p, q, strict=True)]
    if beta <= 0.0:
        return accept, list(p)
    residual = _normalised([max(0.0, a - m) for a, m in zip(p, mass, strict=True)]) or list(p)
    return accept, residual


def reference_outcome(rule: str, p: list[float], q: list[float], cands: list[int]) -> Outcome:
    """Every outcome of one node with its probability, by walking the accept/reject coins."""
    outcome: Outcome = defaultdict(float)
    if rule == "kseq":  # the same acceptance for every candidate, one residual at the end
        accept, residual = kseq_reference(p, q, len(cands))
        reach = 1.0
        for i, c in enumerate(cands):
            outcome[("accept", i)] += reach * accept[c]
            reach *= 1.0 - accept[c]
        for token, prob in enumerate(residual):
            outcome[("emit", token)] += reach * prob
        return outcome
    if rule == "traversal":
        rule = "mcss-wor"  # at one node Traversal Verification is MCSS without replacement
    if rule in ("mcns", "greedy"):
        # the definitions: y ~ p (greedy: y = argmax p); accept the first c_i == y, else emit y
        ys = [(p.index(max(p)), 1.0)] if rule == "greedy" else list(enumerate(p))
        for y, prob in ys:
            outcome[("accept", cands.index(y)) if y in cands else ("emit", y)] += prob
        return outcome

    def visit(i: int, p: list[float], q: list[float], reach: float) -> None:
        if i == len(cands):  # every candidate rejected: correction from the residual p
            for token, prob in enumerate(p):
                outcome[("emit", token)] += reach * prob
            return
        c = cands[i]
        if rule == "topk":  # q is one-hot at c, so min(1, p(c) / q(c)) = p(c)
            accept = p[c]
        elif q[c] == 0.0:  # c cannot have come from q: reject
            accept = 0.0
        else:
            accept = min(1.0, p[c] / q[c])
        outcome[("accept", i)] += reach * accept
        if accept == 1.0:
            return
        if rule == "topk":  # max(0, p - onehot(c)) = p without c
            p_next = _normalised([0.0 if t == c else w for t, w in enumerate(p)]) or p
            q_next = q
        else:
            p_next = _normalised([max(0.0, a - b) for a, b in zip(p, q, strict=True)]) or p
            q_next = q
            if rule == "mcss-wor":  # the next candidate came from q without c
                q_next = _normalised([0.0 if t == c else w for t, w in enumerate(q)])
                q_next = q_next or [0.0] * len(q)
        visit(i + 1, p_next, q_next, reach * (1.0 - accept))

    visit(0, p, q, 1.0)
    return outcome


def outcome_of_node(rule: str, p: Tensor, q: Tensor, cands: list[int]) -> Outcome:
    accept, correction = node_outcome(rule, p, q, torch.tensor(cands))
    outcome: Outcome = defaultdict(float)
    for i, prob in enumerate(accept.tolist()):
        outcome[("accept", i)] += prob
    for token, prob in enumerate(correction.tolist()):
        outcome[("emit", token)] += prob
    return outcome


def assert_same_outcome(
    actual: Outcome, expected: Outcome, context: str, tolerance: float = TOLERANCE
) -> None:
    for key in set(actual) | set(expected):
        difference = abs(actual.get(key, 0.0) - expected.get(key, 0.0))
        assert difference <= tolerance, f"{context}: {key} {actual.get(key)} vs {expected.get(key)}"


REFERENCE_RULES = tuple(rule for rule in RULES if rule != "optimal")


@pytest.mark.parametrize("rule", REFERENCE_RULES)
def test_node_outcome_matches_reference(rule: str) -> None:
    generator = torch.Generator().manual_seed(10)
    checked = 0
    for vocab in range(2, 7):
        for kind, p, q in pairs(vocab, seed=vocab):
            for k in rule_ks(rule):
                for _ in range(4):  # arbitrary candidates: duplicates and q(c) = 0 included
                    cands = torch.randint(vocab, (k,), generator=generator).tolist()
                    expected = reference_outcome(rule, p.tolist(), q.tolist(), cands)
                    actual = outcome_of_node(rule, p, q, cands)
                    # kseq's reference finds rho by bisection to 1e-13, not to the last ulp
                    tolerance = 1e-7 if rule == "kseq" else TOLERANCE
                    context = f"{rule} {kind} V={vocab} {cands}"
                    assert_same_outcome(actual, expected, context, tolerance)
                    assert sum(actual.values()) == pytest.approx(1.0, abs=TOLERANCE)
                    checked += 1
    assert checked >= 200


def test_reference_can_disagree() -> None:
    """The comparison is not vacuous: two different rules give different outcomes."""
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    mcss = outcome_of_node("mcss", p, q, [1, 2])
    with pytest.raises(AssertionError):
        assert_same_outcome(mcss, reference_outcome("topk", p.tolist(), q.tolist(), [1, 2]), "")


# ---------------------------------------------------------------- losslessness, exactly
@pytest.mark.parametrize("vocab", range(2, 7))
@pytest.mark.parametrize("rule", RULES)
def test_emitted_distribution_is_the_target(rule: str, vocab: int) -> None:
    checked = 0
    for kind, p, q in pairs(vocab, seed=100 + vocab):
        target = torch.nn.functional.one_hot(p.argmax(), vocab).double() if rule == "greedy" else p
        for k in rule_ks(rule):
            if not can_draw(rule, q, k):
                continue
            tuples = candidate_tuples(RULE_SCHEME[rule], q, k)
            assert sum(prob for _, prob in tuples) == pytest.approx(1.0, abs=TOLERANCE)
            exact = exact_outcome(rule, p, q, k)
            error = float((exact.emitted - target).abs().max())
            assert error <= TOLERANCE, f"{rule} {kind} V={vocab} k={k}: off by {error}"
            assert torch.equal(exact.target, target)
            assert 0.0 <= exact.acceptance <= 1.0 + TOLERANCE
            checked += 1
    assert checked >= len(KINDS)


@pytest.mark.parametrize("vocab", range(2, 7))
def test_arbitrary_fixed_candidates(vocab: int) -> None:
    """topk is lossless for any fixed distinct candidates (duplicates too), mcns for any
    candidates at all, greedy always emits argmax p."""
    one_hot_argmax = torch.eye(vocab, dtype=torch.float64)
    for kind, p, _ in pairs(vocab, seed=200 + vocab)[::DRAWS_PER_KIND]:  # one pair per kind
        for k in range(1, min(4, vocab) + 1):
            for cands in itertools.product(range(vocab), repeat=k):
                candidates = torch.tensor(cands)
                for rule in ("topk", "mcns", "greedy"):
                    accept, correction = node_outcome(rule, p, None, candidates)  # [k], [V]
                    emitted = correction.index_add(0, candidates, accept)  # [V]
                    target = one_hot_argmax[p.argmax()] if rule == "greedy" else p
                    error = float((emitted - target).abs().max())
                    assert error <= TOLERANCE, f"{rule} {kind} {cands}: off by {error}"


def test_float32_inputs_are_lossless_to_float32_precision() -> None:
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 6, generator=generator)
    p, q = torch.softmax(logits, dim=-1)  # float32, as mcsd.sampling.warp returns
    for rule in RULES:
        k = 1 if rule == "sps" else 3
        exact = exact_outcome(rule, p, q, k)
        assert float((exact.emitted - exact.target).abs().max()) < 1e-6


# ---------------------------------------------------------------- acceptance: closed forms
def mcss_acceptance(p: list[float], q: list[float], k: int) -> float:
    """k iid candidates: step i accepts w.p. beta_i = sum min(p_i, q) (the candidate is a fresh
    draw from q, independent of the earlier rejections), then p_{i+1} = norm(max(0, p_i - q))."""
    rejected = 1.0
    for _ in range(k):
        rejected *= 1.0 - sum(min(a, b) for a, b in zip(p, q, strict=True))
        p = _normalised([max(0.0, a - b) for a, b in zip(p, q, strict=True)]) or p
    return 1.0 - rejected


@pytest.mark.parametrize("vocab", range(2, 7))
def test_acceptance_closed_forms(vocab: int) -> None:
    for kind, p, q in pairs(vocab, seed=300 + vocab):
        pl, ql = p.tolist(), q.tolist()
        context = f"{kind} V={vocab}"
        # SpS: sum min(p, q)
        sps = exact_outcome("sps", p, q, 1).acceptance
        assert sps == pytest.approx(float(torch.minimum(p, q).sum()), abs=TOLERANCE), context
        for k in range(1, 5):
            mcss = exact_outcome("mcss", p, q, k).acceptance
            assert mcss == pytest.approx(mcss_acceptance(pl, ql, k), abs=TOLERANCE), context
            # mcns: y ~ p is accepted iff some candidate equals it
            mcns = exact_outcome("mcns", p, q, k).acceptance
            expected = sum(a * (1.0 - (1.0 - b) ** k) for a, b in zip(pl, ql, strict=True))
            assert mcns == pytest.approx(expected, abs=TOLERANCE), context
            if k <= vocab:
                # topk: the recursion telescopes to the p-mass of the candidates
                top = torch.topk(q, k).indices
                topk = exact_outcome("topk", p, q, k).acceptance
                assert topk == pytest.approx(float(p[top].sum()), abs=TOLERANCE), context
                greedy = exact_outcome("greedy", p, q, k).acceptance
                assert greedy == float(int(p.argmax()) in top.tolist()), context


@pytest.mark.parametrize(
    "rule", ["mcss", "mcss-wor", "topk", "mcns", "greedy", "kseq", "optimal", "traversal"]
)
def test_acceptance_never_decreases_with_k(rule: str) -> None:
    for vocab in range(2, 7):
        for kind, p, q in pairs(vocab, seed=400 + vocab):
            rates = [
                exact_outcome(rule, p, q, k).acceptance for k in range(1, 5) if can_draw(rule, q, k)
            ]
            for smaller, larger in itertools.pairwise(rates):
                assert larger >= smaller - TOLERANCE, f"{rule} {kind} V={vocab}: {rates}"


def test_p_equal_q_always_accepts() -> None:
    for vocab in range(2, 7):
        p = pairs(vocab, seed=500 + vocab)[2 * DRAWS_PER_KIND][1]  # a "p=q" draw
        cases = (
            ("sps", [1]),
            ("mcss", [1, 2, 3]),
            ("mcss-wor", [1, 2]),
            ("kseq", [1]),  # k >= 2: rho > 1 even for p = q
            ("optimal", [1, 2, 3]),
            ("traversal", [1, 2]),
        )
        for rule, ks in cases:
            for k in ks:
                assert exact_outcome(rule, p, p, k).acceptance == pytest.approx(1.0, abs=TOLERANCE)


# ---------------------------------------------------------------- one-hot p
@pytest.mark.parametrize("rule", ["greedy", "topk"])
def test_one_hot_p_always_emits_argmax(rule: str) -> None:
    """Whatever the candidates and the coins, with p one-hot the output token is argmax p."""
    for vocab in range(2, 6):
        for hot in range(vocab):
            p = torch.eye(vocab, dtype=torch.float64)[hot]
            for k in range(1, 4):
                for cands in itertools.product(range(vocab), repeat=k):
                    for seed in range(3):
                        generator = torch.Generator().manual_seed(seed)
                        result = verify_node(rule, p, None, torch.tensor(cands), generator)
                        assert result.token == hot
                        expected = cands.index(hot) if hot in cands else -1
                        assert result.accepted == expected


# ---------------------------------------------------------------- the test can fail
def test_softmax_over_top_k_bias_is_visible() -> None:
    """DESIGN 3: verifying the draft's top-k as if sampled from softmax(top-k) is biased."""
    generator = torch.Generator().manual_seed(7)
    worst = 0.0
    for _ in range(20):
        p = random_distribution(6, generator, list(range(6)))
        q = random_distribution(6, generator, list(range(6)))
        top = torch.topk(q, 3).indices
        q_top = torch.zeros_like(q)
        q_top[top] = q[top] / q[top].sum()  # softmax over the top-k logits
        wrong = exact_outcome("mcss-wor", p, q_top, 3, scheme="top", draft=q)
        worst = max(worst, 0.5 * float((wrong.emitted - p).abs().sum()))
    assert worst > 0.05


def test_wor_math_on_iid_candidates_is_visible() -> None:
    generator = torch.Generator().manual_seed(8)
    worst = 0.0
    for _ in range(20):
        p = random_distribution(4, generator, list(range(4)))
        q = random_distribution(4, generator, list(range(4)))
        wrong = exact_outcome("mcss-wor", p, q, 3, scheme="iid")
        worst = max(worst, 0.5 * float((wrong.emitted - p).abs().sum()))
    assert worst > 0.02


@pytest.mark.parametrize("vocab", range(2, 6))
def test_greedy_emits_argmax_for_any_candidates(vocab: int) -> None:
    """Greedy is deterministic: accept the first candidate equal to argmax p, else emit it."""
    for kind, p, q in pairs(vocab, seed=600 + vocab)[::DRAWS_PER_KIND]:
        best = int(p.argmax())
        for k in range(1, 4):
            for cands in itertools.product(range(vocab), repeat=k):
                result = verify_node("greedy", p, q, torch.tensor(cands), torch.Generator())
                assert result.token == best, f"{kind} {cands}"
                assert result.accepted == (cands.index(best) if best in cands else -1)
