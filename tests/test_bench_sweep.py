"""The tree sweep: exact greedy simulation from draft ranks, candidate shapes, the cost model,
and tuned defaults; the simulation is checked against the real engine on toy models."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import spec_decode, tiny_causal_lm

from mcsd.bench import sweep
from mcsd.bench.tuned import save_tuned, tuned_entry, tuned_key, tuned_key_for
from mcsd.budget import PairCost, StepCost
from mcsd.config import GREEDY, SpecConfig
from mcsd.engine import autoregressive_decode
from mcsd.tree import TokenTree

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_simulate_by_hand() -> None:
    chain = TokenTree.from_config("1,1,1")
    # 8 tokens all top-1: a step accepts 3 and adds 1 -> 2 steps.
    assert sweep.simulate(chain, [[0] * 8]) == sweep.Simulated(2, 8)
    # ranks 0,1 | 0,0,5 | 0: steps accept 1, 2, then the last token alone.
    assert sweep.simulate(chain, [[0, 1, 0, 0, 5, 0]]) == sweep.Simulated(3, 6)
    wide = TokenTree.from_config("2,1")
    assert sweep.simulate(wide, [[1, 0, 3, 0]]) == sweep.Simulated(2, 4)  # rank 1 then its child
    assert sweep.simulate(chain, [[], [0]]).mean_accepted_length == 1.0


def test_top_paths_tree_and_k_configs() -> None:
    frequencies = [0.8, 0.1, 0.05]
    assert sweep.tree_name(sweep.top_paths_tree(frequencies, 4, 10)) == "1,1,1,1"
    tree = sweep.top_paths_tree(frequencies, 5, 2)
    # 0.8, 0.64 (00), 0.1 (1), 0.08 (01 and 10): depth capped at 2.
    assert sorted(tree.rank_paths()) == [[0], [0, 0], [0, 1], [1], [1, 0]]
    configs = sweep.k_configs(6, max_depth=3)
    assert (4, 2, 2) not in configs and (2, 2) in configs and (1, 1, 1) in configs
    assert all(TokenTree.from_config(k).num_nodes <= 6 for k in configs)
    assert all(list(k) == sorted(k, reverse=True) for k in configs)
    trees = sweep.candidate_trees([[0, 0, 1, 0]], budgets=[4, 8], max_depth=4)
    assert len(set(trees)) == len(trees) and all(t.num_nodes <= 8 for t in trees)


def test_cost_model() -> None:
    """The sweep prices a step with mcsd.budget's model, its fixed seconds measured by tune."""
    target, draft = StepCost((1, 2, 4), (1.0, 1.0, 2.0)), StepCost((1, 2, 4), (0.25, 0.5, 0.5))
    costs = PairCost(target=target, draft=draft, overhead=0.0)
    assert costs.target(3) == pytest.approx(1.5)
    assert costs.target(6) == pytest.approx(3.0)  # extrapolated with the last slope
    costs = replace(costs, fixed=0.1)
    # (2,1): draft runs the root (1 token) and level 1 (2 nodes), not the leaves; target 5 tokens.
    tree = TokenTree.from_config("2,1")
    assert costs.step_time(tree) == pytest.approx(0.25 + 0.5 + 2.5 + 0.1)
    (ranked,) = sweep.rank_candidates([tree], [[0, 1, 0, 0]], costs)
    assert ranked.step_time == costs.step_time(tree) and ranked.name == "2,1"


def test_probe_after_a_context() -> None:
    """tune's probe (the budget's, after a context committed in every row): one point per size
    in all rows, each the median of its repeats after a warm-up; the runtime is left empty."""
    from mcsd.models.hf import HFModel
    from mcsd.models.toy import TableLM

    table = TableLM.random(4, batch_size=2)
    cost = StepCost.probe(table, (1, 3), context=[1, 2, 3], repeats=2)
    assert cost.tokens == (2, 6) and all(s > 0 for s in cost.seconds)
    assert table.forward_calls == 1 + 2 * 3 and table.cache_lengths() == (0, 0)
    hf = HFModel(tiny_causal_lm(seed=0, layers=1, vocab=64, hidden=32, sharpen=None))
    cost = StepCost.probe(hf, (1, 4), context=list(range(10)), repeats=1)
    assert cost.tokens == (1, 4) and hf.cache_lengths() == (0,)


def test_simulation_matches_the_engine() -> None:
    """AL predicted from draft ranks equals the engine's, for several shapes (toy HF models)."""
    from mcsd.models.hf import HFModel

    def model(seed: int, layers: int) -> HFModel:
        return HFModel(tiny_causal_lm(seed=seed, layers=layers, vocab=64, hidden=32, sharpen=None))

    target, draft = model(0, 2), model(0, 1)  # same embeddings: the draft is often right
    prompt = [3, 14, 15, 9, 26]
    answer = [s.tokens[0] for s in autoregressive_decode(target, prompt, GREEDY, 40, vocab_size=64)]
    ranks = sweep.draft_ranks(draft, prompt, answer, 64)
    with torch.no_grad():  # the ranks straight from the model's own forward
        logits = draft.hf_model(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1 : -1]
    chosen = logits.gather(1, torch.tensor(answer)[:, None])  # [T, 1]
    assert ranks == (logits > chosen).sum(dim=1).tolist()
    assert 0 in ranks and max(ranks) > 0  # the draft is right sometimes, not always
    for shape in ("1", "1,1,1", "2,1", "3,2,1", [[0], [1], [0, 0], [2], [0, 1]]):
        tree = TokenTree.parse(shape)
        spec = SpecConfig(tree=tree, target=GREEDY, max_new_tokens=40)
        steps = list(spec_decode(target, draft, prompt, spec, 64))
        assert [t for s in steps for t in s.tokens] == answer
        assert sweep.simulate(tree, [ranks]).steps == len(steps), shape


def test_tuned_defaults_round_trip(tmp_path) -> None:
    key = tuned_key("t", "d", "cuda:1", "torch.bfloat16", "hf-static")
    assert key == "t|d|cuda|bfloat16|hf-static"
    assert tuned_entry(key, cache=tmp_path) is None
    save_tuned(key, {"tree": "2,1,1"}, cache=tmp_path)
    save_tuned(tuned_key("t", "d", "cpu", "bfloat16", "hf"), {"tree": "4,2"}, cache=tmp_path)
    assert tuned_entry(key, cache=tmp_path)["tree"] == "2,1,1"
    assert tuned_entry("t|d|cpu|bfloat16|hf", cache=tmp_path)["tree"] == "4,2"
    (tmp_path / "tuned.json").write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        tuned_entry(key, cache=tmp_path)


def test_tuned_key_resolves_the_command_line_defaults() -> None:
    from mcsd.sources import DEFAULT_DRAFT, DEFAULT_TARGET

    key = tuned_key_for(None, None, "cpu", "float32", "auto")
    assert key == f"{DEFAULT_TARGET}|{DEFAULT_DRAFT}|cpu|float32|hf"
    with pytest.raises(ValueError, match="runtime must be one of"):
        tuned_key_for(None, None, "cpu", "float32", "tpu-magic")
