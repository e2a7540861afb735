"""Per-node acceptance of the verification rules against the bound alpha* (``mcsd check
--compare``).

For each source of (p, q) pairs (random ones, and pairs captured from a real model pair by
``mcsd.checks.capture``), each k and each candidate scheme, every rule's acceptance probability at
one node is set next to alpha*, the best any lossless rule can do with candidates drawn that way
(``mcsd.verify.optimal.alpha_star``, exact: a scan for iid draws, a quadrature accurate to ~1e-12
without replacement).

How each acceptance is obtained (``exact`` in the result says which):
- ``mcss``     exact: step i accepts sum min(p_i, q), p_{i+1} = norm(max(0, p_i - q)).
- ``mcns``     exact: sum_x p(x) (1 - (1 - q(x))^k).
- ``kseq``     exact: 1 - (1 - beta)^k with SpecTr's rho.
- ``optimal``  exact: sum min(p, r) with the plan's selection marginal r.
- ``mcss-wor`` (one node of ``traversal`` too) P(all rejected) = E[prod_i (1 - beta_i)] over the
  chain of rejected tokens, b_i ~ norm(max(0, qbar - p_i)): exact for k <= 2 (a sum over b_1),
  else a Monte Carlo mean over ``samples`` chains (standard error reported).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mcsd.checks.defaults import CheckDefaults
from mcsd.verify.optimal import alpha_star, kseq_rho, transport_plan
from mcsd.verify.residual import residual, wor_reject
from mcsd.verify.rules import RULES

DEFAULT_KS = CheckDefaults.ks
DEFAULT_SAMPLES = CheckDefaults.samples  # Monte Carlo chains per pair for mcss-wor with k >= 3
WITHIN = 0.02  # "within 2% of alpha*": acceptance >= (1 - WITHIN) * alpha*


@dataclass(frozen=True, kw_only=True)
class Comparison:
    """One rule on one source of pairs, for one k and candidate scheme (averages over pairs)."""

    source: str
    scheme: str  # "iid" or "wor"
    k: int
    rule: str
    pairs: int
    acceptance: float  # mean acceptance probability per node
    alpha: float  # mean alpha*
    gap: float  # mean of alpha* - acceptance
    relative_gap: float  # mean of (alpha* - acceptance) / alpha*
    within: float  # fraction of pairs with acceptance >= (1 - WITHIN) alpha*
    exact: bool  # False: Monte Carlo (mcss-wor, k >= 3)
    stderr: float  # standard error of `acceptance` from the Monte Carlo (0 when exact)


def random_pairs(n: int, vocab: int, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` random LM-like pairs ``[n, vocab]`` float64: p = softmax(s z), q = softmax(s z + t e)
    with z, e standard normal, s ~ U(1, 4) (peakedness), t ~ U(0.5, 2) (draft error)."""
    generator = torch.Generator().manual_seed(seed)
    scale = 1.0 + 3.0 * torch.rand(n, 1, generator=generator, dtype=torch.float64)
    noise = 0.5 + 1.5 * torch.rand(n, 1, generator=generator, dtype=torch.float64)
    z = torch.randn(n, vocab, generator=generator, dtype=torch.float64)
    e = torch.randn(n, vocab, generator=generator, dtype=torch.float64)
    return torch.softmax(scale * z, -1), torch.softmax(scale * z + noise * e, -1)


def _mcss(p: Tensor, q: Tensor, k: int, generator, samples) -> tuple[float, float]:
    rejected, left = 1.0, p
    for _ in range(k):
        rejected *= 1.0 - float(torch.minimum(left, q).sum())
        left = residual(left, q)
    return 1.0 - rejected, 0.0


def _mcns(p: Tensor, q: Tensor, k: int, generator, samples) -> tuple[float, float]:
    return float((p * (1.0 - (1.0 - q) ** k)).sum()), 0.0


def _kseq(p: Tensor, q: Tensor, k: int, generator, samples) -> tuple[float, float]:
    rho = kseq_rho(p, q, k)
    beta = float(torch.minimum(q, p / rho).sum())
    return 1.0 - (1.0 - beta) ** k, 0.0


def _optimal(p: Tensor, q: Tensor, k: int, generator, samples) -> tuple[float, float]:
    return transport_plan(p, q, k).accepted_mass(p), 0.0


def _mcss_wor(p: Tensor, q: Tensor, k: int, generator, samples) -> tuple[float, float]:
    if k <= 2:
        return 1.0 - _wor_rejection_exact(p, q, k), 0.0
    mean, stderr = _wor_rejection_sampled(p, q, k, generator, samples)
    return 1.0 - mean, stderr


# Per-node acceptance of each rule compared (traversal's node rule is mcss-wor's).
ACCEPTANCE = {
    "mcss": _mcss,
    "mcns": _mcns,
    "kseq": _kseq,
    "optimal": _optimal,
    "mcss-wor": _mcss_wor,
}
RULES_BY_SCHEME: dict[str, tuple[str, ...]] = {
    scheme: tuple(name for name in ACCEPTANCE if RULES[name].candidates == scheme)
    for scheme in ("iid", "wor")
}


def acceptance(
    rule: str,
    p: Tensor,  # [V] target
    q: Tensor,  # [V] draft
    k: int,
    generator: torch.Generator,
    samples: int = DEFAULT_SAMPLES,
) -> tuple[float, float]:
    """(acceptance probability, its Monte Carlo standard error or 0.0 when exact)."""
    formula = ACCEPTANCE.get("mcss-wor" if rule == "traversal" else rule)
    if formula is None:
        raise ValueError(f"no acceptance formula for rule {rule!r}")
    return formula(p.double(), q.double(), k, generator, samples)


def _wor_rejection_exact(p: Tensor, q: Tensor, k: int) -> float:
    """P(every candidate rejected) for mcss-wor, k <= 2, summing over the first rejected token."""
    beta = float(torch.minimum(p, q).sum())
    if k == 1 or beta >= 1.0:
        return 1.0 - beta if k == 1 else 0.0
    rejected = torch.clamp(q - p, min=0.0)  # [V] P(reject step 1 with token b)
    left = residual(p, q)  # [V] p_1
    # beta_2(b) = sum_{x != b} min(p_1(x), q(x) / (1 - q(b))): sorted ratios + prefix sums
    support = q > 0
    ratio, order = torch.sort(left[support] / q[support])
    zero = torch.zeros(1, dtype=torch.float64)
    p_below = torch.cat([zero, torch.cumsum(left[support][order], 0)])
    q_above = torch.cat(
        [torch.flip(torch.cumsum(torch.flip(q[support][order], [0]), 0), [0]), zero]
    )
    b = torch.nonzero(rejected > 0).flatten()
    scale = 1.0 / (1.0 - q[b])  # [B]
    split = torch.searchsorted(ratio, scale)
    total = p_below[split] + scale * q_above[split]  # sum_x min(p_1, scale q) over all x
    beta2 = (total - torch.minimum(left[b], scale * q[b])).clamp(0.0, 1.0)  # drop x = b
    return float((rejected[b] * (1.0 - beta2)).sum())


def _wor_rejection_sampled(
    p: Tensor, q: Tensor, k: int, generator: torch.Generator, samples: int
) -> tuple[float, float]:
    """Monte Carlo over ``samples`` chains of rejected tokens, all at once ``[S, V]``."""
    left = p.expand(samples, -1).clone()  # [S, V] p_i per chain
    qbar = q.expand(samples, -1).clone()  # [S, V]
    product = torch.ones(samples, dtype=torch.float64)
    for step in range(k):
        kept = torch.minimum(left, qbar)
        beta = kept.sum(-1)  # [S]
        product *= (1.0 - beta).clamp(min=0.0)
        if step == k - 1:
            break
        over = torch.clamp(qbar - left, min=0.0)  # [S, V] rejected-token weights
        alive = over.sum(-1) > 0
        weights = torch.where(alive[:, None], over, qbar)
        b = torch.multinomial(weights, 1, generator=generator)  # [S, 1]
        left, qbar = wor_reject(left, qbar, b)
    mean = float(product.mean())
    stderr = float(product.std()) / math.sqrt(samples) if samples > 1 else 0.0
    return mean, stderr


def compare(
    sources: dict[str, tuple[Tensor, Tensor]],
    ks: Sequence[int] = DEFAULT_KS,
    *,
    schemes: Sequence[str] = ("iid", "wor"),
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
) -> list[Comparison]:
    """Every rule of ``RULES_BY_SCHEME`` on every (p, q) pair of every source."""
    results = []
    for source, (ps, qs) in sources.items():
        for scheme in schemes:
            for k in ks:
                bounds = [alpha_star(p, q, k, scheme) for p, q in zip(ps, qs, strict=True)]
                for rule in RULES_BY_SCHEME[scheme]:
                    generator = torch.Generator().manual_seed(seed + 7919 * k)
                    values, errors = [], []
                    for p, q in zip(ps, qs, strict=True):
                        value, error = acceptance(rule, p, q, k, generator, samples)
                        values.append(value)
                        errors.append(error)
                    gaps = [a - v for a, v in zip(bounds, values, strict=True)]
                    n = len(values)
                    results.append(
                        Comparison(
                            source=source,
                            scheme=scheme,
                            k=k,
                            rule=rule,
                            pairs=n,
                            acceptance=sum(values) / n,
                            alpha=sum(bounds) / n,
                            gap=sum(gaps) / n,
                            relative_gap=sum(g / a for g, a in zip(gaps, bounds, strict=True)) / n,
                            within=sum(
                                v >= (1 - WITHIN) * a for v, a in zip(values, bounds, strict=True)
                            )
                            / n,
                            exact=not any(errors),
                            stderr=math.sqrt(sum(e * e for e in errors)) / n,
                        )
                    )
    return results


def markdown(results: list[Comparison]) -> str:
    """The comparison as a Markdown table (for docs/benchmarks.md)."""
    lines = [
        "| source | draws | k | rule | acceptance | alpha* | gap | gap % | within 2% |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        value = f"{r.acceptance:.4f}" + ("" if r.exact else f" ± {2 * r.stderr:.4f}")
        lines.append(
            f"| {r.source} | {r.scheme} | {r.k} | {r.rule} | {value} | {r.alpha:.4f} | "
            f"{r.gap:.4f} | {100 * r.relative_gap:.2f} | {100 * r.within:.0f}% |"
        )
    return "\n".join(lines)
