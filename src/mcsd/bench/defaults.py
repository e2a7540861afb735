"""The defaults of ``mcsd bench`` and ``mcsd tune`` (the sweep and the tree-shape optimiser).

The library's own defaults (trees, rules, the adaptive budget) are in ``mcsd.config``.
"""

from __future__ import annotations

from dataclasses import dataclass

# mcsd.bench.sweep, mcsd.bench.optimise and mcsd.commands.tune still import these three from
# mcsd.config; they move here once those modules (rewritten in issue 23) import them from here
from mcsd.config import OPTIMISER_ITERATIONS as OPTIMISER_ITERATIONS
from mcsd.config import OPTIMISER_TOLERANCE as OPTIMISER_TOLERANCE
from mcsd.config import SweepDefaults as SweepDefaults


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
