"""Logits -> probability distributions (warping) and seeded sampling.

Warping turns raw logits into the distribution a model samples from. The steps are applied in
this order, the same as Hugging Face's default logits-processor order:

1. temperature: ``logits / T``; ``T = 0`` means greedy (a one-hot at the first argmax);
2. top-k: keep the ``k`` largest logits (``0`` disables it; ties at the k-th value are kept);
3. top-p (nucleus): keep the smallest set of most likely tokens whose mass reaches ``p``
   (``1.0`` disables it; the most likely token is always kept).

Lossless speculative decoding is lossless with respect to the *warped* target distribution.
All randomness comes from an explicit ``torch.Generator``; nothing here touches global RNG state.
This module imports only torch: it never sees a model, a cache or a tokenizer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mcsd.config import SamplingConfig

# Probability mass below which a distribution is treated as empty (only reachable through
# float rounding of a residual that is zero in exact arithmetic).
EMPTY_MASS = 1e-12


def warp(logits: Tensor, config: SamplingConfig) -> Tensor:
    """Return the sampling distribution for ``logits`` ``[..., V]`` as float32 ``[..., V]``."""
    logits = logits.float()
    if config.temperature == 0.0:
        return one_hot_argmax(logits)
    logits = logits / config.temperature
    if config.top_k > 0 and config.top_k < logits.shape[-1]:
        kth = torch.topk(logits, config.top_k, dim=-1).values[..., -1:]  # [..., 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # [..., V]
    if config.top_p < 1.0:
        probs = _top_p(probs, config.top_p)
    return probs


def one_hot_argmax(scores: Tensor) -> Tensor:
    """One-hot float32 ``[..., V]`` at the first maximum of ``scores`` ``[..., V]``."""
    index = scores.argmax(dim=-1, keepdim=True)  # [..., 1]
    return torch.zeros(scores.shape, dtype=torch.float32, device=scores.device).scatter_(
        -1, index, 1.0
    )


def _top_p(probs: Tensor, top_p: float) -> Tensor:
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)  # [..., V]
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # [..., V]
    keep_sorted = mass_before < top_p  # the first token always has mass_before = 0
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    kept = probs * keep
    return kept / kept.sum(dim=-1, keepdim=True)


def normalize(weights: Tensor) -> Tensor | None:
    """``weights / weights.sum()`` for a non-negative ``[V]`` vector, or None when its mass is ~0."""
    mass = weights.sum()
    if float(mass) <= EMPTY_MASS:
        return None
    return weights / mass


def sample(probs: Tensor, generator: torch.Generator | None) -> int:
    """Draw one token id from a ``[V]`` distribution (inverse CDF on one uniform draw)."""
    cdf = torch.cumsum(probs.double(), dim=-1)  # [V]
    u = torch.rand((), generator=generator, dtype=torch.float64, device=probs.device)
    index = int(torch.searchsorted(cdf, u * cdf[-1], right=True))
    # Guard against u * total landing on the last edge through rounding; never pick a zero.
    index = min(index, probs.shape[-1] - 1)
    if float(probs[index]) <= 0.0:
        index = int(torch.nonzero(probs > 0)[-1])
    return index


def uniform(generator: torch.Generator | None, device: torch.device | str = "cpu") -> float:
    """One uniform draw in [0, 1) from ``generator``."""
    return float(torch.rand((), generator=generator, dtype=torch.float64, device=device))


def sample_candidates(
    q: Tensor, k: int, *, replacement: bool, generator: torch.Generator | None
) -> Tensor:
    """Draw ``k`` candidate token ids from ``q`` ``[V]``; returns ``LongTensor[k]`` in draw order.

    With replacement the draws are iid from ``q``. Without replacement each draw comes from ``q``
    with the earlier draws removed and the rest renormalised (sequential sampling, which is what
    the MCSS-without-replacement rule assumes).
    """
    if q.dim() != 1:
        raise ValueError(f"q must be a [V] probability vector, got shape {tuple(q.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if replacement:
        picks = [sample(q, generator) for _ in range(k)]
    else:
        support = int((q > 0).sum())
        if support < k:
            raise ValueError(
                f"cannot draw k={k} candidates without replacement: q has only {support} tokens "
                "with positive probability (lower k, raise the draft temperature, or use "
                "rule 'topk' for a deterministic draft)"
            )
        remaining = q.double().clone()
        picks = []
        for _ in range(k):
            token = sample(remaining, generator)
            picks.append(token)
            remaining[token] = 0.0
    return torch.tensor(picks, dtype=torch.long, device=q.device)
