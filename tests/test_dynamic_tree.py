"""Dynamic trees (mcsd.draft.dynamic): lossless rules, shapes, the engine's verifier cache.

The whole-engine distribution tests of every dynamic mode are cases of
``mcsd.checks.engine.engine_cases`` (run by tests/test_engine_lossless.py); here: the exact
node-level argument for the sampled mode (a prefix of draws without replacement is lossless,
draws pruned by their own probabilities are not), the same wrong pruning caught through the
whole engine, greedy identity on a real (tiny) model, tree sizes and configuration errors.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import replace

import pytest
import torch

import mcsd.plan as plan_module
from mcsd import engine
from mcsd.checks.engine import EngineCase, run_engine_case, tiny_fast
from mcsd.config import DynamicTreeConfig, SamplingConfig, SpecConfig
from mcsd.draft.proposer import Drafter
from mcsd.engine import autoregressive_decode, speculative_decode
from mcsd.models.toy import TableLM
from mcsd.request import one_request
from mcsd.verify.rules import node_outcome

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRIALS = 3000  # as in tests/test_engine_lossless.py


def _wor_sequences(q: torch.Tensor, k: int):
    """Every ordered draw of ``k`` distinct tokens from ``q`` without replacement, with its
    probability."""
    vocab = len(q)
    for seq in itertools.permutations(range(vocab), k):
        prob, mass = 1.0, 1.0
        for token in seq:
            prob *= float(q[token]) / mass
            mass -= float(q[token])
        if prob > 0:
            yield seq, prob


def _emitted(rule: str, p: torch.Tensor, q: torch.Tensor, draws) -> torch.Tensor:
    """Exact distribution of the emitted token when ``draws`` lists (candidates, probability)."""
    out = torch.zeros(len(p), dtype=torch.float64)
    for candidates, prob in draws:
        cands = torch.tensor(candidates)
        accept, correction = node_outcome(rule, p, q, cands)
        out.index_add_(0, cands, prob * accept)
        out += prob * correction
    return out


@pytest.mark.parametrize("seed", range(6))
def test_prefix_of_draws_is_lossless_and_pruned_draws_are_not(seed: int) -> None:
    """Exact enumeration (vocabulary 5): a node keeping the first m of its draws without
    replacement (m fixed before the draw) emits p under mcss-wor; the draft's top-m with the
    one-hot rule emits p; keeping the m most probable of 3 draws (in draw order), verified as a
    draw without replacement, does not."""
    generator = torch.Generator().manual_seed(seed)
    vocab, m = 5, 2
    p = torch.rand(vocab, generator=generator, dtype=torch.float64) ** 2
    q = torch.rand(vocab, generator=generator, dtype=torch.float64) ** 2
    p, q = p / p.sum(), q / q.sum()
    prefix = _emitted("mcss-wor", p, q, _wor_sequences(q, m))
    assert torch.allclose(prefix, p, atol=1e-9)
    top = tuple(torch.topk(q, m).indices.tolist())
    assert torch.allclose(_emitted("topk", p, None, [(top, 1.0)]), p, atol=1e-9)

    def pruned():
        for seq, prob in _wor_sequences(q, 3):
            best = sorted(seq, key=lambda t: -float(q[t]))[:m]
            yield tuple(t for t in seq if t in best), prob

    assert (_emitted("mcss-wor", p, q, pruned()) - p).abs().sum() > 1e-3


def test_sampled_draws_pruned_by_probability_are_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The deterministic mode's keep-the-best-budget pruning applied to sampled candidates,
    verified with mcss-wor as if each node's children were a draw without replacement: the
    whole-engine test that passes the real proposer must reject it."""
    original = plan_module.candidate_scheme

    def pruning(rule, draft):
        return replace(original(rule, draft), prune=True)

    monkeypatch.setattr(plan_module, "candidate_scheme", pruning)
    result = run_engine_case(EngineCase("mcss-wor", "dynamic"), TRIALS, seed=1)
    assert not result.fit.passed, result.fit


def _steps(spec: SpecConfig, target, draft, vocab: int, prompt=(1, 2)):
    proposer = Drafter(draft, vocab_size=vocab)
    return list(speculative_decode(target, proposer, list(prompt), spec, vocab_size=vocab))


@pytest.mark.parametrize("runtime", ["table", "fast"])
def test_greedy_dynamic_output_equals_target_greedy(runtime: str) -> None:
    if runtime == "fast":  # tiny random models on the fast runtime (a real model in the loop)
        target, draft, vocab, prompt = tiny_fast(8, 11), tiny_fast(8, 23), 8, [1, 5, 3]
    else:
        target, draft = TableLM.random(8, seed=11), TableLM.random(8, seed=23)
        vocab, prompt = 8, [1, 2]
    spec = SpecConfig(
        tree="dynamic:6:2:4", target=SamplingConfig(temperature=0.0), max_new_tokens=24
    )
    plain = autoregressive_decode(target, prompt, spec.target, 24, vocab_size=vocab)
    expected = [t for step in plain for t in step.tokens]
    steps = _steps(spec, target, draft, vocab, prompt)
    assert [t for step in steps for t in step.tokens] == expected
    assert len(expected) == 24 and len(set(expected)) > 1  # not a degenerate repetition


@pytest.mark.parametrize("rule", ["topk", "mcss-wor"])
def test_variable_trees_run_on_captured_shapes(rule: str) -> None:
    """On the fast runtime every verify forward of a tree that changes each step is padded to
    one capturable bucket (budget 8 + root -> 16 tokens) and every draft level to a bucket of
    at most ``width``: a bounded set of CUDA-graph shapes however the trees vary."""
    target, draft = tiny_fast(8, 11), tiny_fast(8, 23)
    shapes: dict[str, list[int]] = {"target": [], "draft": []}
    for name, model in (("target", target), ("draft", draft)):
        graphs = model._graphs
        original = graphs.run

        def run(key, fn, original=original, seen=shapes[name]):
            seen.append(key[1])  # key: (rows, tokens, arange)
            return original(key, fn)

        graphs.run = run
    spec = SpecConfig(
        tree="dynamic:8:3:3",
        rule=rule,
        draft=SamplingConfig(temperature=0.8),
        max_new_tokens=24,
        seed=1,
    )
    steps = _steps(spec, target, draft, 8, [1, 5, 3])
    assert shapes["target"].count(16) == len(steps)  # every verify forward, one shape
    assert set(shapes["target"]) <= {1, 2, 16}  # besides: the pending token alone
    assert set(shapes["draft"]) <= {1, 2, 4}


@pytest.mark.parametrize(
    ("rule", "draft_temperature"), [("topk", 0.0), ("topk", 0.8), ("mcss-wor", 0.8)]
)
def test_tree_sizes(rule: str, draft_temperature: float) -> None:
    """Deterministic trees have exactly the budget (the draft has the tokens: 3 + 9 + 27 grown
    for 8 kept); sampled trees spread min(width, budget left) nodes per level: 3 + 3 + 2."""
    spec = SpecConfig(
        tree="dynamic:8:3:3",
        rule=rule,
        draft=SamplingConfig(temperature=draft_temperature),
        max_new_tokens=40,
        seed=5,
    )
    steps = _steps(spec, TableLM.random(6, seed=11), TableLM.random(6, seed=23), 6)
    assert {step.record.tree_size for step in steps} == {8}
    assert all(step.record.accepted <= 3 for step in steps)


def test_proposal_is_a_bfs_tree_with_the_draft_q() -> None:
    """The sampled tree's q rows are the draft's warped distributions after each node's path,
    exactly what its children were drawn from; leaves' rows are zero."""
    draft = TableLM.random(6, seed=23)
    sampling = SamplingConfig(temperature=0.8)
    spec = SpecConfig(
        tree=DynamicTreeConfig(budget=8, width=3, max_depth=3),
        rule="mcss-wor",
        draft=sampling,
    )
    proposer = Drafter(draft, vocab_size=6)
    request = one_request(spec, [1, 2], torch.Generator().manual_seed(0))
    proposer.start(request)
    (proposal,) = proposer.propose([request], [None])
    tree, tokens, q = proposal.tree, proposal.tokens.tolist(), proposal.q
    assert q is not None and tree.num_nodes == 8
    table = TableLM.random(6, seed=23)
    for row, node in enumerate((-1, *range(tree.num_nodes))):
        path = [] if node == -1 else [tokens[a] for a in tree.ancestors(node)]
        if tree.children(node):
            expected = torch.softmax(torch.log(table.table((1, 2, *path))) / 0.8, -1)
            assert torch.allclose(q[row], expected.float(), atol=1e-6)
            kids = [tokens[c] for c in tree.children(node)]
            assert len(set(kids)) == len(kids)
        else:
            assert not q[row].any()


def test_verifier_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new tree shape most steps: the engine keeps at most VERIFIER_CACHE verifiers alive,
    and evicting them changes no output."""
    spec = SpecConfig(
        tree="dynamic:8:3:3", max_new_tokens=60, seed=2, draft=SamplingConfig(temperature=0.8)
    )
    models = TableLM.random(6, seed=11), TableLM.random(6, seed=23)
    reference = [step.tokens for step in _steps(spec, *models, 6)]
    alive: weakref.WeakSet = weakref.WeakSet()
    built = []
    original = engine._verifier

    def tracked(*args, **kwargs):
        made = original(*args, **kwargs)
        alive.add(made[0])
        built.append(made[0].tree)
        return made

    monkeypatch.setattr(engine, "_verifier", tracked)
    monkeypatch.setattr(engine, "VERIFIER_CACHE", 2)
    proposer = Drafter(models[1], vocab_size=6)
    tokens = []
    for step in speculative_decode(models[0], proposer, [1, 2], spec, vocab_size=6):
        tokens.append(step.tokens)
        assert len(alive) <= 2
    assert tokens == reference
    assert len(set(built)) > 2  # the shapes did vary


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(tree="dynamic:0"), "budget must be an integer >= 1"),
        (dict(tree="dynamic:8:0"), "width must be an integer >= 1"),
        (dict(tree="dynamic:8:2:0"), "max_depth must be an integer >= 1"),
        (dict(tree="dynamic:a"), "must be integers"),
        (dict(tree="dynamic"), r"dynamic:BUDGET\[:WIDTH\[:DEPTH\]\]"),
        (dict(tree="dynamic:1:2:3:4"), r"dynamic:BUDGET\[:WIDTH\[:DEPTH\]\]"),
        (dict(tree="dynamic:64:8:8", max_tree_nodes=32), "more than the limit max_tree_nodes=32"),
        (dict(tree="dynamic:32"), r"needs width \* max_depth >= 32, got 4 \* 6"),
        (dict(tree="dynamic:8", rule="mcss"), "cannot verify dynamic trees"),
        (dict(tree="dynamic:8", rule="sps"), "cannot verify dynamic trees"),
        (dict(tree="dynamic:8", rule="mcss-wor", draft=SamplingConfig(temperature=0.0)), "greedy"),
    ],
)
def test_bad_dynamic_configs(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SpecConfig(**kwargs)


def test_no_speculation_spec() -> None:
    spec = SpecConfig(tree="none")
    assert not spec.speculative and spec.resolved_rule() == "none"
    assert spec.describe_tree() == "none" and spec.tree_nodes == 0
    with pytest.raises(ValueError, match="no speculation"):
        spec.token_tree()
    with pytest.raises(ValueError, match="verifies nothing"):
        SpecConfig(tree="none", rule="mcss")
    target = TableLM.random(4, seed=1)
    with pytest.raises(ValueError, match="run autoregressive_decode"):
        next(speculative_decode(target, None, [1], spec, vocab_size=4))  # type: ignore[arg-type]


def test_dynamic_spec_rules_and_names() -> None:
    assert (
        SpecConfig(tree="dynamic:8", target=SamplingConfig(temperature=0.0)).resolved_rule()
        == "greedy"
    )
    assert (
        SpecConfig(tree="dynamic:8", draft=SamplingConfig(temperature=0.0)).resolved_rule()
        == "topk"
    )
    spec = SpecConfig(tree=DynamicTreeConfig(budget=12))
    assert spec.resolved_rule() == "mcss-wor"
    assert spec.describe_tree() == "dynamic:12:4:6"
    assert spec.tree_nodes == 12
    with pytest.raises(ValueError, match="no fixed shape"):
        spec.token_tree()
