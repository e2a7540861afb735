"""The mixed-children rule (mcsd.verify.node.Mixed): deterministic (context) candidates first
with the one-hot rule, then candidates drawn from q with the node's sampled rule on the
residual. Exact on tiny vocabularies (enumeration of every draw, 1e-9), through the whole engine
(the mixed cases of mcsd.checks.engine.engine_cases run in test_engine_lossless.py; here the
wrong variants), and deliberately wrong mixes rejected by the same checks."""

from __future__ import annotations

import itertools

import pytest
import torch

from mcsd.checks.engine import REPEATING_PROMPT, EngineCase, run_engine_case
from mcsd.checks.node import exact_mixed_outcome
from mcsd.tree import TokenTree
from mcsd.verify import node as node_module
from mcsd.verify.residual import remove_token
from mcsd.verify.rules import get_rule, mixed_counts, tree_verifier

TOLERANCE = 1e-9
MIXING_RULES = ("sps", "mcss", "mcss-wor", "kseq", "optimal")
TRIALS = 3000


def pairs(vocab: int, seed: int):  # -> [(p, q)] float64 [V] each, zeros and p = q included
    generator = torch.Generator().manual_seed(seed)
    out = []
    for kind in ("dirichlet", "zeros", "p=q", "one-hot-q"):
        p = torch.distributions.Dirichlet(torch.ones(vocab)).sample()
        q = torch.rand(vocab, generator=generator, dtype=torch.float64) ** 3
        p = torch.rand(vocab, generator=generator, dtype=torch.float64) ** 2
        if kind == "zeros":
            p[0], q[-1] = 0.0, 0.0
        if kind == "one-hot-q":
            q = torch.zeros(vocab, dtype=torch.float64)
            q[1] = 1.0
        p, q = p / p.sum(), q / q.sum()
        out.append((p, p.clone() if kind == "p=q" else q))
    return out


def fixed_sets(vocab: int) -> list[tuple[int, ...]]:
    return [(0,), (vocab - 1, 1), (1, 1), tuple(range(vocab))]


@pytest.mark.parametrize("rule", MIXING_RULES)
@pytest.mark.parametrize("vocab", [3, 4])
def test_mixed_node_is_exact(rule: str, vocab: int) -> None:
    ks = (1,) if rule == "sps" else (0, 1, 2, 3)
    wor = get_rule(rule).candidates == "wor"
    for (p, q), fixed, k in itertools.product(pairs(vocab, vocab), fixed_sets(vocab), ks):
        if wor and k > int((q > 0).sum()):
            continue  # no tuple of k distinct draws (the engine pads such nodes)
        exact = exact_mixed_outcome(rule, p, q, fixed, k)
        assert exact.error < TOLERANCE, (rule, p, q, fixed, k, exact.error)


@pytest.mark.parametrize("rule", ["mcss", "mcss-wor"])
def test_drawn_from_q_without_the_context_tokens_is_exact(rule: str) -> None:
    """The draft may exclude the context tokens from its own draws (q renormalised without
    them): lossless when the verifier reads that same q."""
    for p, q in pairs(5, 7):
        fixed = (0, 3)
        excluded = remove_token(q, torch.tensor(fixed))
        if int((excluded > 0).sum()) < 2:
            continue  # too few tokens left for two distinct draws
        assert exact_mixed_outcome(rule, p, excluded, fixed, 2).error < TOLERANCE


def worst_error(rule: str, **options) -> float:
    return max(
        exact_mixed_outcome(rule, p, q, fixed, 2, **options).error
        for p, q in pairs(4, 4)
        for fixed in fixed_sets(4)[:2]
    )


def test_wrong_mixes_fail_the_exact_check(monkeypatch: pytest.MonkeyPatch) -> None:
    # The context candidates accepted with min(1, p / q), as if drawn from q.
    assert worst_error("mcss-wor", node_rule=get_rule("mcss-wor").node) > 1e-2
    # Drawn from q without the context tokens, verified with the full q.
    wrong = 0.0
    for p, q in pairs(4, 4):
        excluded = remove_token(q, torch.tensor([0]))
        if float(excluded.sum()) > 0.0:
            wrong = max(wrong, exact_mixed_outcome("mcss", p, q, (0,), 2, draft=excluded).error)
    assert wrong > 1e-2
    # The drawn candidates verified against p, not the residual after the one-hot rejections.
    monkeypatch.setattr(node_module, "_remove_from_p", lambda state, c: None)
    assert worst_error("mcss-wor") > 1e-2


def test_mixed_counts_and_bad_orders() -> None:
    tree = TokenTree((-1, -1, -1, 0, 1))
    rule = get_rule("mcss-wor")
    assert mixed_counts(tree, rule, (True, False, False, True, False)) == (1, 1, 0, 0, 0, 0)
    assert mixed_counts(tree, rule, (False,) * 5) is None
    assert mixed_counts(tree, get_rule("topk"), (True,) * 5) is None  # all one-hot already
    with pytest.raises(ValueError, match="must come before drawn siblings"):
        mixed_counts(tree, rule, (False, True, False, False, False))
    with pytest.raises(ValueError, match="cannot verify trees that mix"):
        mixed_counts(tree, get_rule("traversal"), (True, False, False, False, False))
    with pytest.raises(ValueError, match="one flag per tree node"):
        tree_verifier(tree, rule, rule_target(), torch.device("cpu"), deterministic=(True,))


def rule_target():
    from mcsd.config import SamplingConfig

    return SamplingConfig(temperature=1.0)


MIXED = EngineCase("mcss-wor", "2,2", prompt=REPEATING_PROMPT, proposer="mixed")


@pytest.mark.usefixtures("one_torch_thread")
def test_context_candidates_are_accepted_in_mixed_engine_runs() -> None:
    from mcsd.checks.engine import generation

    target, draft = MIXED.models()
    from_context = sum(
        step.record.accepted_context
        for seed in range(20)
        for step in generation(MIXED, target, draft, seed)
    )
    assert from_context > 0


@pytest.mark.usefixtures("one_torch_thread")
def test_wrong_mixed_engine_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The device verifier ignores the flags: context candidates judged as if drawn from q
    (the host walk doing the same is caught as well; the host walk without the residual update
    is the next test)."""
    import mcsd.verify.rules as rules

    monkeypatch.setattr(rules, "mixed_counts", lambda tree, rule, deterministic: None)
    case = EngineCase(
        "mcss-wor", "2,2", prompt=REPEATING_PROMPT, proposer="mixed", device_verify=True
    )
    result = run_engine_case(case, TRIALS, seed=1)
    assert not result.fit.passed, result.fit


@pytest.mark.usefixtures("one_torch_thread")
def test_mixed_engine_without_the_residual_update_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(node_module, "_remove_from_p", lambda state, c: None)
    result = run_engine_case(MIXED, TRIALS, seed=1)
    assert not result.fit.passed, result.fit


def test_merge_continues_the_draft_below_a_context_twin() -> None:
    """Context tree: 7 -> 8; draft tree 2,1 with tokens 7 (child 5) and 3 (child 6). The
    context's 7 is the draft's 7's twin: it takes the drawn child 5 after its own 8, and the
    drawn 7 stays a childless candidate."""
    from mcsd.draft.mixed import merge

    context = TokenTree((-1, 0))
    draft = TokenTree((-1, -1, 0, 1))
    merged = merge(context, (7, 8), draft, (7, 3, 5, 6), torch.device("cpu"))
    # union nodes: 0 ctx 7, 1 draft 7 (leaf), 2 draft 3, 3 ctx 8, 4 draft 5 (below ctx 7), 5 draft 6
    assert merged.tree.parents == (-1, -1, -1, 0, 0, 2)
    tokens = torch.tensor([7, 8, 7, 3, 5, 6])[merged.order].tolist()
    assert tokens == [7, 7, 3, 8, 5, 6]
    assert merged.deterministic == (True, False, False, True, False, False)
    assert merged.draft_node == (0, 0, 1, -1, 2, 3)
    # q rows: root = draft root; ctx 7 holds draft node 0's children; drawn 7 is a leaf (zero)
    zero = draft.num_nodes + 1
    assert merged.q_rows.tolist() == [0, 1, zero, 2, zero, 3, 4]
    assert mixed_counts(merged.tree, get_rule("mcss-wor"), merged.deterministic) == (
        1,
        1,
        0,
        0,
        0,
        0,
        0,
    )
