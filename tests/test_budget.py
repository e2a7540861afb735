"""The adaptive tree budget (``mcsd.budget``): expected lengths, the ladder, the choice under a
step-cost model, the probe, and the engine following it (greedy output unchanged, sampled output
still the target's distribution)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from mcsd.budget import (
    StepCost,
    TreeBudget,
    draft_widths,
    expected_length,
    ladder,
    probe_budget,
)
from mcsd.checks.engine import BATCH_PROMPTS, EngineCase, batch_generations, run_batch_engine_case
from mcsd.draft.model import ModelProposer
from mcsd.engine import BatchEngine, speculative_decode
from mcsd.models.toy import TableLM
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
    budget = TreeBudget(TREE, target=FLAT, draft=StepCost((1, 1000), (0.01, 0.02)))
    sizes = [budget.tree_for(rows) for rows in (1, 2, 8, 32)]
    assert sizes[0] == TREE  # free at batch 1
    nodes = [t.num_nodes if t else 0 for t in sizes]
    assert nodes == sorted(nodes, reverse=True) and nodes[-1] < TREE.num_nodes
    assert TreeBudget(TREE, target=STEEP, draft=STEEP).tree_for(16) is None


def test_bad_budget_inputs() -> None:
    with pytest.raises(ValueError, match="tokens must be increasing"):
        StepCost((4, 2), (1.0, 1.0))
    with pytest.raises(ValueError, match="acceptance must be in"):
        TreeBudget(TREE, FLAT, FLAT, acceptance=1.5)


def test_probe_measures_a_runtime() -> None:
    cost = StepCost.probe(TableLM.random(4, batch_size=2), (1, 2, 4), repeats=1)
    assert cost.tokens == (2, 4, 8) and all(s > 0 for s in cost.seconds)
    budget = probe_budget(TREE, TableLM.random(4, batch_size=2), TableLM.random(4), repeats=1)
    assert budget.target.tokens == (2, 4, 8, 16, 32, 58) and budget.draft.tokens == (1, 2, 4, 8)


class Budgeted(BatchEngine):
    """The engine under a budget that gives a 3-node tree to one row, one node each to two and
    plain decoding to three rows or more (rows of the runtime: free ones run as padding)."""

    def __init__(self, *args, **kwargs) -> None:
        target, draft = StepCost((1, 4, 5), (1.0, 1.0, 2.0)), StepCost((1, 100), (0.05, 0.06))
        super().__init__(*args, budget=TreeBudget(TREE, target, draft, acceptance=0.5), **kwargs)
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
        proposer = ModelProposer.for_spec(draft, spec, 4)
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
    engine = BatchEngine(target, ModelProposer.for_spec(draft, case.spec(0), 4), vocab_size=4)
    asks = {"4,2,2": (1, 2), "2,1": (3,), "1,1,1": (0, 1, 2, 3)}
    rows = {engine.add(list(p), replace(case.spec(7), tree=t)): (t, p) for t, p in asks.items()}
    outputs = {row: [] for row in rows}
    while engine.rows:
        for row, step in engine.step().items():
            outputs[row] += step.tokens
    one_target, one_draft = case.models()
    for row, (tree, prompt) in rows.items():
        spec = replace(case.spec(7), tree=tree)
        proposer = ModelProposer.for_spec(one_draft, spec, 4)
        alone = speculative_decode(one_target, proposer, list(prompt), spec, vocab_size=4)
        assert outputs[row] == [t for step in alone for t in step.tokens], tree
