"""The optimal-transport bound alpha* and the rules of issue 7 measured against it.

- alpha* (``mcsd.optimal.alpha_star``) equals the value of the transport linear program (scipy),
  and the scan over p/q sub-level sets equals the maximum over all 2^V token sets, for
  candidates drawn with and without replacement.
- The quadrature for candidates drawn without replacement matches closed forms (k = 2, 3) on a
  1024-token distribution.
- ``optimal`` reaches alpha* exactly (exact enumeration of every candidate tuple), its plan's
  selection marginal is exactly the one it uses (lossless by construction), pooled plans over
  large vocabularies are lossless and within 1e-4 of alpha*.
- ``kseq`` has SpecTr's closed-form acceptance and its (1 - 1/e) guarantee; no rule beats alpha*.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import Tensor

from mcsd.checks.node import RULE_SCHEME, candidate_tuples, exact_outcome
from mcsd.verify import RULE_NAMES as RULES
from mcsd.verify.optimal import (
    MAX_ATOMS,
    _take_window,
    alpha_star,
    containment,
    kseq_rho,
    ratio_order,
    transport_plan,
)

TOLERANCE = 1e-9


def random_pair(
    vocab: int, generator: torch.Generator, zeros: bool = True
) -> tuple[Tensor, Tensor]:
    """Random (p, q) float64 ``[V]`` of varying peakedness, sometimes with zeros."""
    powers = torch.tensor([0.5, 1.0, 3.0])
    out = []
    for _ in range(2):
        power = float(powers[int(torch.randint(3, (), generator=generator))])
        uniform = torch.rand(vocab, generator=generator, dtype=torch.float64)
        x = (-torch.log1p(-uniform)) ** power  # Exp(1) draws to a power
        if zeros and float(torch.rand((), generator=generator)) < 0.3:
            x[int(torch.randint(vocab, (), generator=generator))] = 0.0
        out.append(x / x.sum())
    return out[0], out[1]


def set_probabilities(q: Tensor, k: int, scheme: str) -> dict[frozenset[int], float]:
    """P(the candidate set equals S) for every set S the scheme can draw."""
    sets: dict[frozenset[int], float] = {}
    for cands, weight in candidate_tuples(scheme, q, k):
        key = frozenset(cands)
        sets[key] = sets.get(key, 0.0) + weight
    return sets


def alpha_by_subsets(p: Tensor, q: Tensor, k: int, scheme: str) -> float:
    """1 - max over all 2^V sets H of [P(S inside H) - p(H)]."""
    vocab = p.shape[-1]
    sets = set_probabilities(q, k, scheme)
    best = 0.0
    for mask in range(1 << vocab):
        inside = {t for t in range(vocab) if mask >> t & 1}
        value = sum(w for s, w in sets.items() if s <= inside) - sum(float(p[t]) for t in inside)
        best = max(best, value)
    return 1.0 - best


def alpha_by_linear_program(p: Tensor, q: Tensor, k: int, scheme: str) -> float:
    """max sum f(S, y) s.t. sum_y f(S, y) <= P(S), sum_S f(S, y) <= p(y), f >= 0, y in S."""
    optimize = pytest.importorskip("scipy.optimize")
    sets = list(set_probabilities(q, k, scheme).items())
    edges = [(i, y) for i, (s, _) in enumerate(sets) for y in sorted(s)]
    rows, bounds = [], []
    for i, (_, weight) in enumerate(sets):
        rows.append([1.0 if e[0] == i else 0.0 for e in edges])
        bounds.append(weight)
    for y in range(p.shape[-1]):
        rows.append([1.0 if e[1] == y else 0.0 for e in edges])
        bounds.append(float(p[y]))
    result = optimize.linprog(
        [-1.0] * len(edges), A_ub=rows, b_ub=bounds, bounds=(0, None), method="highs"
    )
    assert result.status == 0
    return -float(result.fun)


# ---------------------------------------------------------------- alpha*
@pytest.mark.parametrize("scheme", ["iid", "wor"])
def test_alpha_star_is_the_linear_program_value(scheme: str) -> None:
    generator = torch.Generator().manual_seed(1)
    checked = 0
    for vocab in (2, 3, 4, 5):
        for k in (1, 2, 3):
            p, q = random_pair(vocab, generator)
            if scheme == "wor" and int((q > 0).sum()) < k:
                continue
            reference = alpha_by_linear_program(p, q, k, scheme)
            assert alpha_star(p, q, k, scheme) == pytest.approx(reference, abs=1e-8)
            checked += 1
    assert checked >= 10


@pytest.mark.parametrize("scheme", ["iid", "wor"])
def test_sub_level_scan_equals_all_subsets(scheme: str) -> None:
    """The maximising H is a sub-level set of p/q (proved for iid; checked here for wor too)."""
    generator = torch.Generator().manual_seed(2)
    for trial in range(60):
        vocab = 3 + trial % 5  # 3..7
        k = 1 + trial % 4
        p, q = random_pair(vocab, generator)
        if scheme == "wor" and int((q > 0).sum()) < k:
            continue
        reference = alpha_by_subsets(p, q, k, scheme)
        assert alpha_star(p, q, k, scheme) == pytest.approx(reference, abs=1e-10), (trial, k)


def wor_containment_closed_form(q_sorted: Tensor, k: int) -> Tensor:
    """P(the first k draws without replacement lie in the first j tokens), exact for k <= 3."""
    q = q_sorted.double()
    n = len(q)
    mass = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(q, 0)])  # [n + 1]
    if k == 2:  # sum_{a in H} q_a (q(H) - q_a) / (1 - q_a)
        term_a = q / (1 - q)
        first = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(term_a, 0)])
        second = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(term_a * q, 0)])
        return mass * first - second
    assert k == 3  # sum_{a != b in H} q_a q_b (q(H) - q_a - q_b) / ((1 - q_a)(1 - q_a - q_b))
    qa, qb = q[:, None], q[None, :]
    weight = qa * qb / ((1 - qa) * (1 - qa - qb))  # [n, n]
    weight.fill_diagonal_(0.0)
    shares = weight * (qa + qb)
    out = torch.zeros(n + 1, dtype=torch.float64)
    for j in range(1, n + 1):
        out[j] = mass[j] * weight[:j, :j].sum() - shares[:j, :j].sum()
    return out


@pytest.mark.parametrize("k", [2, 3])
def test_without_replacement_quadrature_matches_closed_forms(k: int) -> None:
    generator = torch.Generator().manual_seed(3)
    vocab = 1024 if k == 2 else 300
    logits = 3.0 * torch.randn(vocab, generator=generator, dtype=torch.float64)
    q = torch.softmax(logits, 0)
    p = torch.softmax(logits + torch.randn(vocab, generator=generator, dtype=torch.float64), 0)
    inside, _ = containment(p, q, k, "wor")
    exact = wor_containment_closed_form(q[ratio_order(p, q, descending=False)], k)
    assert float((inside - exact).abs().max()) < 1e-11


# ---------------------------------------------------------------- optimal
def test_optimal_reaches_alpha_star_exactly() -> None:
    """Exact enumeration of every iid candidate tuple: acceptance == alpha*, emitted == p."""
    generator = torch.Generator().manual_seed(4)
    for trial in range(40):
        vocab = 2 + trial % 5
        k = 1 + trial % 4
        p, q = random_pair(vocab, generator)
        exact = exact_outcome("optimal", p, q, k)
        assert float((exact.emitted - p).abs().max()) <= TOLERANCE
        assert exact.acceptance == pytest.approx(alpha_star(p, q, k), abs=TOLERANCE)


def test_plan_selection_is_what_the_rule_selects() -> None:
    """Summed over every candidate tuple, the exact selection probabilities give the plan's
    marginal r (what the acceptance test divides by), and each tuple selects exactly once."""
    generator = torch.Generator().manual_seed(5)
    for trial in range(30):
        vocab, k = 2 + trial % 5, 1 + trial % 4
        p, q = random_pair(vocab, generator)
        plan = transport_plan(p, q, k)
        marginal = torch.zeros(vocab, dtype=torch.float64)
        for cands, weight in candidate_tuples("iid", q, k):
            probs = plan.selection_probabilities(list(cands))
            assert sum(probs) == pytest.approx(1.0, abs=1e-12)
            for c, s in zip(cands, probs, strict=True):
                marginal[c] += weight * s
        assert float((marginal - plan.selection).abs().max()) < 1e-12


def test_selection_sampling_matches_selection_probabilities() -> None:
    generator = torch.Generator().manual_seed(6)
    p, q = random_pair(6, generator, zeros=False)
    plan = transport_plan(p, q, 3)
    cands = [2, 4, 2]
    counts = [0, 0, 0]
    trials = 30_000
    for _ in range(trials):
        counts[plan.select(cands, generator)] += 1
    expected = plan.selection_probabilities(cands)
    for c, e in zip(counts, expected, strict=True):
        assert abs(c / trials - e) < 5 * math.sqrt(e * (1 - e) / trials) + 1e-9


@pytest.mark.parametrize("k", [2, 4])
def test_pooled_plan_is_lossless_and_near_optimal(k: int) -> None:
    """Beyond MAX_ATOMS tokens light ones are pooled: the plan stays a valid selection (its
    marginal sums to 1 and never selects a q = 0 token) and loses < 1e-4 against alpha*."""
    generator = torch.Generator().manual_seed(7)
    vocab = 20_000
    logits = 2.5 * torch.randn(vocab, generator=generator, dtype=torch.float64)
    q = torch.softmax(logits, 0)
    p = torch.softmax(
        1.2 * logits + torch.randn(vocab, generator=generator, dtype=torch.float64), 0
    )
    q[:50] = 0.0
    q = q / q.sum()
    plan = transport_plan(p, q, k)
    assert len(plan.sets) <= MAX_ATOMS + 1
    assert float(plan.selection.sum()) == pytest.approx(1.0, abs=1e-12)
    assert float(plan.selection[:50].abs().max()) == 0.0
    bound = alpha_star(p, q, k)
    assert bound - 1e-4 < plan.accepted_mass(p) <= bound + 1e-12
    # the intervals of the atoms tile [0, 1]
    pieces = sorted(interval for s in plan.sets for interval in s)
    assert pieces[0][0] == 0.0 and pieces[-1][1] == pytest.approx(1.0, abs=1e-12)
    for (_, end), (start, _) in itertools.pairwise(pieces):
        assert start == pytest.approx(end, abs=1e-12)


def test_pooled_plan_selects_by_its_marginal() -> None:
    """Monte Carlo through ``select`` with pooling forced (max_atoms=8): the selected tokens
    follow the plan's marginal (per atom)."""
    generator = torch.Generator().manual_seed(8)
    vocab, k, trials = 40, 3, 20_000
    p, q = random_pair(vocab, generator, zeros=False)
    plan = transport_plan(p, q, k, max_atoms=8)
    atoms = int(plan.atom_of.max()) + 1
    expected = torch.zeros(atoms, dtype=torch.float64).index_add_(0, plan.atom_of, plan.selection)
    counts = torch.zeros(atoms, dtype=torch.float64)
    for _ in range(trials):
        cands = torch.multinomial(q, k, replacement=True, generator=generator).tolist()
        counts[plan.atom_of[cands[plan.select(cands, generator)]]] += 1
    tv = 0.5 * float((counts / trials - expected).abs().sum())
    assert tv < 0.02


# ---------------------------------------------------------------- kseq and the bound
def test_kseq_acceptance_and_guarantee() -> None:
    generator = torch.Generator().manual_seed(9)
    for trial in range(30):
        vocab, k = 3 + trial % 4, 1 + trial % 4
        p, q = random_pair(vocab, generator)
        rho = kseq_rho(p, q, k)
        beta = float(torch.minimum(q, p / rho).sum())
        exact = exact_outcome("kseq", p, q, k)
        assert exact.acceptance == pytest.approx(1.0 - (1.0 - beta) ** k, abs=1e-12)
        bound = alpha_star(p, q, k)
        assert (1.0 - 1.0 / math.e) * bound - 1e-12 <= exact.acceptance <= bound + 1e-12


def test_no_rule_beats_alpha_star() -> None:
    generator = torch.Generator().manual_seed(10)
    for trial in range(12):
        vocab, k = 3 + trial % 3, 2 + trial % 2
        p, q = random_pair(vocab, generator, zeros=False)
        for rule in RULES:
            scheme = RULE_SCHEME[rule]
            if scheme == "top" or rule == "sps":
                continue
            acceptance = exact_outcome(rule, p, q, k).acceptance
            assert acceptance <= alpha_star(p, q, k, scheme) + 1e-12, rule
        assert exact_outcome("optimal", p, q, k).acceptance == pytest.approx(
            alpha_star(p, q, k), abs=TOLERANCE
        )


def test_plan_reaches_alpha_star_on_larger_vocabularies() -> None:
    """Up to MAX_ATOMS tokens every token is its own atom and the plan is exactly optimal
    (many free intervals in the construction: exercises the window search)."""
    generator = torch.Generator().manual_seed(11)
    for vocab in (12, 40, MAX_ATOMS):
        for k in (2, 3, 4):
            for _ in range(6):
                scale = 1.0 + 3.0 * float(torch.rand((), generator=generator))
                z = torch.randn(vocab, generator=generator, dtype=torch.float64)
                e = torch.randn(vocab, generator=generator, dtype=torch.float64)
                p, q = torch.softmax(scale * z, 0), torch.softmax(scale * z + e, 0)
                plan = transport_plan(p, q, k)
                assert plan.accepted_mass(p) == pytest.approx(alpha_star(p, q, k), abs=1e-9)
                assert float(plan.selection.sum()) == pytest.approx(1.0, abs=1e-12)


def test_window_search_against_bisection() -> None:
    """``_take_window`` takes exactly the requested G-mass from arbitrary free intervals."""
    rng = torch.Generator().manual_seed(12)
    for _ in range(300):
        count = int(torch.randint(1, 7, (), generator=rng))
        cuts = sorted(torch.rand(2 * count, generator=rng, dtype=torch.float64).tolist())
        gaps = [(cuts[2 * i], cuts[2 * i + 1]) for i in range(count)]
        k = int(torch.randint(2, 5, (), generator=rng))
        free = sum(hi - lo for lo, hi in gaps)
        length = free * float(torch.rand((), generator=rng))
        # the feasible G-masses run from the lowest to the highest free window of that length
        lowest, _ = _take_window(list(gaps), length, -1.0, k)
        highest, _ = _take_window(list(gaps), length, 2.0, k)
        low = sum(hi**k - lo**k for lo, hi in lowest)
        high = sum(hi**k - lo**k for lo, hi in highest)
        mass = low + (high - low) * float(torch.rand((), generator=rng))
        window, remaining = _take_window(list(gaps), length, mass, k)
        assert sum(hi**k - lo**k for lo, hi in window) == pytest.approx(mass, abs=1e-12)
        assert sum(hi - lo for lo, hi in window) == pytest.approx(length, abs=1e-12)
        assert sum(hi - lo for lo, hi in remaining) == pytest.approx(free - length, abs=1e-12)
