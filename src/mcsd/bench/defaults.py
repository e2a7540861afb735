"""The defaults of ``mcsd bench`` and ``mcsd tune`` (the sweep and the tree-shape optimiser).

The library's own defaults (trees, rules, the adaptive budget) are in ``mcsd.config``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class BenchDefaults:
    """``mcsd bench`` / ``mcsd tune`` (``mcsd.bench``)."""

    datasets: tuple[str, ...] = ("humaneval", "mt-bench")
    # {tree} is the tree mcsd tune saved for the pair here, else DEFAULT_TREE
    methods: tuple[str, ...] = (
        "hf-ar",
        "hf-assisted",
        "hf-assisted:5",
        "ar",
        "sps:4",
        "tree:{tree}",
    )
    # on the llama.cpp runtime: llama.cpp's own loops instead of transformers'
    llamacpp_methods: tuple[str, ...] = (
        "llama-ar",
        "llama-spec",
        "llama-spec:16:0.75",  # the best llama-server setting measured in issue 13
        "ar",
        "sps:4",
        "tree:{tree}",
        "tree:{tree}+adaptive",  # what mcsd generate runs here by default (RUNTIME_ADAPTIVE_TREE)
    )
    n: int = 10  # prompts per dataset (seeded sample)
    turns: int = 1
    seed: int = 0  # a benchmark is reproducible unless asked otherwise
    out: str = "bench-out"
    warmup_tokens: int = 16  # enough to run every tree level and the verification shapes once


@dataclass(frozen=True, kw_only=True)
class SweepDefaults:
    """``mcsd tune`` / ``mcsd bench --sweep`` (``mcsd.bench.sweep``)."""

    budgets: tuple[int, ...] = (4, 8, 16, 32, 64)
    verify: int = 3  # best predicted shapes run for real
    max_depth: int = 10
    n: int = 4  # prompts per dataset for mcsd tune
    out: str = "tune-out"
    chain: str = "sps:4"  # produces the reference answers (and calibrates the step overhead)
    cost_sizes: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 80)


# The tree-shape optimiser (mcsd.bench.optimise): Dinkelbach rounds on the tokens/s ratio
OPTIMISER_ITERATIONS = 20  # it converges in 3-6 on measured tables
OPTIMISER_TOLERANCE = 1e-9  # relative: stop when no tree beats the current ratio by more
