"""The defaults of ``mcsd check`` and of ``python -m mcsd.checks.capture``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class CheckDefaults:
    """``mcsd check`` (``mcsd.checks``)."""

    seed: int = 0
    alpha: float = 1e-6  # false-failure probability of each statistical test
    k: int = 3
    vocab: int = 8
    trials: int = 100_000
    engine_trials: int = 20_000
    ks: tuple[int, ...] = (2, 3, 4)
    random_pairs: int = 200
    random_vocab: int = 50
    samples: int = 256  # Monte Carlo chains per pair for mcss-wor with k >= 3
    pairs: str = "tests/data/qwen_pairs.pt"  # captured by python -m mcsd.checks.capture


@dataclass(frozen=True, kw_only=True)
class CaptureDefaults:
    """``python -m mcsd.checks.capture``."""

    prompts: int = 16
    new_tokens: int = 40
    per_prompt: int = 19
    temperature: float = 1.0
    top: int = 1024  # tokens kept per pair
    seed: int = 0
