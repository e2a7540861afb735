"""The engine over B rows (``mcsd.engine.BatchEngine``, continuous batching).

- Each row's output equals the batch-1 output of the same prompt and seed, whatever shares the
  batch: ragged prompts, rows finishing at different steps, rows joining late (toy table LMs for
  every rule, seeded sampling included; tiny fp32 transformers models greedy and sampled on the
  hf runtime).
- Whole-engine losslessness at batch 4, different prompts per row, every rule; a deliberately
  broken batch engine (a row verified with its neighbour's target logits, i.e. reading another
  row's cache) is rejected by the same test, and one whose rows share a generator fails the
  identity test.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from conftest import greedy_reference, tiny_causal_lm

from mcsd.checks.engine import (
    BATCH_PROMPTS,
    RULE_TREES,
    EngineCase,
    batch_generations,
    run_batch_engine_case,
    run_engine_steps,
)
from mcsd.config import SamplingConfig, SpecConfig
from mcsd.draft.model import ModelProposer
from mcsd.engine import BatchEngine, autoregressive_decode, speculative_decode
from mcsd.models.hf import HFModel
from mcsd.verify.rules import RULES

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRIALS = 1000  # per prompt: 4,000 generations per case
LOSSLESS_CASES = [EngineCase(rule, RULE_TREES.get(rule, ("4,2,2",))[-1]) for rule in RULES] + [
    EngineCase("mcss-wor", "4,2,2", device_verify=True),
    EngineCase("topk", "paths", device_verify=True),
]


def batch_one(case: EngineCase, prompt: tuple[int, ...], seed: int) -> list[int]:
    return [t for step in run_engine_steps(replace(case, prompt=prompt), seed) for t in step]


def identity_jobs(count: int = 10) -> list[tuple[tuple[int, ...], int]]:
    return [(BATCH_PROMPTS[i % len(BATCH_PROMPTS)], 100 + i) for i in range(count)]


@pytest.mark.parametrize(
    "case",
    [
        EngineCase("mcss-wor", "4,2,2", length=5),
        EngineCase("greedy", "4,2,2", length=5),
        EngineCase("sps", "1,1,1", length=5),
        EngineCase("topk", "paths", length=5, device_verify=True),
        EngineCase("mcss", "2,2", length=5, device_verify=True),
        EngineCase("traversal", "4,2,2", length=5),
        EngineCase("mcss-wor", "2,2", length=5, runtime="fast"),
        EngineCase("greedy", "4,2,2", length=5, runtime="fast"),
    ],
    ids=lambda c: c.describe().replace(" ", "-"),
)
def test_rows_equal_batch_one(case: EngineCase) -> None:
    """10 jobs through 3 rows: every row joins as another finishes (late), ragged prompts."""
    jobs = identity_jobs()
    batched = batch_generations(case, jobs, batch=3)
    assert batched == [batch_one(case, prompt, seed) for prompt, seed in jobs]


class SharedGenerator(BatchEngine):
    """Broken: every row draws from the first row's generator."""

    def add(self, prompt_ids, spec, **kwargs) -> int:
        row = super().add(prompt_ids, spec, **kwargs)
        first = self.rows[min(self.rows)]
        self.rows[row].generator = first.generator
        return row


def test_rows_sharing_a_generator_are_caught() -> None:
    case = EngineCase("mcss-wor", "4,2,2", length=5)
    jobs = identity_jobs()
    batched = batch_generations(case, jobs, batch=3, engine_class=SharedGenerator)
    assert batched != [batch_one(case, prompt, seed) for prompt, seed in jobs]


def test_rows_of_different_lengths_finish_at_different_steps() -> None:
    case = EngineCase("mcss-wor", "2,2", vocab=4)
    target, draft = case.models_for_batch(2)
    spec = case.spec(3)
    engine = BatchEngine(target, ModelProposer.for_spec(draft, spec, 4), vocab_size=4)
    short = engine.add([1, 2], replace(spec, max_new_tokens=2))
    long = engine.add([3], replace(spec, max_new_tokens=9))
    finished: dict[int, int] = {}
    steps = 0
    while engine.rows:
        steps += 1
        for row, step in engine.step().items():
            if step.finish_reason is not None:
                finished[row] = steps
    assert finished[short] < finished[long]
    assert engine.free_rows() == [0, 1]


@pytest.mark.parametrize("case", LOSSLESS_CASES, ids=lambda c: c.describe().replace(" ", "-"))
def test_batch_of_four_is_lossless(case: EngineCase) -> None:
    fits = run_batch_engine_case(case, TRIALS, seed=1)
    assert all(fit.passed for fit in fits), (case.describe(), fits)


class NeighbourLogits(BatchEngine):
    """Broken: each row is verified against the next row's target logits (another row's cache)."""

    def _target_logits(self, rows, tokens, positions, mask):
        logits = super()._target_logits(rows, tokens, positions, mask)
        return logits[1:] + logits[:1]


def test_row_reading_another_rows_cache_is_caught() -> None:
    fits = run_batch_engine_case(
        EngineCase("mcss-wor", "4,2,2"), TRIALS, seed=1, engine_class=NeighbourLogits
    )
    assert not all(fit.passed for fit in fits), fits


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_hf_rows_equal_batch_one(temperature: float) -> None:
    """Tiny fp32 transformers models on the hf runtime: 5 prompts of different lengths through
    3 rows (late joins), each equal to its batch-1 generation; greedy equals transformers'."""
    target_lm, draft_lm = tiny_causal_lm(seed=0), tiny_causal_lm(seed=1, layers=1)
    vocab = 96
    spec = SpecConfig(
        tree="3,2", target=SamplingConfig(temperature=temperature), max_new_tokens=12, seed=7
    )
    prompts = [[5, 9, 11], [3], [40, 41, 42, 43, 44, 45, 46], [7, 7], [90, 1, 2, 3]]
    one = (HFModel(target_lm), HFModel(draft_lm))
    alone = []
    for i, prompt in enumerate(prompts):
        proposer = ModelProposer.for_spec(one[1], replace(spec, seed=i), vocab)
        steps = speculative_decode(
            one[0], proposer, prompt, replace(spec, seed=i), vocab_size=vocab
        )
        alone.append([t for step in steps for t in step.tokens])
    if temperature == 0.0:
        assert alone == [greedy_reference(target_lm, p, 12) for p in prompts]
    target, draft = HFModel(target_lm, batch_size=3), HFModel(draft_lm, batch_size=3)
    engine = BatchEngine(target, ModelProposer.for_spec(draft, spec, vocab), vocab_size=vocab)
    outputs: list[list[int]] = [[] for _ in prompts]
    waiting, job_of = list(enumerate(prompts)), {}
    while waiting or engine.rows:
        while waiting and engine.free_rows():
            job, prompt = waiting.pop(0)
            job_of[engine.add(prompt, replace(spec, seed=job))] = job
        for row, step in engine.step().items():
            outputs[job_of[row]] += step.tokens
    assert outputs == alone


def test_plain_rows_beside_speculative_rows() -> None:
    """Rows asking for no speculation (``tree="none"``) decode plainly beside speculative
    rows; each row equals its batch-1 run (plain: ``autoregressive_decode``), and a plain row's
    tokens reach the draft when it speculates again (a row switching mid-generation)."""
    case = EngineCase("mcss-wor", "4,2,2", length=6)
    spec = case.spec(0)
    plain = replace(spec, tree="none", rule=None)
    target, draft = case.models_for_batch(3)
    engine = BatchEngine(target, ModelProposer.for_spec(draft, spec, 4), vocab_size=4)
    rows = {
        engine.add([1, 2], replace(spec, seed=1)): ("spec", (1, 2), 1),
        engine.add([3], replace(plain, seed=2)): ("plain", (3,), 2),
        engine.add([0, 1, 2, 3], replace(plain, seed=3)): ("switch", (0, 1, 2, 3), 3),
    }
    outputs: dict[int, list[int]] = {row: [] for row in rows}
    steps = 0
    while engine.rows:
        steps += 1
        if steps == 3 and 2 in engine.rows:  # the third row speculates from its third step
            engine.rows[2].spec = replace(spec, seed=3)
        for row, step in engine.step().items():
            outputs[row] += step.tokens
    one_target, _ = case.models()
    for row, (kind, prompt, seed) in rows.items():
        if kind == "spec":
            assert outputs[row] == batch_one(case, prompt, seed)
        elif kind == "plain":
            alone = autoregressive_decode(
                one_target, list(prompt), spec.target, 6, vocab_size=4, seed=seed
            )
            assert outputs[row] == [t for step in alone for t in step.tokens]
        else:
            assert len(outputs[row]) == 6


def test_mixed_plain_and_speculative_steps_are_lossless() -> None:
    """Every row alternates plain and speculative steps (the adaptive budget may switch a row
    off and on): still the target's distribution."""

    speculating: dict[int, SpecConfig] = {}  # row -> its spec while it steps plainly

    class Alternating(BatchEngine):
        def step(self):
            for row, r in self.rows.items():
                if r.spec.speculative:
                    speculating[row] = r.spec
                    r.spec = replace(r.spec, tree="none", rule=None)
                else:
                    r.spec = speculating[row]
            return super().step()

    fits = run_batch_engine_case(
        EngineCase("mcss-wor", "2,2", length=4), TRIALS // 2, seed=2, engine_class=Alternating
    )
    assert all(fit.passed for fit in fits), fits


def test_generate_list_with_adaptive_tree_equals_target_greedy() -> None:
    """``mcsd.generate`` over token-id prompts at batch 2 with the measured budget (whatever
    tree it picks, greedy output is the target's own)."""
    from mcsd.api import ModelPair, generate

    target_lm, draft_lm = tiny_causal_lm(seed=0), tiny_causal_lm(seed=1, layers=1)
    pair = ModelPair(HFModel(target_lm), HFModel(draft_lm), None)
    prompts = [[5, 9, 11], [3], [40, 41, 42, 43]]
    spec = SpecConfig(tree="3,2", target=SamplingConfig(temperature=0.0), max_new_tokens=10)
    engine = pair.batch_engine(spec, 2, adaptive=True)
    assert engine.budget is not None and engine.budget.tree == spec.token_tree()
    results = generate(pair, prompts, spec, batch_size=2, adaptive=True)
    assert [r.token_ids for r in results] == [greedy_reference(target_lm, p, 10) for p in prompts]


def test_a_row_drafted_otherwise_is_refused() -> None:
    case = EngineCase("mcss-wor", "2,2")
    target, draft = case.models_for_batch(2)
    engine = BatchEngine(target, ModelProposer.for_spec(draft, case.spec(0), 4), vocab_size=4)
    with pytest.raises(ValueError, match="needs candidates drawn otherwise"):
        engine.add([1, 2], replace(case.spec(0), rule="mcss"))
    assert engine.free_rows() == [0, 1]


def test_one_row_proposers_run_at_batch_one() -> None:
    """Dynamic trees and the context proposer grow their trees one row at a time (``OneRow``):
    a list of prompts runs them one after the other, each as it runs alone (greedy: the
    target's own output; sampled: its seeded single run); a larger batch is refused, naming
    ``batch_size``, and so is the adaptive budget."""
    from mcsd.api import ModelPair, generate

    target_lm, draft_lm = tiny_causal_lm(seed=0), tiny_causal_lm(seed=1, layers=1)
    pair = ModelPair(HFModel(target_lm), HFModel(draft_lm), None)
    prompts = [[5, 9, 11, 5, 9], [3], [40, 41, 42, 43]]
    greedy = SamplingConfig(temperature=0.0)
    for spec in (
        SpecConfig(tree="dynamic:8:4:2", target=greedy, max_new_tokens=8),
        SpecConfig(proposer="context", target=greedy, max_new_tokens=8),
    ):
        results = generate(pair, prompts, spec)
        assert [r.token_ids for r in results] == [
            greedy_reference(target_lm, p, 8) for p in prompts
        ]
        with pytest.raises(ValueError, match=r"batch_size: tree .* runs one row at a time"):
            generate(pair, prompts, spec, batch_size=2)
        with pytest.raises(ValueError, match="adaptive"):
            generate(pair, prompts, spec, adaptive=True)
    sampled = SpecConfig(tree="dynamic:8:4:2", max_new_tokens=8, seed=3)
    alone = [generate(pair, p, sampled).token_ids for p in prompts]
    assert [r.token_ids for r in generate(pair, prompts, sampled)] == alone


def test_one_prompt_with_adaptive_tree() -> None:
    """``generate`` / ``stream`` of one prompt with ``adaptive=True``: the step cost is measured
    once per pair (every later engine reuses it, so seeded runs repeat), greedy output is the
    target's own."""
    from mcsd.api import ModelPair, generate, stream

    target_lm, draft_lm = tiny_causal_lm(seed=0), tiny_causal_lm(seed=1, layers=1)
    pair = ModelPair(HFModel(target_lm), HFModel(draft_lm), None)
    prompt = [5, 9, 11]
    greedy = SpecConfig(tree="3,2", target=SamplingConfig(temperature=0.0), max_new_tokens=10)
    result = generate(pair, prompt, greedy, adaptive=True)
    assert result.token_ids == greedy_reference(target_lm, prompt, 10)
    budget = pair.tree_budget(greedy.token_tree())
    assert list(pair._budgets) == [(greedy.token_tree(), 1)]
    sampled = replace(greedy, target=SamplingConfig(temperature=1.0), seed=4)
    chunks = stream(pair, prompt, sampled, adaptive=True)
    runs = [[t for chunk, _ in chunks for t in chunk.token_ids]]
    runs.append(generate(pair, prompt, sampled, adaptive=True).token_ids)
    assert runs[0] == runs[1] and pair.tree_budget(greedy.token_tree()) is budget
    assert pair.with_cheap_draft(int8=True)._budgets == {}  # another draft: measured anew
