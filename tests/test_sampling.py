"""Tests of mcsd.sampling: warping (temperature -> top-k -> top-p) and seeded sampling.

Warping is checked on tiny exact cases (the mlx-lm style); sampling is checked for its support
(never a zero-probability token) and, for ``sample_candidates``, for the exact distribution of the
ordered draws (chi-square through ``mcsd.check.goodness_of_fit``).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from mcsd.checks.node import candidate_tuples, goodness_of_fit
from mcsd.config import SamplingConfig
from mcsd.sampling import draw_children, sample, sample_candidates, warp

ALPHA = 1e-4  # false-failure probability of each statistical assertion (all are seeded anyway)


def probs_to_logits(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log().float()  # log 0 = -inf


def assert_close(actual: torch.Tensor, expected: list[float], atol: float = 1e-6) -> None:
    torch.testing.assert_close(
        actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0
    )


# ---------------------------------------------------------------- warping
def test_top_p_keeps_smallest_nucleus() -> None:
    # the mlx-lm case: 0.9 alone already reaches 0.3
    logits = probs_to_logits([0.9, 0.0, 0.0, 0.1])
    assert_close(warp(logits, SamplingConfig(top_p=0.3)), [1.0, 0.0, 0.0, 0.0])
    # 0.95 needs both tokens: mass before 0.1 is 0.9 < 0.95
    assert_close(warp(logits, SamplingConfig(top_p=0.95)), [0.9, 0.0, 0.0, 0.1])


def test_top_p_keeps_the_token_that_crosses_the_threshold() -> None:
    logits = probs_to_logits([0.1, 0.5, 0.25, 0.15])
    assert_close(warp(logits, SamplingConfig(top_p=0.6)), [0.0, 2 / 3, 1 / 3, 0.0])
    assert_close(warp(logits, SamplingConfig(top_p=0.5)), [0.0, 1.0, 0.0, 0.0])


def test_top_k_keeps_ties_at_the_kth_value() -> None:
    logits = torch.tensor([1.0, 3.0, 3.0, 0.0])
    assert_close(warp(logits, SamplingConfig(top_k=1)), [0.0, 0.5, 0.5, 0.0])
    assert_close(warp(logits, SamplingConfig(top_k=2)), [0.0, 0.5, 0.5, 0.0])
    e = math.exp(-2.0)  # the kept 1.0 logit relative to the two 3.0 logits
    assert_close(warp(logits, SamplingConfig(top_k=3)), [e / (2 + e), 1 / (2 + e), 1 / (2 + e), 0])


def test_top_k_zero_or_at_least_vocab_is_plain_softmax() -> None:
    logits = torch.tensor([0.5, -1.0, 2.0, 0.0])
    softmax = torch.softmax(logits, dim=-1).tolist()
    for top_k in (0, 4, 10):
        assert_close(warp(logits, SamplingConfig(top_k=top_k)), softmax)
    assert_close(warp(logits, SamplingConfig(top_p=1.0)), softmax)


def test_temperature_zero_is_one_hot_at_first_argmax() -> None:
    logits = torch.tensor([[1.0, 5.0, 5.0, 2.0], [7.0, 7.0, 7.0, 7.0]])  # [2, V]
    probs = warp(logits, SamplingConfig(temperature=0.0))
    assert probs.dtype == torch.float32
    assert probs.tolist() == [[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]


def test_temperature_scales_logits() -> None:
    logits = torch.tensor([2.0, 1.0, 0.0])
    expected = torch.softmax(logits / 0.5, dim=-1).tolist()
    assert_close(warp(logits, SamplingConfig(temperature=0.5)), expected)


def test_temperature_is_applied_before_top_p() -> None:
    logits = torch.tensor([2.0, 1.0, 0.0])
    # T = 1: [0.665, 0.245, 0.090], so top_p = 0.7 keeps two tokens; at T = 0.5 the first token
    # alone has 0.867 >= 0.7. Top-p before temperature would keep two tokens.
    assert (warp(logits, SamplingConfig(top_p=0.7)) > 0).sum() == 2
    assert_close(warp(logits, SamplingConfig(temperature=0.5, top_p=0.7)), [1.0, 0.0, 0.0])


def test_top_k_is_applied_before_top_p() -> None:
    logits = probs_to_logits([0.35, 0.3, 0.2, 0.15])
    # top-k 2 renormalises to [0.538, 0.462]; top-p 0.5 then keeps the first token only.
    # (top-p first would keep [0.35, 0.3] -> [0.538, 0.462].)
    assert_close(warp(logits, SamplingConfig(top_k=2, top_p=0.5)), [1.0, 0.0, 0.0, 0.0])


def test_warp_rows_are_distributions() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 50, generator=generator) * 3  # [5, V]
    for config in (
        SamplingConfig(),
        SamplingConfig(temperature=0.7, top_k=10),
        SamplingConfig(temperature=1.3, top_p=0.8),
        SamplingConfig(temperature=0.9, top_k=20, top_p=0.5),
    ):
        probs = warp(logits, config)  # [5, V]
        assert probs.shape == (5, 50) and probs.dtype == torch.float32
        assert bool((probs >= 0).all())
        torch.testing.assert_close(probs.sum(dim=-1), torch.ones(5))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": "1"}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_p": -0.5}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"top_k": True}, "top_k"),
    ],
)
def test_sampling_config_rejects_bad_values(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        SamplingConfig(**kwargs)


# ---------------------------------------------------------------- sample
def test_sample_never_returns_a_zero_probability_token() -> None:
    generator = torch.Generator().manual_seed(1)
    probs = torch.tensor([0.0, 0.3, 0.0, 0.0, 0.5, 0.2, 0.0])  # zeros first, inside and last
    seen = {sample(probs, generator) for _ in range(3000)}
    assert seen == {1, 4, 5}
    tiny = torch.tensor([0.0, 1e-30, 0.0, 1.0 - 1e-30, 0.0], dtype=torch.float64)
    assert {sample(tiny, generator) for _ in range(300)} == {3}


def test_sample_guard_when_rounding_lands_past_the_last_edge(monkeypatch) -> None:
    # A non-monotone cumsum (parallel scans on GPU) or rounding can put the search index past the
    # last edge; the guard must then pick the last token with positive probability.
    probs = torch.tensor([0.2, 0.8, 0.0, 0.0])
    monkeypatch.setattr(torch, "searchsorted", lambda cdf, x, right: torch.full_like(x, 4).long())
    assert sample(probs, torch.Generator().manual_seed(0)) == 1


def test_sample_matches_distribution() -> None:
    generator = torch.Generator().manual_seed(2)
    probs = torch.tensor([0.1, 0.0, 0.45, 0.05, 0.4])
    counts = torch.bincount(
        torch.tensor([sample(probs, generator) for _ in range(20000)]), minlength=5
    )
    fit = goodness_of_fit(counts, probs, alpha=ALPHA)
    assert fit.passed, fit


# ---------------------------------------------------------------- sample_candidates
def sequential_probability(q: list[float], draws: tuple[int, ...], replacement: bool) -> float:
    """Probability of drawing exactly ``draws`` in this order (computed from the definition)."""
    prob, remaining = 1.0, list(q)
    for c in draws:
        total = sum(remaining)
        if total <= 0.0:
            return 0.0
        prob *= remaining[c] / total
        if not replacement:
            remaining[c] = 0.0
    return prob


@pytest.mark.parametrize("replacement", [True, False])
@pytest.mark.parametrize(
    ("q", "k"),
    [
        ([0.5, 0.3, 0.2, 0.0], 2),
        ([0.05, 0.6, 0.0, 0.25, 0.1], 3),
        ([0.7, 0.3], 2),
    ],
)
def test_sample_candidates_ordered_distribution(q: list[float], k: int, replacement: bool) -> None:
    """Chi-square of the ordered k-tuples against the exact sequential-sampling probabilities."""
    generator = torch.Generator().manual_seed(3)
    vocab = len(q)
    q_tensor = torch.tensor(q, dtype=torch.float64)
    tuples = list(itertools.product(range(vocab), repeat=k))
    index = {t: i for i, t in enumerate(tuples)}
    expected = torch.tensor(
        [sequential_probability(q, t, replacement) for t in tuples], dtype=torch.float64
    )
    counts = torch.zeros(len(tuples), dtype=torch.long)
    for _ in range(20000):
        draws = sample_candidates(q_tensor, k, replacement=replacement, generator=generator)
        assert draws.shape == (k,) and draws.dtype == torch.long
        counts[index[tuple(draws.tolist())]] += 1
    fit = goodness_of_fit(counts, expected, alpha=ALPHA)
    assert fit.passed, fit
    # mcsd.check enumerates the same probabilities (the exact tests rely on it)
    scheme = "iid" if replacement else "wor"
    enumerated = dict(candidate_tuples(scheme, q_tensor, k))
    for t, prob in zip(tuples, expected.tolist(), strict=True):
        assert enumerated.get(t, 0.0) == pytest.approx(prob, abs=1e-12)


def test_sample_candidates_without_replacement_is_distinct_and_in_support() -> None:
    generator = torch.Generator().manual_seed(4)
    q = torch.tensor([0.0, 0.1, 0.0, 0.6, 0.2, 0.1, 0.0])
    for _ in range(500):
        draws = sample_candidates(q, 4, replacement=False, generator=generator).tolist()
        assert len(set(draws)) == 4
        assert set(draws) == {1, 3, 4, 5}  # k equals the support: a permutation of it


def test_sample_candidates_with_replacement_stays_in_support() -> None:
    generator = torch.Generator().manual_seed(5)
    q = torch.tensor([0.0, 0.5, 0.0, 0.5, 0.0])
    draws = sample_candidates(q, 2000, replacement=True, generator=generator)
    assert set(draws.tolist()) == {1, 3}


def test_sample_candidates_without_replacement_needs_enough_support() -> None:
    q = torch.tensor([0.5, 0.0, 0.5, 0.0])
    with pytest.raises(ValueError, match="only 2 tokens with positive probability"):
        sample_candidates(q, 3, replacement=False, generator=torch.Generator())
    with pytest.raises(ValueError, match="k=5"):
        sample_candidates(q, 5, replacement=False, generator=torch.Generator())


@pytest.mark.parametrize("k", [0, -1, 1.0, True])
def test_sample_candidates_rejects_bad_k(k: object) -> None:
    with pytest.raises(ValueError, match="k must be"):
        sample_candidates(torch.tensor([0.5, 0.5]), k, replacement=True, generator=None)  # type: ignore[arg-type]


def test_sample_candidates_rejects_batched_q() -> None:
    with pytest.raises(ValueError, match=r"q must be a \[V\]"):
        sample_candidates(torch.full((2, 2), 0.5), 1, replacement=True, generator=None)


@pytest.mark.parametrize("replacement", [True, False])
def test_sample_candidates_is_seeded(replacement: bool) -> None:
    q = torch.softmax(torch.randn(20, generator=torch.Generator().manual_seed(6)), dim=-1)

    def draws(seed: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(seed)
        return [
            sample_candidates(q, 3, replacement=replacement, generator=generator).tolist()
            for _ in range(20)
        ]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


# ---------------------------------------------------------------- draw_children (batched)
@pytest.mark.parametrize("replacement", [True, False])
def test_draw_children_rows_follow_sequential_sampling(replacement: bool) -> None:
    """Each row of the batched draw has the exact ordered-tuple distribution of its own q."""
    rows = [[0.5, 0.3, 0.2, 0.0], [0.05, 0.6, 0.1, 0.25]]
    q = torch.tensor(rows, dtype=torch.float32)
    k, trials = 2, 20000
    generator = torch.Generator().manual_seed(11)
    tuples = list(itertools.product(range(4), repeat=k))
    index = {t: i for i, t in enumerate(tuples)}
    counts = torch.zeros(len(rows), len(tuples), dtype=torch.long)
    for _ in range(trials):
        draws = draw_children(q, k, replacement=replacement, generator=generator)
        assert draws.shape == (2, k) and draws.dtype == torch.long
        for r, row in enumerate(draws.tolist()):
            counts[r, index[tuple(row)]] += 1
    for r, row in enumerate(rows):
        expected = torch.tensor([sequential_probability(row, t, replacement) for t in tuples])
        fit = goodness_of_fit(counts[r], expected, alpha=ALPHA)
        assert fit.passed, (r, fit)


def test_draw_children_pads_short_supports_with_zero_mass_tokens() -> None:
    """Fewer positive tokens than k: all of them first (in race order), then q = 0 tokens."""
    q = torch.tensor([[0.0, 0.7, 0.0, 0.3, 0.0], [0.2, 0.2, 0.2, 0.2, 0.2]])
    generator = torch.Generator().manual_seed(12)
    first_pairs = set()
    for _ in range(300):
        short, full = draw_children(q, 4, replacement=False, generator=generator).tolist()
        assert len(set(short)) == 4 and set(short[:2]) == {1, 3}
        assert all(q[0, t] == 0 for t in short[2:])
        assert len(set(full)) == 4
        first_pairs.add(tuple(short[:2]))
    assert first_pairs == {(1, 3), (3, 1)}


def test_draw_children_with_replacement_never_returns_zero_mass(monkeypatch) -> None:
    q = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.25, 0.25, 0.25, 0.25]])
    # Uniforms of exactly 1.0 land past the last positive edge: the guard moves them back.
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.ones(*shape, dtype=kw["dtype"]))
    draws = draw_children(q, 3, replacement=True, generator=None)
    assert draws.tolist() == [[2, 2, 2], [3, 3, 3]]


def test_draw_children_rejects_a_vector() -> None:
    with pytest.raises(ValueError, match=r"q must be a \[P, V\]"):
        draw_children(torch.tensor([0.5, 0.5]), 1, replacement=True, generator=None)
