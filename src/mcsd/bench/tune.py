"""The tuning pipeline of ``mcsd tune`` and ``mcsd bench --sweep`` (the method is
``mcsd.bench.sweep``'s), one named step each:

1. ``reference_answers``: the target's greedy answers (from ``CHAIN``) and the draft's ranks;
2. ``measure_costs``: the pair's step cost (``mcsd.budget.PairCost``) from forwards timed after
   a typical context, and the fixed work of a step from the chain runs' own steps;
3. ``optimiser_picks``: the optimiser's tree per budget (``mcsd.bench.optimise``);
4. ``rank_shapes``: every candidate shape and those picks by predicted tokens/s (``predict``
   runs steps 2-4);
5. ``measure``: the best predicted shapes, the best chain and the target alone, run for real;
6. ``tuned_tree``: what ``mcsd tune`` saves: the fastest measured tree, or ``none`` (the target
   alone) when plain decoding was as fast.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from mcsd.api import ModelPair
from mcsd.bench import sweep
from mcsd.bench.datasets import Question
from mcsd.bench.defaults import BenchDefaults, SweepDefaults
from mcsd.bench.methods import Generation, Method, parse_method, run_method
from mcsd.bench.optimise import Choice, choose
from mcsd.bench.report import summarize
from mcsd.bench.runner import Answer, build_prompt, run_bench
from mcsd.budget import PairCost, StepCost
from mcsd.config import NO_SPECULATION, SpecConfig

CHAIN = parse_method(SweepDefaults.chain)  # gives the reference answers, calibrates the step


@dataclass(frozen=True, kw_only=True)
class TuneConfig:
    """What a sweep runs (``mcsd tune``'s options)."""

    base: SpecConfig  # greedy; its length and stop tokens for every run
    budgets: tuple[int, ...] = SweepDefaults.budgets  # node budgets, increasing
    max_depth: int = SweepDefaults.max_depth  # deepest candidate tree
    verify: int = SweepDefaults.verify  # best predicted shapes run for real
    chat: bool = True  # prompts through the tokenizer's chat template
    warmup_tokens: int = BenchDefaults.warmup_tokens
    progress: bool = True  # progress bars while measuring


@dataclass(frozen=True, kw_only=True)
class References:
    """The target's greedy answers, one per question."""

    prompts: list[list[int]]  # token ids of each question's prompt
    runs: list[Generation]  # the chain's answer to each (its tokens: the target's greedy ones)
    traces: list[list[int]]  # the draft's rank of each answer token given the true prefix


@dataclass(frozen=True, kw_only=True)
class Prediction:
    """What the simulation predicts: the step cost it priced with, the optimiser's picks and
    every candidate shape, best predicted tokens/s first."""

    budgets: tuple[int, ...]
    costs: PairCost  # one row
    context: int  # tokens before each timed forward
    chain_step: float  # seconds of a chain step, as the chain runs measured it
    picks: dict[int, Choice]  # budget -> the optimiser's tree (or plain decoding)
    candidates: list[sweep.Candidate]

    @property
    def plain_rate(self) -> float:
        """Predicted tokens/s of the target alone."""
        return 1.0 / self.costs.step_time(None)

    @property
    def best(self) -> dict[int, dict[str, sweep.Candidate]]:
        return sweep.best_per_budget(self.candidates, self.budgets)


def reference_answers(
    pair: ModelPair, questions: Sequence[Question], config: TuneConfig, log: Callable[[str], None]
) -> References:
    """Step 1: each question's greedy answer from ``CHAIN`` and the draft's ranks of it."""
    base, prompts, runs, traces = config.base, [], [], []
    started = time.perf_counter()
    for i, question in enumerate(questions):
        prompt = build_prompt(pair.tokenizer, question, [], 0, config.chat)
        if i == 0 and config.warmup_tokens:
            short = min(config.warmup_tokens, base.max_new_tokens)
            run_method(CHAIN, pair, prompt, replace(base, max_new_tokens=short))
        run = run_method(CHAIN, pair, prompt, base)
        prompts.append(prompt)
        runs.append(run)
        traces.append(sweep.draft_ranks(pair.draft, prompt, run.tokens, pair.vocab_size))
        seconds = time.perf_counter() - started
        log(f"reference {i + 1}/{len(questions)}: {len(run.tokens)} tokens ({seconds:.0f}s)")
    return References(prompts=prompts, runs=runs, traces=traces)


def measure_costs(
    pair: ModelPair, references: References, base: SpecConfig
) -> tuple[PairCost, int, float]:
    """Step 2: the step cost of one row from forwards of ``SweepDefaults.cost_sizes`` tokens
    after the first prompt and half its answer, and the fixed work of a step: what a chain step
    took beyond its forwards. Returns the cost, the context's length and the chain step."""
    context = references.prompts[0] + references.runs[0].tokens[: base.max_new_tokens // 2]
    sizes = SweepDefaults.cost_sizes
    costs = PairCost(
        target=StepCost.probe(pair.target, sizes, context=context),
        draft=StepCost.probe(pair.draft, sizes, context=context),
        overhead=0.0,
    )
    # Steps are disturbed upwards by other processes: a low quantile estimates the undisturbed one.
    steps = sorted(r.draft_time + r.target_time for g in references.runs for r in g.records)
    chain_step = steps[len(steps) // 5] if steps else 0.0
    chain = costs.step_time(CHAIN.spec(base).token_tree())
    return replace(costs, fixed=max(0.0, chain_step - chain)), len(context), chain_step


def optimiser_picks(
    traces: Sequence[Sequence[int]], costs: PairCost, config: TuneConfig
) -> dict[int, Choice]:
    """Step 3: the optimiser's tree per budget, on the draft ranks' frequencies at any depth."""
    acceptance = [sweep.rank_frequencies(traces)] * config.max_depth
    return {b: choose(acceptance, costs, b, config.max_depth) for b in config.budgets}


def rank_shapes(
    traces: Sequence[Sequence[int]], costs: PairCost, config: TuneConfig, picks: dict[int, Choice]
) -> list[sweep.Candidate]:
    """Step 4: every candidate shape and the optimiser's picks, best predicted first."""
    trees = sweep.candidate_trees(traces, config.budgets, config.max_depth)
    trees += [p.tree for p in picks.values() if p.tree is not None and p.tree not in trees]
    return sweep.rank_candidates(trees, traces, costs)


def predict(pair: ModelPair, references: References, config: TuneConfig) -> Prediction:
    """Steps 2-4 on the reference answers of step 1."""
    costs, context, chain_step = measure_costs(pair, references, config.base)
    picks = optimiser_picks(references.traces, costs, config)
    return Prediction(
        budgets=config.budgets,
        costs=costs,
        context=context,
        chain_step=chain_step,
        picks=picks,
        candidates=rank_shapes(references.traces, costs, config, picks),
    )


def methods_to_measure(prediction: Prediction, verify: int) -> list[Method]:
    """The target alone, the best predicted chain and the ``verify`` best predicted shapes."""
    candidates = prediction.candidates
    picked = dict.fromkeys(c.name for c in candidates[:verify])
    chain = max((c for c in candidates if c.tree.max_children == 1), key=lambda c: c.tokens_per_s)
    names = ["ar", f"sps:{chain.tree.max_depth}", *(f"tree:{n}" for n in picked)]
    return [parse_method(n) for n in dict.fromkeys(names)]


def measure(
    pair: ModelPair, questions: Sequence[Question], methods: Sequence[Method], config: TuneConfig
) -> tuple[list[Answer], dict[str, Any]]:
    """Step 5: every method's answers to every question and their summary (``summarize``)."""
    chat, warmup, progress = config.chat, config.warmup_tokens, config.progress
    answers = run_bench(
        pair, questions, methods, config.base, chat=chat, warmup_tokens=warmup, progress=progress
    )
    return answers, summarize(answers, methods)


def tuned_tree(measured: dict[str, Any], prediction: Prediction) -> dict[str, Any]:
    """Step 6: what ``mcsd tune`` saves: the tree of the fastest measured mcsd method (``none``
    where the target alone was as fast), or without measurements the best predicted tree."""
    mcsd_rows = {k: v for k, v in measured.items() if k.startswith(("tree:", "sps:"))}
    if not mcsd_rows:
        best = prediction.candidates[0]
        tree = best.name if best.tokens_per_s > prediction.plain_rate else NO_SPECULATION
        return {"tree": tree, "source": "predicted", "tuned_for": "greedy"}
    name = max(mcsd_rows, key=lambda k: mcsd_rows[k]["tokens_per_s"])
    if "ar" in measured and measured["ar"]["tokens_per_s"] >= measured[name]["tokens_per_s"]:
        name, tree = "ar", NO_SPECULATION
    elif name.startswith("sps:"):
        tree = ",".join(["1"] * int(name[4:]))
    else:
        tree = parse_method(name).tree
    row = measured[name]
    return {"tree": tree, "source": "measured", "tuned_for": "greedy"} | {
        key: row.get(key) for key in ("tokens_per_s", "mean_accepted_length", "speedup_vs_ar")
    }


def sweep_record(
    prediction: Prediction,
    references: References,
    questions: Sequence[Question],
    measured: dict[str, Any],
) -> dict[str, Any]:
    """Everything the sweep found, as ``sweep.json`` holds it."""
    costs, picks = prediction.costs, prediction.picks
    answers = zip(questions, references.prompts, references.runs, references.traces, strict=True)
    return {
        "budgets": list(prediction.budgets),
        "costs": {
            "context": prediction.context,
            "sizes": list(costs.target.tokens),
            "target_ms": [1e3 * t for t in costs.target.seconds],
            "draft_ms": [1e3 * t for t in costs.draft.seconds],
            "overhead_ms": 1e3 * costs.fixed,
            "chain_step_ms": 1e3 * prediction.chain_step,
        },
        "ar_tokens_per_s_predicted": prediction.plain_rate,
        "rank_frequencies": sweep.rank_frequencies(references.traces),
        "optimiser": {str(b): choice_record(p) for b, p in picks.items()},
        "candidates": [candidate_record(c) for c in prediction.candidates],
        "best_per_budget": {
            str(b): {key: candidate_record(c) for key, c in entry.items()}
            for b, entry in prediction.best.items()
        },
        "measured": measured,
        "references": [
            {"dataset": q.dataset, "question_id": q.question_id, "prompt_tokens": len(p)}
            | {"tokens": g.tokens, "draft_ranks": r}
            for q, p, g, r in answers
        ],
    }


def choice_record(choice: Choice) -> dict[str, Any]:
    return {
        "tree": choice.name,
        "expected_accepted_length": choice.accepted_length,
        "tokens_per_s": choice.tokens_per_s,
        "plain_tokens_per_s": choice.plain_tokens_per_s,
    }


def candidate_record(candidate: sweep.Candidate) -> dict[str, Any]:
    return {
        "tree": candidate.name,
        "nodes": candidate.tree.num_nodes,
        "depth": candidate.tree.max_depth,
        "mean_accepted_length": candidate.simulated.mean_accepted_length,
        "step_ms": 1e3 * candidate.step_time,
        "tokens_per_s": candidate.tokens_per_s,
    }
