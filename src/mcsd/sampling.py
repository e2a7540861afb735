"""Logits -> probability distributions (warping) and seeded sampling.

Warping turns raw logits into the distribution a model samples from. The steps are applied in
this order, the same as Hugging Face's default logits-processor order:

1. temperature: ``logits / T``; ``T = 0`` means greedy (a one-hot at the first argmax);
2. top-k: keep the ``k`` largest logits (``0`` disables it; ties at the k-th value are kept);
3. top-p (nucleus): keep the smallest set of most likely tokens whose mass reaches ``p``
   (``1.0`` disables it; the most likely token is always kept).

Lossless speculative decoding is lossless with respect to the *warped* target distribution.
All randomness comes from an explicit ``torch.Generator``; nothing here touches global RNG state.
It never sees a model, a cache or a tokenizer.

Candidates, bonus and correction tokens are all drawn by ``draw_children`` (one row or many, on
any device, no host synchronisation); ``sample`` and ``sample_candidates`` are its one-row forms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from mcsd.errors import ParamError, check_number

DEFAULT_TEMPERATURE = 1.0  # CLI, Python API and server alike (the OpenAI API's default)

# Probability mass below which a distribution is treated as empty (only reachable through
# float rounding of a residual that is zero in exact arithmetic).
EMPTY_MASS = 1e-12


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How logits become a distribution (see ``warp`` for the order). It lives here, beside the
    code that reads it, so ``sampling`` and ``verify`` need nothing above them;
    ``mcsd.config`` (and ``mcsd``) export it with the other configs."""

    temperature: float = DEFAULT_TEMPERATURE  # 0 = greedy
    top_k: int = 0  # 0 = disabled
    top_p: float = 1.0  # 1.0 = disabled

    def __post_init__(self) -> None:
        temperature = check_number("temperature", self.temperature)
        if temperature < 0 or math.isinf(temperature):
            raise ParamError(
                f"temperature must be >= 0 and finite (0 = greedy), got {temperature}",
                param="temperature",
                allowed="a finite number >= 0",
            )
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ParamError(
                f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}",
                param="top_k",
                allowed="an integer >= 0",
            )
        top_p = check_number("top_p", self.top_p)
        if not 0.0 < top_p <= 1.0:
            raise ParamError(
                f"top_p must be in (0, 1] (1 disables it), got {top_p}",
                param="top_p",
                allowed="a number in (0, 1]",
            )
        object.__setattr__(self, "temperature", temperature)
        object.__setattr__(self, "top_p", top_p)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


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
    """``weights / weights.sum()`` for a non-negative ``[V]`` vector; None when its mass is ~0."""
    mass = weights.sum()
    if float(mass) <= EMPTY_MASS:
        return None
    return weights / mass


def sample(probs: Tensor, generator: torch.Generator | None) -> int:
    """Draw one token id from a ``[V]`` distribution (inverse CDF on one uniform draw)."""
    return int(draw_children(probs[None], 1, replacement=True, generator=generator)[0, 0])


def uniform(generator: torch.Generator | None, device: torch.device | str = "cpu") -> float:
    """One uniform draw in [0, 1) from ``generator``."""
    return float(torch.rand((), generator=generator, dtype=torch.float64, device=device))


def sample_candidates(
    q: Tensor, k: int, *, replacement: bool, generator: torch.Generator | None
) -> Tensor:
    """Draw ``k`` candidate token ids from ``q`` ``[V]``; returns ``LongTensor[k]`` in draw order.

    ``draw_children`` for one row, refusing (rather than padding) a draw without replacement of
    more candidates than ``q`` has tokens of positive probability.
    """
    if q.dim() != 1:
        raise ValueError(f"q must be a [V] probability vector, got shape {tuple(q.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if not replacement and k > int((q > 0).sum()):
        raise _support_error(q, k)
    return draw_children(q[None], k, replacement=replacement, generator=generator)[0]


def draw_children(
    q: Tensor, k: int, *, replacement: bool, generator: torch.Generator | None
) -> Tensor:
    """``k`` candidates from each row of ``q`` ``[P, V]`` at once, with no host synchronisation
    (what the drafter runs per tree level on a GPU); returns ``LongTensor[P, k]`` in draw order.

    With replacement: inverse CDF on ``k`` uniforms per row (a draw that lands on a zero-mass
    token through rounding is moved to the row's last positive token).
    Without replacement each draw comes from ``q`` with the earlier draws removed and the rest
    renormalised (sequential sampling, which is what the MCSS-without-replacement rule assumes),
    done in one pass by an exponential race: with E_v ~ Exp(1) iid, the tokens sorted by
    E_v / q(v) come out in exactly that sequential order (the first is v w.p. q(v); by
    memorylessness the rest race on afresh). A row with fewer than
    ``k`` positive tokens gets all of them first, in race order, then zero-mass tokens as padding,
    which every rule rejects (a candidate with q = 0 is never accepted), so p is unchanged.
    """
    if q.dim() != 2:
        raise ValueError(f"q must be a [P, V] matrix, got shape {tuple(q.shape)}")
    rows, vocab = q.shape
    if not replacement:
        # float64 so that E / q(v) stays finite for every positive float32 q(v)
        race = torch.empty(q.shape, dtype=torch.float64, device=q.device).exponential_(
            generator=generator
        )  # [P, V]
        keys = (race / q.double()).nan_to_num(nan=math.inf)  # q = 0: inf (0/0 -> inf as well)
        return torch.topk(keys, k, dim=-1, largest=False).indices  # [P, k]
    cdf = torch.cumsum(q.double(), dim=-1)  # [P, V]
    u = torch.rand(rows, k, generator=generator, dtype=torch.float64, device=q.device)  # [P, k]
    picks = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=vocab - 1)  # [P, k]
    positive = q > 0  # [P, V]
    last = vocab - 1 - positive.flip(-1).to(torch.uint8).argmax(dim=-1, keepdim=True)  # [P, 1]
    return torch.where(positive.gather(-1, picks), picks, last)


def _support_error(q: Tensor, k: int) -> ValueError:
    support = int((q > 0).sum())
    return ValueError(
        f"cannot draw k={k} candidates without replacement: q has only {support} tokens "
        "with positive probability (lower k, raise the draft temperature, or use "
        "rule 'topk' for a deterministic draft)"
    )
