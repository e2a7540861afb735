"""Losslessness check: does a verification rule emit exactly the target distribution?

One tree node, a draft distribution q and a target distribution p over a small vocabulary. The
draft proposes k candidates (its *candidate scheme*: iid from q, sequentially without
replacement from q, or the draft's top-k), the rule accepts one of them or emits a correction
token. Lossless means the emitted token is distributed exactly as p (as one-hot argmax p for
``greedy``). Two independent views of that claim:

- exact: enumerate every candidate tuple the scheme can draw, with its probability, and combine
  each with ``mcsd.verify.node_outcome`` (the exact accept probabilities and correction
  distribution for fixed candidates). The emitted distribution must equal the target to float
  rounding (``EXACT_TOLERANCE``).
- Monte Carlo: draw candidates with ``mcsd.sampling.sample_candidates`` (the engine's
  ``draw_children`` for one node; ``torch.topk`` for the deterministic scheme), run
  ``mcsd.verify.verify_node`` and count the emitted tokens. The
  counts must pass a chi-square goodness-of-fit test and a total-variation bound against the
  target (``goodness_of_fit``); the measured acceptance rate must match the exact one.

``mcsd check`` (``mcsd.commands.check``) runs both on a few random (p, q) cases and prints a
table; the tests reuse the enumeration and ``goodness_of_fit``. Everything is seeded: a case's
Monte Carlo stream depends only on (seed, rule, case), not on the order or the process it runs in.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
import os
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from mcsd.checks.defaults import CheckDefaults
from mcsd.sampling import one_hot_argmax, sample_candidates
from mcsd.verify.node import NONE_ACCEPTED, Mixed, NodeRule
from mcsd.verify.rules import RULES, get_rule, node_outcome, verify_node

# How the draft proposes a node's candidates (DESIGN 3):
# "iid" = independent draws from q; "wor" = sequential draws without replacement, each from q with
# the earlier draws removed and renormalised; "top" = the draft's k most likely tokens.
SCHEMES: tuple[str, ...] = ("iid", "wor", "top")
# Each rule's own scheme, from the registry (greedy: a greedy target's draft is usually greedy
# too, so its top-k; any candidates would do).
RULE_SCHEME: dict[str, str] = {name: rule.candidates for name, rule in RULES.items()}

CASES: tuple[str, ...] = ("dirichlet", "sparse", "p=q", "disjoint", "near-one-hot")

DEFAULT_ALPHA = CheckDefaults.alpha  # false-failure probability of each statistical test
EXACT_TOLERANCE = 1e-9  # max |emitted - target| allowed in the exact enumeration
MAX_ENUMERATED_TUPLES = 200_000  # beyond this, skip the exact enumeration (it would take minutes)
MIN_EXPECTED_COUNT = 5.0  # chi-square bins with fewer expected draws are pooled
# Below this many trials in all, worker processes (each spends seconds importing torch) cost more
# than they save; one trial costs 50-150 us.
PARALLEL_MIN_TRIALS = 100_000


# ---------------------------------------------------------------- candidates
def rule_k(rule: str, k: int) -> int:
    """Number of candidates the rule verifies at one node: at most its ``max_children``."""
    limit = get_rule(rule).max_children
    return k if limit is None else min(k, limit)


def draw_candidates(scheme: str, q: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
    """Draw ``k`` candidates ``LongTensor[k]`` from ``q`` ``[V]`` with ``scheme``, in draw order."""
    if scheme == "top":
        return torch.topk(q, k).indices  # [k], deterministic (ties broken the same way each call)
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}; got {scheme!r}")
    return sample_candidates(q, k, replacement=scheme == "iid", generator=generator)


def candidate_tuples(scheme: str, q: Tensor, k: int) -> list[tuple[tuple[int, ...], float]]:
    """Every candidate tuple ``scheme`` can draw from ``q`` ``[V]`` (in draw order), with its
    probability. The probabilities sum to 1."""
    if scheme == "top":
        return [(tuple(draw_candidates("top", q, k, None).tolist()), 1.0)]
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}; got {scheme!r}")
    weights = q.double().tolist()
    support = [t for t, w in enumerate(weights) if w > 0.0]
    total = sum(weights)
    tuples = []
    if scheme == "iid":
        for cands in itertools.product(support, repeat=k):
            tuples.append((cands, math.prod(weights[c] / total for c in cands)))
        return tuples
    for cands in itertools.permutations(support, k):
        prob = 1.0
        for i, c in enumerate(cands):
            # the remaining mass is summed directly, not as 1 - drawn, to avoid cancellation
            remaining = sum(weights[t] for t in support if t not in cands[:i])
            prob *= weights[c] / remaining
        tuples.append((cands, prob))
    return tuples


def count_candidate_tuples(scheme: str, q: Tensor, k: int) -> int:
    """``len(candidate_tuples(scheme, q, k))`` without building them."""
    if scheme == "top":
        return 1
    support = int((q > 0).sum())
    return support**k if scheme == "iid" else math.perm(support, k)


# ---------------------------------------------------------------- exact enumeration
def target_distribution(rule: str, p: Tensor) -> Tensor:
    """What a lossless ``rule`` emits at a node with target ``p`` ``[V]``: float64 ``[V]``."""
    return one_hot_argmax(p).double() if get_rule(rule).target == "greedy" else p.double()


@dataclass(frozen=True, kw_only=True)
class Exact:
    """The exact outcome distribution of one node."""

    emitted: Tensor  # [V] float64, probability of each emitted token
    acceptance: float  # probability that one of the candidates is accepted
    target: Tensor  # [V] float64, what ``emitted`` must equal for a lossless rule

    @property
    def error(self) -> float:
        """Largest absolute difference between the emitted and the target distribution."""
        return float((self.emitted - self.target).abs().max())


def exact_outcome(
    rule: str,
    p: Tensor,  # [V] target distribution
    q: Tensor,  # [V] draft distribution given to the rule
    k: int,
    *,
    scheme: str | None = None,  # candidate scheme; default: the rule's own (RULE_SCHEME)
    draft: Tensor | None = None,  # [V] distribution the candidates are drawn from; default: q
) -> Exact:
    """Enumerate every candidate tuple and combine it with ``node_outcome``.

    ``scheme`` and ``draft`` exist to model *wrong* setups (candidates drawn one way, verified as
    if drawn another way), which the tests use to show that the checks catch them.
    """
    get_rule(rule)
    scheme = RULE_SCHEME[rule] if scheme is None else scheme
    draft = q if draft is None else draft
    emitted = torch.zeros(p.shape[-1], dtype=torch.float64)  # [V]
    acceptance = 0.0
    for cands, weight in candidate_tuples(scheme, draft, k):
        accept, correction = node_outcome(rule, p, q, torch.tensor(cands))  # [k], [V]
        for c, a in zip(cands, accept.tolist(), strict=True):
            emitted[c] += weight * a
        emitted += weight * correction
        acceptance += weight * float(accept.sum())
    return Exact(emitted=emitted, acceptance=acceptance, target=target_distribution(rule, p))


def exact_mixed_outcome(
    rule: str,
    p: Tensor,  # [V] target distribution
    q: Tensor,  # [V] draft distribution given to the rule
    fixed: Sequence[int],  # the deterministic (context) candidates, verified first
    k: int,  # drawn candidates after them
    *,
    draft: Tensor | None = None,  # [V] distribution the drawn candidates come from; default q
    node_rule: NodeRule | None = None,  # default: Mixed(the rule's node rule, len(fixed))
) -> Exact:
    """``exact_outcome`` for a node whose children mix deterministic candidates (``fixed``)
    with ``k`` drawn from ``draft`` by the rule's scheme (``mcsd.verify.node.Mixed``)."""
    record = get_rule(rule)
    mixed = Mixed(record.node, len(fixed)) if node_rule is None else node_rule
    draft = q if draft is None else draft
    emitted = torch.zeros(p.shape[-1], dtype=torch.float64)  # [V]
    acceptance = 0.0
    drawn = candidate_tuples(RULE_SCHEME[rule], draft, k) if k else [((), 1.0)]
    for cands, weight in drawn:
        candidates = [*fixed, *cands]
        accept, correction = mixed.outcome(p, q, candidates)  # [len(fixed) + k], [V]
        for c, a in zip(candidates, accept.tolist(), strict=True):
            emitted[c] += weight * a
        emitted += weight * correction
        acceptance += weight * float(accept.sum())
    return Exact(emitted=emitted, acceptance=acceptance, target=target_distribution(rule, p))


# ---------------------------------------------------------------- goodness of fit
@dataclass(frozen=True, kw_only=True)
class Fit:
    """Observed counts against an exact distribution; ``passed`` when consistent with it."""

    trials: int
    tv: float  # total variation distance between observed frequencies and the expected distribution
    tv_bound: float  # TV exceeds this with probability < alpha when the counts come from expected
    chi2: float
    dof: int
    p_value: float  # chi-square p-value (after pooling bins with few expected draws)
    impossible: int  # draws of outcomes whose expected probability is 0
    alpha: float

    @property
    def passed(self) -> bool:
        return self.impossible == 0 and self.p_value >= self.alpha and self.tv <= self.tv_bound


def tv_bound(expected: Tensor, trials: int, alpha: float = DEFAULT_ALPHA) -> float:
    """A bound the TV distance of ``trials`` draws from ``expected`` exceeds w.p. < ``alpha``.

    E[TV] <= 1/2 sum_i sqrt(p_i (1 - p_i) / n) (Jensen on each |count_i / n - p_i|), and TV moves
    by at most 1/n when one draw changes, so McDiarmid gives P(TV > E[TV] + t) <= exp(-2 n t^2).
    """
    e = expected.double()
    mean = 0.5 * float(torch.sqrt(e * (1.0 - e) / trials).sum())
    return mean + math.sqrt(math.log(1.0 / alpha) / (2.0 * trials))


def chi_square(counts: Tensor, expected: Tensor) -> tuple[float, int, float]:
    """Pearson chi-square of ``counts`` ``[C]`` against probabilities ``expected`` ``[C]`` over the
    outcomes with positive probability; bins expecting fewer than ``MIN_EXPECTED_COUNT`` draws are
    pooled. Returns (statistic, degrees of freedom, p-value)."""
    n = float(counts.sum())
    possible = expected > 0
    observed = counts[possible].double()  # [C']
    wanted = expected[possible].double() * n  # [C']
    small = wanted < MIN_EXPECTED_COUNT
    if bool(small.any()):
        pooled_observed, pooled_wanted = observed[small].sum(), wanted[small].sum()
        observed, wanted = observed[~small], wanted[~small]
        if float(pooled_wanted) < MIN_EXPECTED_COUNT and len(wanted) > 0:
            # still too small: merge the pool into the least expected remaining bin
            j = int(wanted.argmin())
            observed[j] += pooled_observed
            wanted[j] += pooled_wanted
        else:
            observed = torch.cat([observed, pooled_observed[None]])
            wanted = torch.cat([wanted, pooled_wanted[None]])
    dof = len(wanted) - 1
    statistic = float(((observed - wanted) ** 2 / wanted).sum())
    if dof < 1:
        return statistic, 0, 1.0
    p_value = float(torch.special.gammaincc(torch.tensor(dof / 2.0), torch.tensor(statistic / 2)))
    return statistic, dof, p_value


def goodness_of_fit(counts: Tensor, expected: Tensor, *, alpha: float = DEFAULT_ALPHA) -> Fit:
    """Compare ``counts`` ``[C]`` (draws per outcome) with the exact probabilities ``expected``
    ``[C]``: chi-square p-value >= alpha, TV <= ``tv_bound`` and no impossible outcome."""
    if counts.shape != expected.shape:
        raise ValueError(
            f"counts and expected must have the same shape, got {tuple(counts.shape)} "
            f"and {tuple(expected.shape)}"
        )
    trials = int(counts.sum())
    if trials < 1:
        raise ValueError("counts must hold at least one draw")
    expected = expected.double()
    frequencies = counts.double() / trials  # [C]
    tv = 0.5 * float((frequencies - expected).abs().sum())
    impossible = int(counts[expected <= 0].sum())
    statistic, dof, p_value = chi_square(counts, expected)
    if impossible:
        p_value = 0.0
    return Fit(
        trials=trials,
        tv=tv,
        tv_bound=tv_bound(expected, trials, alpha),
        chi2=statistic,
        dof=dof,
        p_value=p_value,
        impossible=impossible,
        alpha=alpha,
    )


def acceptance_bound(trials: int, alpha: float = DEFAULT_ALPHA) -> float:
    """Hoeffding: a measured rate is further than this from its mean w.p. < ``alpha``."""
    return math.sqrt(math.log(2.0 / alpha) / (2.0 * trials))


# ---------------------------------------------------------------- Monte Carlo
@dataclass(frozen=True, kw_only=True)
class Counts:
    """Monte Carlo outcome of one node."""

    emitted: Tensor  # [V] long, how often each token was emitted
    accepted: int  # trials in which a candidate was accepted

    @property
    def trials(self) -> int:
        return int(self.emitted.sum())


def monte_carlo(
    rule: str,
    p: Tensor,  # [V]
    q: Tensor,  # [V] draft distribution given to the rule
    k: int,
    trials: int,
    generator: torch.Generator,
    *,
    scheme: str | None = None,  # default: RULE_SCHEME[rule]
    draft: Tensor | None = None,  # [V] distribution the candidates are drawn from; default: q
) -> Counts:
    """Run ``trials`` independent draws of candidates + ``verify_node`` and count the outcomes."""
    get_rule(rule)
    scheme = RULE_SCHEME[rule] if scheme is None else scheme
    draft = q if draft is None else draft
    emitted = [0] * p.shape[-1]
    accepted = 0
    for _ in range(trials):
        cands = draw_candidates(scheme, draft, k, generator)  # [k]
        result = verify_node(rule, p, q, cands, generator)
        emitted[result.token] += 1
        accepted += result.accepted != NONE_ACCEPTED
    return Counts(emitted=torch.tensor(emitted, dtype=torch.long), accepted=accepted)


# ---------------------------------------------------------------- random cases
@dataclass(frozen=True, kw_only=True)
class Case:
    """One (p, q) pair to check a rule on."""

    name: str
    p: Tensor  # [V] float64 target distribution
    q: Tensor  # [V] float64 draft distribution


def _random_distribution(
    vocab: int, generator: torch.Generator, support: Sequence[int] | None = None, peak: float = 1.0
) -> Tensor:
    """A random distribution ``[V]`` on ``support`` (default: every token): normalised Exp(1)
    draws (= Dirichlet(1)) raised to ``peak`` (> 1 makes it peakier)."""
    weights = -torch.log1p(-torch.rand(vocab, generator=generator, dtype=torch.float64))  # [V]
    weights = weights**peak
    if support is not None:
        mask = torch.zeros(vocab, dtype=torch.bool)
        mask[list(support)] = True
        weights = weights * mask
    return weights / weights.sum()


def make_case(name: str, vocab: int, k: int, generator: torch.Generator) -> Case:
    """Build case ``name`` (one of ``CASES``); q always has at least ``k`` tokens of positive
    probability, so every candidate scheme can draw k distinct candidates."""
    if vocab <= k:
        raise ValueError(f"vocab must be larger than k (got vocab={vocab}, k={k})")
    order = torch.randperm(vocab, generator=generator).tolist()
    half = max(k, (vocab + 1) // 2)
    if name == "dirichlet":
        p = _random_distribution(vocab, generator)
        q = _random_distribution(vocab, generator)
    elif name == "sparse":  # zeros in both; the supports overlap in about two tokens
        p_end = vocab // 2 + 1
        q_start = max(0, min(p_end - 2, vocab - k))
        p = _random_distribution(vocab, generator, order[:p_end])
        q = _random_distribution(vocab, generator, order[q_start:])
    elif name == "p=q":
        p = _random_distribution(vocab, generator)
        q = p.clone()
    elif name == "disjoint":  # every candidate is rejected
        q = _random_distribution(vocab, generator, order[:half])
        p = _random_distribution(vocab, generator, order[half:])
    elif name == "near-one-hot":  # p puts 0.98 on a token the draft rarely proposes
        p = 0.98 * torch.nn.functional.one_hot(torch.tensor(order[0]), vocab).double()
        p = p + 0.02 * _random_distribution(vocab, generator)
        q = _random_distribution(vocab, generator, order[1:], peak=3.0)
        q = 0.99 * q + 0.01 * _random_distribution(vocab, generator)
    else:
        raise ValueError(f"case must be one of {', '.join(CASES)}; got {name!r}")
    return Case(name=name, p=p, q=q)


def make_cases(vocab: int, k: int, seed: int, names: Sequence[str] = CASES) -> list[Case]:
    """The cases ``names`` for a vocabulary of ``vocab`` tokens, each from its own seeded stream."""
    return [make_case(name, vocab, k, _generator(seed, "case", name)) for name in names]


def _generator(seed: int, *keys: str) -> torch.Generator:
    """A generator seeded from ``seed`` and ``keys`` (stable across runs and processes)."""
    key = zlib.crc32(":".join((str(seed), *keys)).encode())
    return torch.Generator().manual_seed(key)


# ---------------------------------------------------------------- one rule on one case
@dataclass(frozen=True, kw_only=True)
class CheckResult:
    """A rule checked on one case: Monte Carlo fit, acceptance and exact enumeration."""

    rule: str
    case: str
    k: int
    fit: Fit
    acceptance: float  # measured acceptance rate
    exact_acceptance: float | None  # None when the enumeration was skipped (too many tuples)
    exact_error: float | None  # max |emitted - target| of the enumeration, None when skipped

    @property
    def acceptance_ok(self) -> bool:
        if self.exact_acceptance is None:
            return True
        bound = acceptance_bound(self.fit.trials, self.fit.alpha)
        return abs(self.acceptance - self.exact_acceptance) <= bound

    @property
    def failures(self) -> list[str]:
        """Which tests failed: "impossible" (a zero-probability token was emitted), "chi2",
        "TV", "acceptance", "exact" (the enumeration disagrees with the target)."""
        failed = []
        if self.fit.impossible:
            failed.append("impossible")
        if self.fit.p_value < self.fit.alpha:
            failed.append("chi2")
        if self.fit.tv > self.fit.tv_bound:
            failed.append("TV")
        if not self.acceptance_ok:
            failed.append("acceptance")
        if self.exact_error is not None and not self.exact_error <= EXACT_TOLERANCE:
            failed.append("exact")
        return failed

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass(frozen=True, kw_only=True)
class CheckTask:
    """Everything one worker needs (picklable)."""

    rule: str
    case: Case
    k: int
    trials: int
    seed: int
    alpha: float


def check_case(task: CheckTask) -> CheckResult:
    """Check ``task.rule`` on ``task.case``: exact enumeration plus Monte Carlo."""
    rule, case = task.rule, task.case
    k = rule_k(rule, task.k)
    exact = None
    if count_candidate_tuples(RULE_SCHEME[rule], case.q, k) <= MAX_ENUMERATED_TUPLES:
        exact = exact_outcome(rule, case.p, case.q, k)
    generator = _generator(task.seed, "trials", rule, case.name)
    counts = monte_carlo(rule, case.p, case.q, k, task.trials, generator)
    target = target_distribution(rule, case.p)
    return CheckResult(
        rule=rule,
        case=case.name,
        k=k,
        fit=goodness_of_fit(counts.emitted, target, alpha=task.alpha),
        acceptance=counts.accepted / task.trials,
        exact_acceptance=None if exact is None else exact.acceptance,
        exact_error=None if exact is None else exact.error,
    )


def _check_case_in_worker(task: CheckTask) -> CheckResult:
    torch.set_num_threads(1)  # the vectors are tiny; the workers already fill the cores
    return check_case(task)


def run_checks(
    rules: Sequence[str],
    *,
    k: int,
    vocab: int,
    trials: int,
    seed: int,
    alpha: float = DEFAULT_ALPHA,
    cases: Sequence[str] = CASES,
    jobs: int = 1,
    on_result: Callable[[CheckResult], None] | None = None,
) -> list[CheckResult]:
    """Check every rule on every case; results in (rule, case) order.

    With ``jobs > 1`` the (rule, case) pairs run in that many worker processes; results do not
    depend on ``jobs`` (every pair has its own seeded generator).
    """
    for rule in rules:
        get_rule(rule)
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    case_list = make_cases(vocab, k, seed, cases)
    tasks = [
        CheckTask(rule=r, case=c, k=k, trials=trials, seed=seed, alpha=alpha)
        for r in rules
        for c in case_list
    ]
    results = []
    for result in _map(tasks, jobs):
        if on_result is not None:
            on_result(result)
        results.append(result)
    return results


def _map(tasks: list[CheckTask], jobs: int) -> Iterator[CheckResult]:
    jobs = min(jobs, len(tasks))
    if jobs <= 1:
        yield from map(check_case, tasks)
        return
    # spawn, not fork: a forked child of a process that has used torch's thread pool can hang
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        yield from pool.map(_check_case_in_worker, tasks)


def default_jobs(tasks: int, trials: int) -> int:
    """Worker processes for ``tasks`` (rule, case) pairs of ``trials`` each: the CPU cores this
    process may use, or 1 when the work is too small to pay for starting workers."""
    if tasks * trials < PARALLEL_MIN_TRIALS:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(tasks, cores or 1))
