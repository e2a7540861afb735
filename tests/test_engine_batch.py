"""The engine over B rows (``mcsd.engine.Engine``, continuous batching).

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
from mcsd.draft.proposer import Drafter
from mcsd.engine import Engine, autoregressive_decode, speculative_decode
from mcsd.models.hf import HFModel
from mcsd.models.toy import TableLM
from mcsd.request import Request
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


class SharedGenerator(Engine):
    """Broken: every row draws from the first row's generator."""

    first: Request | None = None

    def add_request(self, prompt_ids, spec, **kwargs) -> Request:
        request = super().add_request(prompt_ids, spec, **kwargs)
        self.first = self.first or request
        request.generator = self.first.generator
        return request


def test_rows_sharing_a_generator_are_caught() -> None:
    case = EngineCase("mcss-wor", "4,2,2", length=5)
    jobs = identity_jobs()
    batched = batch_generations(case, jobs, batch=3, engine_class=SharedGenerator)
    assert batched != [batch_one(case, prompt, seed) for prompt, seed in jobs]


def test_rows_of_different_lengths_finish_at_different_steps() -> None:
    case = EngineCase("mcss-wor", "2,2", vocab=4)
    target, draft = case.models_for_batch(2)
    spec = case.spec(3)
    engine = Engine(target, Drafter(draft, vocab_size=4), vocab_size=4)
    short = engine.add_request([1, 2], replace(spec, max_new_tokens=2))
    long = engine.add_request([3], replace(spec, max_new_tokens=9))
    finished: dict[Request, int] = {}
    steps = 0
    while engine.has_unfinished():
        steps += 1
        for request, step in engine.step():
            if step.finish_reason is not None:
                finished[request] = steps
    assert finished[short] < finished[long]
    assert engine.free_rows() == [0, 1]


@pytest.mark.parametrize("case", LOSSLESS_CASES, ids=lambda c: c.describe().replace(" ", "-"))
def test_batch_of_four_is_lossless(case: EngineCase) -> None:
    fits = run_batch_engine_case(case, TRIALS, seed=1)
    assert all(fit.passed for fit in fits), (case.describe(), fits)


class NeighbourLogits(Engine):
    """Broken: each row is verified against the next row's target logits (another row's cache)."""

    def _target_logits(self, requests, proposals, verifiers):
        logits = super()._target_logits(requests, proposals, verifiers)
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
        proposer = Drafter(one[1], vocab_size=vocab)
        steps = speculative_decode(
            one[0], proposer, prompt, replace(spec, seed=i), vocab_size=vocab
        )
        alone.append([t for step in steps for t in step.tokens])
    if temperature == 0.0:
        assert alone == [greedy_reference(target_lm, p, 12) for p in prompts]
    target, draft = HFModel(target_lm, batch_size=3), HFModel(draft_lm, batch_size=3)
    engine = Engine(target, Drafter(draft, vocab_size=vocab), vocab_size=vocab)
    requests = [engine.add_request(p, replace(spec, seed=i)) for i, p in enumerate(prompts)]
    while engine.has_unfinished():
        engine.step()
    assert [request.output_ids for request in requests] == alone


def test_plain_rows_beside_speculative_rows() -> None:
    """Rows asking for no speculation (``tree="none"``) decode plainly beside speculative
    rows; each row equals its batch-1 run (plain: ``autoregressive_decode``), and a plain step's
    tokens reach the draft when the row speculates again (a speculating request decoded
    plainly for its first steps, as an adaptive budget may)."""
    case = EngineCase("mcss-wor", "4,2,2", length=6)
    spec = case.spec(0)
    plain = replace(spec, tree="none", rule=None)
    target, draft = case.models_for_batch(3)

    class PlainFirst(Engine):
        """The third request steps plainly until its third step."""

        steps = 0

        def _trees(self, requests):
            self.steps += 1
            return {id(r): None for r in requests if r is switch and self.steps < 3}

    engine = PlainFirst(target, Drafter(draft, vocab_size=4), vocab_size=4)
    kinds = {
        engine.add_request([1, 2], replace(spec, seed=1)): ("spec", (1, 2), 1),
        engine.add_request([3], replace(plain, seed=2)): ("plain", (3,), 2),
    }
    switch = engine.add_request([0, 1, 2, 3], replace(spec, seed=3))
    kinds[switch] = ("switch", (0, 1, 2, 3), 3)
    while engine.has_unfinished():
        engine.step()
    one_target, _ = case.models()
    for request, (kind, prompt, seed) in kinds.items():
        if kind == "spec":
            assert request.output_ids == batch_one(case, prompt, seed)
        elif kind == "plain":
            alone = autoregressive_decode(
                one_target, list(prompt), spec.target, 6, vocab_size=4, seed=seed
            )
            assert request.output_ids == [t for step in alone for t in step.tokens]
        else:
            assert len(request.output_ids) == 6
            assert [r.tree_size for r in request.stats.records[:2]] == [0, 0]
            assert all(r.tree_size for r in request.stats.records[2:])


def test_mixed_plain_and_speculative_steps_are_lossless() -> None:
    """Every row alternates plain and speculative steps (the adaptive budget may switch a row
    off and on): still the target's distribution."""

    class Alternating(Engine):
        plain_turn = False

        def _trees(self, requests):
            self.plain_turn = not self.plain_turn
            return {id(r): None for r in requests} if self.plain_turn else {}

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
    engine = pair.batch_engine(2, budget_tree=spec.token_tree())
    assert engine.budget is not None and engine.budget.tree == spec.token_tree()
    results = generate(pair, prompts, spec, batch_size=2, adaptive=True)
    assert [r.token_ids for r in results] == [greedy_reference(target_lm, p, 10) for p in prompts]


MIXED_PROMPTS = [[1, 2, 3, 1, 2], [4], [5, 6, 1, 2, 5, 6, 1], [7, 1], [2, 2, 2, 2]]


def mixed_specs(temperature: float) -> list[SpecConfig]:
    """Requests of every kind: a static tree, a dynamic tree, the context's tree, plain
    decoding, and a static tree under another rule and draft sampling."""
    target = SamplingConfig(temperature=temperature)
    other = "greedy" if temperature == 0 else "mcss"
    return [
        SpecConfig(tree="4,2,2", target=target, max_new_tokens=16, seed=0),
        SpecConfig(tree="dynamic:6:2:3", target=target, max_new_tokens=16, seed=1),
        SpecConfig(proposer="context", target=target, max_new_tokens=16, seed=2),
        SpecConfig(tree="none", target=target, max_new_tokens=16, seed=3),
        SpecConfig(
            tree="2,2",
            rule=other,
            target=target,
            draft=SamplingConfig(temperature=0.7),
            max_new_tokens=16,
            seed=4,
        ),
    ]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_requests_of_every_kind_share_one_engine(temperature: float) -> None:
    """A fixed tree, a dynamic tree, a context tree, plain decoding and another rule's tree as
    rows of one engine at once: every speculating row's tree is verified in one target forward
    per step, and each request equals its output alone (greedy exactly, seeded identically:
    float64 toy tables)."""
    target, draft = TableLM.random(8, seed=11), TableLM.random(8, seed=23)
    specs = mixed_specs(temperature)
    alone = []
    for prompt, spec in zip(MIXED_PROMPTS, specs, strict=True):
        engine = Engine(target, Drafter(draft, vocab_size=8), vocab_size=8)
        request = engine.add_request(prompt, spec)
        while engine.has_unfinished():
            engine.step()
        alone.append(request.output_ids)
    if temperature == 0.0:
        plain = autoregressive_decode(target, MIXED_PROMPTS[0], specs[0].target, 16, vocab_size=8)
        assert alone[0] == [t for step in plain for t in step.tokens]
    rows = len(specs)
    many = target.with_rows(rows)
    forwards: list[int] = []  # new tokens of each target forward
    original = many.forward

    def counted(tokens, positions, tree_mask, **kwargs):
        forwards.append(tokens.shape[1])
        return original(tokens, positions, tree_mask, **kwargs)

    many.forward = counted  # type: ignore[method-assign]
    engine = Engine(many, Drafter(draft.with_rows(rows), vocab_size=8), vocab_size=8)
    requests = [engine.add_request(p, s) for p, s in zip(MIXED_PROMPTS, specs, strict=True)]
    engine.step()  # admits all five (a prefill each), then one step of every row
    prefills = len([p for p in MIXED_PROMPTS if len(p) > 1])
    assert len(forwards) == prefills + 2  # one forward for four trees, one plain forward
    sizes = {r.stats.records[0].tree_size for r in requests if r.plan.speculative}
    assert len(sizes) > 1  # trees of different shapes in that one forward
    while engine.has_unfinished():
        engine.step()
    assert [r.output_ids for r in requests] == alone
    assert engine.free_rows() == list(range(rows))


def test_dynamic_and_context_trees_run_in_batches() -> None:
    """Dynamic trees and the context's trees run as rows of a batch like static ones: a list
    of prompts at batch 3 gives each the target's own greedy output; the adaptive budget, which
    shrinks a static draft tree, refuses them naming ``adaptive``."""
    from mcsd.api import ModelPair, generate

    target_lm, draft_lm = tiny_causal_lm(seed=0), tiny_causal_lm(seed=1, layers=1)
    pair = ModelPair(HFModel(target_lm), HFModel(draft_lm), None)
    prompts = [[5, 9, 11, 5, 9], [3], [40, 41, 42, 43]]
    greedy = SamplingConfig(temperature=0.0)
    for spec in (
        SpecConfig(tree="dynamic:8:4:2", target=greedy, max_new_tokens=8),
        SpecConfig(proposer="context", target=greedy, max_new_tokens=8),
    ):
        results = generate(pair, prompts, spec, batch_size=3)
        assert [r.token_ids for r in results] == [
            greedy_reference(target_lm, p, 8) for p in prompts
        ]
        with pytest.raises(ValueError, match="adaptive"):
            generate(pair, prompts, spec, adaptive=True)
    sampled = SpecConfig(tree="dynamic:8:4:2", max_new_tokens=8, seed=3)
    alone = [generate(pair, p, sampled).token_ids for p in prompts]
    assert [r.token_ids for r in generate(pair, prompts, sampled, batch_size=1)] == alone


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


def test_abort_a_waiting_and_a_running_request() -> None:
    """``abort`` forgets a waiting request and frees a running one's row at once; the others
    run on as if alone, and a bad request is refused when it is added, naming the field."""
    case = EngineCase("mcss-wor", "2,2", vocab=4)
    target, draft = case.models_for_batch(2)
    engine = Engine(target, Drafter(draft, vocab_size=4), vocab_size=4)
    spec = replace(case.spec(5), max_new_tokens=6)
    first, second, third = (engine.add_request([1, 2], spec) for _ in range(3))
    engine.abort(third)  # still waiting
    assert third.status == "finished" and third.finish_reason == "abort"
    engine.step()
    assert (first.status, second.status) == ("running", "running")
    engine.abort(second)
    assert second.row is None and engine.free_rows() == [1]
    while engine.has_unfinished():
        engine.step()
    assert first.output_ids == batch_one(replace(case, length=6), (1, 2), 5)
    assert second.produced < 6 and not third.output_ids
    with pytest.raises(ValueError, match="prompt must contain at least one token") as refused:
        engine.add_request([], spec)
    assert refused.value.param == "prompt"
