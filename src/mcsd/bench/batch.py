"""Throughput at batch > 1 (``mcsd bench --batch-size B``): every prompt's first turn through
one batch engine of ``B`` rows per method, rows joining as others finish (continuous batching),
``ar`` (plain decoding rows) and mcsd's trees side by side on the same runtime.

A method's throughput is the tokens it generated for all prompts over the wall time of the whole
batch run (tokens/s summed over the rows). Greedy runs also check every speculative answer
against ``ar``'s (the target's own greedy output). Only mcsd's own methods run here: the
baselines of other libraries decode one sequence at a time.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from mcsd.api import ModelPair, adaptive_tree
from mcsd.bench.methods import Method
from mcsd.bench.runner import method_pairs, turn_seed
from mcsd.config import SpecConfig
from mcsd.engine import Engine
from mcsd.stats import Stats

BATCH_KINDS = ("ar", "sps", "tree")  # methods that run as rows of the batch engine


@dataclass(kw_only=True)
class BatchResult:
    """One method's batch run."""

    method: str
    batch_size: int
    answers: list[list[int]]  # generated tokens per prompt, in prompt order
    seconds: float  # wall time of the whole run (prefills included)
    stats: Stats  # every row's steps
    matches_ar: bool | None = None  # greedy: every answer equals ar's

    @property
    def tokens(self) -> int:
        return sum(map(len, self.answers))

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def check_batch_methods(methods: Sequence[Method]) -> None:
    """Refuse methods that cannot run as rows of the batch engine, naming them."""
    other = [m.name for m in methods if m.kind not in BATCH_KINDS]
    if other:
        raise ValueError(
            f"--batch-size runs {', '.join(BATCH_KINDS)} methods only (rows of mcsd's batch "
            f"engine); drop {', '.join(other)}"
        )


def method_engine(pair: ModelPair, method: Method, base: SpecConfig, batch: int) -> Engine:
    """The batch engine of ``batch`` rows that runs ``method`` (``ar``: plain decoding rows)."""
    spec = method_spec(method, base)
    budget_tree = adaptive_tree(spec) if method.adaptive and spec.speculative else None
    return pair.batch_engine(batch, budget_tree=budget_tree)


def method_spec(method: Method, base: SpecConfig) -> SpecConfig:
    spec = method.spec(base)
    return replace(spec, tree="none", rule=None) if method.kind == "ar" else spec


def run_batch(
    pair: ModelPair,
    engine: Engine,
    prompts: Sequence[list[int]],
    method: Method,
    base: SpecConfig,
) -> BatchResult:
    """``prompts`` through ``engine`` (``method_engine``), rows joining as others free up."""
    spec = method_spec(method, base)
    stop = pair.stop_ids(spec)
    started = time.perf_counter()
    requests = [
        engine.add_request(
            prompt_ids, replace(spec, seed=turn_seed(base.seed, index, 0)), stop_token_ids=stop
        )
        for index, prompt_ids in enumerate(prompts)
    ]
    while engine.has_unfinished():
        engine.step()
    seconds = time.perf_counter() - started
    answers = [request.output_ids for request in requests]
    stats = Stats()
    for request in requests:
        stats.records += request.stats.records
    return BatchResult(
        method=method.name,
        batch_size=engine.max_batch,
        answers=answers,
        seconds=seconds,
        stats=stats,
    )


def run_batch_bench(
    pair: ModelPair,
    prompts: Sequence[list[int]],
    methods: Sequence[Method],
    base: SpecConfig,
    batch: int,
) -> list[BatchResult]:
    """Every method over ``prompts`` at ``batch`` rows, twice on the same engine: an untimed
    pass of every method first (every CUDA-graph shape the run meets is captured, every buffer
    allocated, the adaptive budget's costs probed), then the timed pass, methods in turn.
    Greedy answers are compared with ``ar``'s when it ran."""
    check_batch_methods(methods)
    pairs = method_pairs(pair, methods)
    engines = {m.name: method_engine(pairs[m.name], m, base, batch) for m in methods}
    for method in methods:
        run_batch(pairs[method.name], engines[method.name], prompts, method, base)
    results = [run_batch(pairs[m.name], engines[m.name], prompts, m, base) for m in methods]
    reference = next((r for r in results if r.method == "ar"), None)
    if base.target.greedy and reference is not None:
        for result in results:
            result.matches_ar = result.answers == reference.answers
    return results


def batch_table(results: Sequence[BatchResult]) -> str:
    """A plain-text table of the runs, one line each."""
    lines = [
        f"{'method':<24} {'batch':>5} {'tokens':>7} {'seconds':>8} {'tok/s':>8} "
        f"{'AL':>5} {'plain':>5} {'= ar':>5}"
    ]
    for r in results:
        same = "-" if r.matches_ar is None else "yes" if r.matches_ar else "NO"
        plain = f"{100 * r.stats.plain_steps / r.stats.steps:.0f}%" if r.stats.steps else "-"
        lines.append(
            f"{r.method:<24} {r.batch_size:>5} {r.tokens:>7} {r.seconds:>8.2f} "
            f"{r.tokens_per_second:>8.1f} {r.stats.mean_accepted_length:>5.2f} {plain:>5} "
            f"{same:>5}"
        )
    return "\n".join(lines)
