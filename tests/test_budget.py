"""The adaptive tree budget (``mcsd.budget``): expected lengths, the ladder, the choice under a
step-cost model, the probe, and the engine following it (greedy output unchanged, sampled output
still the target's distribution)."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import ClassVar

import pytest
import torch

from mcsd.budget import (
    AcceptanceEstimate,
    AdaptiveTree,
    PairCost,
    StepCost,
    TreeBudget,
    acceptance_events,
    computed_rows,
    draft_widths,
    expected_length,
    ladder,
    probe_budget,
)
from mcsd.checks.engine import BATCH_PROMPTS, EngineCase, batch_generations, run_batch_engine_case
from mcsd.config import SamplingConfig, SpecConfig
from mcsd.draft.proposer import Drafter
from mcsd.engine import Engine, Step, autoregressive_decode, speculative_decode
from mcsd.models.toy import TableLM
from mcsd.sampling import draw_children, warp
from mcsd.stats import Stats
from mcsd.tree import TokenTree

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TREE = TokenTree.parse("4,2,2")
FLAT = StepCost((1, 64, 128), (1.0, 1.0, 2.0))  # free up to 64 tokens, then linear
STEEP = StepCost((1, 2), (1.0, 2.0))  # every token costs a full forward


def test_expected_length_exact() -> None:
    a = 0.3
    assert expected_length(TokenTree.parse("1,1"), a) == pytest.approx(1 + a + a * a)
    assert expected_length(TokenTree.parse("2"), a) == pytest.approx(1 + a + (1 - a) * a)
    assert expected_length(TREE, 0.0) == 1.0
    assert expected_length(TREE, 1.0) == 4.0


def test_ladder_and_draft_widths() -> None:
    assert [t.num_nodes for t in ladder(TREE)] == [28, 14, 7, 3, 1]
    assert all(t.parents == TREE.parents[: t.num_nodes] for t in ladder(TREE))
    assert draft_widths(TREE) == (1, 4, 8)


def test_tree_shrinks_with_the_batch_down_to_plain_decoding() -> None:
    budget = TreeBudget(TREE, costs=PairCost(target=FLAT, draft=StepCost((1, 1000), (0.01, 0.02))))
    sizes = [budget.tree_for(rows) for rows in (1, 2, 8, 32)]
    assert sizes[0] == TREE  # free at batch 1
    nodes = [t.num_nodes if t else 0 for t in sizes]
    assert nodes == sorted(nodes, reverse=True) and nodes[-1] < TREE.num_nodes
    assert TreeBudget(TREE, costs=PairCost(target=STEEP, draft=STEEP)).tree_for(16) is None


def test_overhead_keeps_a_marginal_tree_plain() -> None:
    """The H200 server's one-row costs (target 1 token 3.6 ms, 4 tokens 4.1 ms; a draft level
    2.6 ms): at acceptance 0.6 a 3-node tree is priced ~4% faster than plain decoding on its
    forwards alone, and slower once the step's work outside them (10%) counts; a chain of 3
    accepted in full still pays."""
    target = StepCost((1, 2, 4), (3.6e-3, 4.0e-3, 4.1e-3))
    draft = StepCost((1, 2, 4), (2.6e-3, 2.9e-3, 3.0e-3))
    fan = TokenTree.from_config((3,))
    costs = PairCost(target=target, draft=draft)
    bare = TreeBudget(fan, costs=replace(costs, overhead=0.0))
    assert bare.rate(fan, 1) / bare.rate(None, 1) == pytest.approx(1.04, abs=0.01)
    assert bare.tree_for(1) == fan
    assert TreeBudget(fan, costs=costs).tree_for(1) is None
    assert TreeBudget(CHAIN, costs=costs).tree_for(1, acceptance=1.0) == CHAIN  # AL 4 pays


def test_bad_budget_inputs() -> None:
    with pytest.raises(ValueError, match="tokens must be increasing"):
        StepCost((4, 2), (1.0, 1.0))
    with pytest.raises(ValueError, match="acceptance must be in"):
        TreeBudget(TREE, costs=PairCost(target=FLAT, draft=FLAT), acceptance=1.5)


def test_probe_measures_a_runtime() -> None:
    cost = StepCost.probe(TableLM.random(4, batch_size=2), (1, 2, 4), repeats=1)
    assert cost.tokens == (2, 4, 8) and all(s > 0 for s in cost.seconds)
    budget = probe_budget(TREE, TableLM.random(4, batch_size=2), TableLM.random(4), repeats=1)
    assert budget.costs.target.tokens == (2, 4, 8, 16, 32, 58)
    assert budget.costs.draft.tokens == (1, 2, 4, 8)


class Budgeted(Engine):
    """The engine under a budget that gives a 3-node tree to one row, one node each to two and
    plain decoding to three rows or more (rows of the runtime: free ones run as padding)."""

    def __init__(self, *args, **kwargs) -> None:
        target, draft = StepCost((1, 4, 5), (1.0, 1.0, 2.0)), StepCost((1, 100), (0.05, 0.06))
        costs = PairCost(target=target, draft=draft)
        super().__init__(*args, budget=TreeBudget(TREE, costs=costs, acceptance=0.5), **kwargs)
        nodes = [self.budget.tree_for(b) for b in (1, 2, 3)]
        assert [t.num_nodes if t else 0 for t in nodes] == [3, 1, 0]


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_budgeted_greedy_rows_equal_batch_one(batch: int) -> None:
    case = EngineCase("greedy", "4,2,2", length=6)
    jobs = [(BATCH_PROMPTS[i % 4], i) for i in range(9)]
    budgeted = batch_generations(case, jobs, batch=batch, engine_class=Budgeted)
    target, draft = case.models()
    for (prompt, seed), out in zip(jobs, budgeted, strict=True):
        spec = case.spec(seed)
        proposer = Drafter(draft, vocab_size=4)
        alone = speculative_decode(target, proposer, list(prompt), spec, vocab_size=4)
        assert out == [t for step in alone for t in step.tokens]


@pytest.mark.parametrize("batch", [1, 2])
def test_budgeted_sampling_is_lossless(batch: int) -> None:
    case = EngineCase("mcss-wor", "4,2,2")
    fits = run_batch_engine_case(case, 600, batch=batch, seed=3, engine_class=Budgeted)
    assert all(fit.passed for fit in fits), fits


def test_rows_with_their_own_trees_share_an_engine() -> None:
    """Rows asking for different trees (and one none) in one engine: each as alone."""
    case = EngineCase("mcss-wor", "4,2,2", length=5)
    target, draft = case.models_for_batch(3)
    engine = Engine(target, Drafter(draft, vocab_size=4), vocab_size=4)
    asks = {"4,2,2": (1, 2), "2,1": (3,), "1,1,1": (0, 1, 2, 3)}
    requests = {
        engine.add_request(list(p), replace(case.spec(7), tree=t)): (t, p) for t, p in asks.items()
    }
    while engine.has_unfinished():
        engine.step()
    one_target, one_draft = case.models()
    for request, (tree, prompt) in requests.items():
        spec = replace(case.spec(7), tree=tree)
        proposer = Drafter(one_draft, vocab_size=4)
        alone = speculative_decode(one_target, proposer, list(prompt), spec, vocab_size=4)
        assert request.output_ids == [t for step in alone for t in step.tokens], tree


# ------------------------------------------------------------------ online acceptance
CHAIN = TokenTree.parse("1,1,1")
# A 1-node step costs 1.3 plain steps (free target, a draft forward of 0.3): the 1-node tree
# pays above acceptance 0.3 and beats the chain at the prior 0.6.
PRICEY_DRAFT = PairCost(target=FLAT, draft=StepCost((1, 100), (0.3, 0.3)))


def constant(p: list[float]) -> TableLM:
    """A table LM whose next-token distribution ignores the context."""
    probs = torch.tensor(p, dtype=torch.float64)
    return TableLM(lambda context: probs, len(p))


def decode(target, draft, spec: SpecConfig, budget: TreeBudget, prompt=(1, 2)) -> list[Step]:
    proposer = Drafter(draft, vocab_size=target.vocab_size)
    steps = speculative_decode(
        target, proposer, list(prompt), spec, vocab_size=target.vocab_size, budget=budget
    )
    return list(steps)


def tokens_of(steps: list[Step]) -> list[int]:
    return [t for step in steps for t in step.tokens]


def test_the_budget_is_asked_for_the_rows_a_forward_computes() -> None:
    """Every row of a runtime that runs free rows as padding; what a runtime with a native
    subset forward says it computes (``computed_rows``: the rows given on llama.cpp, a row
    bucket on the static slot cache)."""

    class Subset(TableLM):
        def computed_rows(self, rows):  # the optional runtime method
            return len(rows) + 1

    assert computed_rows(TableLM.random(4, batch_size=8), [0, 1, 2]) == 8
    assert computed_rows(Subset(TableLM.random(4).table, 4, batch_size=8), [0, 1, 2]) == 4


def test_acceptance_events_count_every_visited_candidate() -> None:
    assert acceptance_events(TREE, ()) == (0, 4)  # the root's 4 children all rejected
    assert acceptance_events(TREE, (2,)) == (1, 3 + 2)  # 2 rejected, 1 accepted, its 2 rejected
    assert acceptance_events(TREE, (3, 1, 0)) == (3, 4 + 2 + 1)  # a leaf: nothing below it
    assert acceptance_events(CHAIN, (0, 0, 0)) == (3, 3)
    assert acceptance_events(CHAIN, (0,)) == (1, 2)


def test_estimate_starts_at_the_prior_and_forgets_it() -> None:
    estimate = AcceptanceEstimate(0.6, 4.0, 0.5)
    assert estimate.value == pytest.approx(0.6)
    for _ in range(40):
        estimate.add(1, 4)
    assert estimate.value == pytest.approx(0.25)


def test_bad_adaptive_settings() -> None:
    costs = PairCost(target=FLAT, draft=FLAT)
    for field, value, message in (
        ("weight", 0.0, "weight must be in"),
        ("reprobe", 0, "reprobe must be an integer"),
        ("prior_trials", -1.0, "prior_trials must be a number"),
    ):
        with pytest.raises(ValueError, match=message):
            TreeBudget(TREE, costs=costs, **{field: value})
    for field, value in (("overhead", -0.1), ("fixed", float("nan"))):
        with pytest.raises(ValueError, match=f"{field} must be a number >= 0"):
            replace(costs, **{field: value})


def test_estimate_converges_to_the_known_acceptance() -> None:
    """Context-free tables: SpS accepts each candidate with probability sum min(p, q) = 0.4,
    independently of the rest; the estimate moves from the prior 0.6 to it."""
    target = constant([0.7, 0.1, 0.1, 0.1])
    draft = constant([0.1, 0.1, 0.1, 0.7])
    spec = SpecConfig(tree="1,1,1", rule="sps", max_new_tokens=600, seed=5)
    costs = PairCost(target=FLAT, draft=StepCost((1, 100), (0.01, 0.01)))
    budget = TreeBudget(CHAIN, costs=costs, weight=0.005)
    engine = Engine(target, Drafter(draft, vocab_size=4), vocab_size=4, budget=budget)
    steps = list(_rows_of(engine, spec))
    assert all(step.record.tree_size == 3 for step in steps)  # the chain pays all along
    assert engine.adaptive is not None
    assert engine.adaptive.estimate.value == pytest.approx(0.4, abs=0.07)


def _rows_of(engine: Engine, spec: SpecConfig, prompt=(1, 2)):
    request = engine.add_request(list(prompt), spec)
    while request.finish_reason is None:
        yield from (step for stepped, step in engine.step() if stepped is request)


def test_a_draft_that_never_matches_switches_to_plain_and_reprobes() -> None:
    """Greedy, the draft's argmax never the target's: within a few steps the budget decodes
    plainly, then grows the smallest tree once every ``reprobe`` plain steps; the output is the
    target's own greedy output."""
    target = constant([0.7, 0.1, 0.1, 0.1])
    draft = constant([0.1, 0.1, 0.1, 0.7])
    spec = SpecConfig(tree="1,1,1", target=SamplingConfig(temperature=0.0), max_new_tokens=40)
    budget = TreeBudget(CHAIN, costs=PRICEY_DRAFT, reprobe=5)
    steps = decode(target, draft, spec, budget)
    sizes = [step.record.tree_size for step in steps]
    first_plain = sizes.index(0)
    assert first_plain <= 5 and set(sizes[:first_plain]) == {1}
    after = sizes[first_plain:]
    assert after == [0 if (i + 1) % 6 else 1 for i in range(len(after))]  # 5 plain, 1 probe
    assert tokens_of(steps) == [0] * 40
    stats = Stats()
    for step in steps:
        stats.add(step.record)
    assert stats.plain_steps == sizes.count(0) and "plain" in stats.summary()


def test_costs_alone_rule_speculation_out_no_reprobe() -> None:
    """Where no tree pays even when every candidate is accepted, nothing is ever drafted."""
    target, draft = constant([0.7, 0.1, 0.1, 0.1]), constant([0.7, 0.1, 0.1, 0.1])
    spec = SpecConfig(tree="1,1,1", target=SamplingConfig(temperature=0.0), max_new_tokens=80)
    budget = TreeBudget(CHAIN, costs=PairCost(target=STEEP, draft=STEEP), reprobe=3)
    steps = decode(target, draft, spec, budget)
    assert [step.record.tree_size for step in steps] == [0] * 80


def test_llama_cpp_costs_decode_plainly_and_never_run_the_draft() -> None:
    """The costs measured on llama.cpp's CPU kernels (a decode of N tokens ~0.6 N single-token
    decodes, the draft 0.65 of the target): plain from the first step, and a re-probe would
    cost the draft's catch-up on 33 skipped tokens, which no acceptance repays: the draft
    never runs, not even over the prompt (it reads a row's tokens only when it drafts)."""
    llama = PairCost(
        target=StepCost((1, 2, 4), (1.0, 1.2, 2.4)), draft=StepCost((1, 2), (0.65, 0.78))
    )
    budget = TreeBudget(CHAIN, costs=llama)
    assert not budget.reprobe_pays(1)
    assert replace(budget, reprobe=1, costs=replace(llama, overhead=0.0)).reprobe_pays(1)
    assert "stays plain" in budget.describe(1)
    target, draft = constant([0.7, 0.1, 0.1, 0.1]), constant([0.7, 0.1, 0.1, 0.1])
    spec = SpecConfig(tree="1,1,1", max_new_tokens=100, seed=1)
    steps = decode(target, draft, spec, budget)
    assert [step.record.tree_size for step in steps] == [0] * 100
    assert draft.forward_calls == 0


def test_a_draft_equal_to_the_target_keeps_the_full_tree() -> None:
    target = TableLM.random(4, seed=11)
    spec = SpecConfig(tree="4,2,2", target=SamplingConfig(temperature=0.0), max_new_tokens=30)
    budget = TreeBudget(TREE, costs=PairCost(target=FLAT, draft=StepCost((1, 1000), (0.01, 0.02))))
    engine = Engine(
        target,
        Drafter(TableLM.random(4, seed=11), vocab_size=4),
        vocab_size=4,
        budget=budget,
    )
    steps = list(_rows_of(engine, spec))
    assert all(step.record.tree_size == TREE.num_nodes for step in steps)
    assert all(step.record.accepted == 3 for step in steps[:-1])
    assert engine.adaptive is not None and engine.adaptive.estimate.value > 0.95


def mid_budget(tree: TokenTree, reprobe: int = 2, draft_cost: float = 0.8) -> TreeBudget:
    """A draft forward costing ``draft_cost`` target steps (0.8: plain decoding pays below an
    acceptance of ~0.45, the 3-node tree up to ~0.75, the full tree above): break-even points
    near the toy pairs' own acceptance (~0.6 sampled, ~0.75 greedy: use 0.95 there), and with
    a short memory (``weight``) the engine switches trees, and to plain decoding, often. No
    overhead outside the forwards, so that these points are where the docstring says."""
    draft = StepCost((1, 100), (draft_cost, draft_cost))
    costs = PairCost(target=FLAT, draft=draft, overhead=0.0)
    return TreeBudget(tree, costs=costs, weight=0.3, reprobe=reprobe)


def adaptive_engine(budget: TreeBudget) -> type[Engine]:
    """A ``Engine`` under ``budget`` that counts its plain and speculative forwards."""

    class Adaptive(Engine):
        forwards: ClassVar[Counter[str]] = Counter()

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, budget=budget, **kwargs)

        def _plain_step(self, rows):
            Adaptive.forwards["plain"] += 1
            return super()._plain_step(rows)

        def _speculative_step(self, rows, trees):
            Adaptive.forwards["speculative"] += 1
            return super()._speculative_step(rows, trees)

    return Adaptive


@pytest.mark.parametrize("prompt", BATCH_PROMPTS)
def test_adaptive_greedy_equals_the_target_greedy(prompt: tuple[int, ...]) -> None:
    case = EngineCase("greedy", "4,2,2", length=40)
    target, draft = case.models()
    steps = decode(target, draft, case.spec(0), mid_budget(TREE, draft_cost=0.95), prompt)
    sizes = {step.record.tree_size for step in steps}
    assert 0 in sizes and len(sizes) > 1  # plain and speculative steps both ran
    alone = autoregressive_decode(
        case.models()[0], list(prompt), SamplingConfig(temperature=0.0), 40, vocab_size=4
    )
    assert tokens_of(steps) == tokens_of(list(alone))


def test_adaptive_seeded_sampling_is_reproducible() -> None:
    case = EngineCase("mcss-wor", "4,2,2", length=60)
    runs = [decode(*case.models(), case.spec(9), mid_budget(TREE)) for _ in range(2)]
    sizes = [step.record.tree_size for step in runs[0]]
    assert 0 in sizes and set(sizes) != {0}
    assert tokens_of(runs[0]) == tokens_of(runs[1])
    assert sizes == [step.record.tree_size for step in runs[1]]


@pytest.mark.parametrize("batch", [1, 2])
def test_adaptive_sampling_is_lossless(batch: int) -> None:
    """Through the whole engine, the estimate carried from generation to generation and from
    row to row, plain and speculative steps mixed: still the target's distribution."""
    case = EngineCase("mcss-wor", "4,2,2", length=3)
    engine_class = adaptive_engine(mid_budget(TREE, reprobe=1))
    fits = run_batch_engine_case(case, 500, batch=batch, seed=4, engine_class=engine_class)
    assert all(fit.passed for fit in fits), fits
    assert min(engine_class.forwards.values()) > 100, engine_class.forwards  # both kinds ran


class Peeking(AdaptiveTree):
    """Deliberately wrong: speculates only when the draft's first candidate (drawn from a copy
    of the row's generator, so the step draws it again) is the target's argmax."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(mid_budget(TREE))
        self.engine = engine

    def choose(self, rows: int) -> TokenTree | None:
        (row,) = self.engine.running.values()
        draft = self.engine.proposer.model.draft
        context = tuple(row.committed)
        q = warp(torch.log(draft.table(context)).float()[None], row.plan.draft)
        copy = torch.Generator().manual_seed(0)
        copy.set_state(row.generator.get_state())
        replacement = row.plan.candidates.replacement
        first = draw_children(q, 1, replacement=replacement, generator=copy)[0, 0]
        best = int(self.engine.target.table(context).argmax())
        return self.budget.tree if int(first) == best else None


def test_a_controller_that_peeks_at_the_step_is_caught() -> None:
    """The check that passes the real controller fails one that decides from this step's
    draws (``mcsd.budget``'s docstring: ``choose`` sees a row count, nothing drawn)."""

    class PeekingEngine(Engine):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, budget=mid_budget(TREE), **kwargs)
            self.adaptive = Peeking(self)

    case = EngineCase("mcss-wor", "4,2,2", length=1)
    honest = run_batch_engine_case(
        case, 1500, batch=1, seed=5, engine_class=adaptive_engine(mid_budget(TREE, reprobe=1))
    )
    assert all(fit.passed for fit in honest), honest
    peeking = run_batch_engine_case(case, 1500, batch=1, seed=5, engine_class=PeekingEngine)
    assert not all(fit.passed for fit in peeking), peeking


def test_adaptive_on_llama_cpp(tmp_path) -> None:
    """The CLI's default on llama.cpp, through the real runtime (two tiny GGUF models): the probe
    runs there, greedy output is the target's own (``ar``'s), seeded sampling repeats."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from mcsd.api import load_pair
    from mcsd.bench.methods import parse_method, run_method
    from mcsd.checks.tiny_gguf import TinyGGUF
    from mcsd.config import LlamaCppConfig

    target = TinyGGUF(seed=1).write(tmp_path / "target.gguf")
    draft = TinyGGUF(seed=1, head_scale=1.3).write(tmp_path / "draft.gguf")
    tiny = LlamaCppConfig(context=64, pending_cells=64, batch=32, sequences=32, threads=1)
    pair = load_pair(str(target), str(draft), runtime="llama.cpp", llamacpp=tiny)
    base = SpecConfig(
        tree="1", target=SamplingConfig(temperature=0.0), max_new_tokens=12, stop_token_ids=()
    )
    adaptive, ar = (parse_method(name) for name in ("tree:1,1,1+adaptive", "ar"))
    prompt = [1, 2, 0]
    plain = run_method(ar, pair, prompt, base).tokens
    assert run_method(adaptive, pair, prompt, base).tokens == plain
    assert pair.tree_budget(TokenTree.parse("1,1,1")).costs.target.tokens == (1, 2, 4)
    sampled = replace(base, target=SamplingConfig(temperature=1.0), seed=3)
    runs = [run_method(adaptive, pair, prompt, sampled).tokens for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == 12
