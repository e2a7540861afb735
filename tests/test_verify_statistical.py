"""Statistical tests: seeded Monte Carlo through the real sampling and verification code.

- One node: ``sample_candidates`` (the draft top-k for topk/greedy) + ``verify_node``, counts of
  the emitted token against p (``mcsd.checks.node.monte_carlo``).
- Tree walk: toy target/draft table LMs (``mcsd.models.toy.TableLM``) indexed by context (the
  tokens after the root), a tree drafted level by level from the draft by the engine's
  ``Drafter``, p from one target forward over the tree, ``verify_tree``. The emitted tokens
  (accepted path + correction/bonus) are completed to a fixed length L = depth + 1 with tokens
  sampled from the target table. A lossless step followed by the target itself is the target,
  so the completed sequences must follow prod_t p(x_t | x_<t) exactly: a chi-square over all
  V^L sequences.

Every comparison goes through ``assert_matches`` (chi-square p-value >= ALPHA, TV within a bound
that holds with probability 1 - ALPHA, no impossible outcome), with fixed seeds.

Trial counts (the whole file must stay under a minute on 2 cores; one trial costs 50-200 us of
Python): 20,000 per node case, 5,000 per tree (64-81 sequences, 23-29 degrees of freedom once
bins expecting few draws are pooled). They still catch a wrong rule: for a bias of TV distance d
the chi-square statistic grows like n * sum(delta_i^2 / p_i) >= 4 n d^2, so d = 0.03 at
n = 20,000 gives >= 72 on a handful of degrees of freedom (p-value ~1e-14 against
ALPHA = 1e-4). The two wrong rules at the end have d > 0.04 (asserted from the exact
enumeration) and the same helper rejects them; tree-walk bugs (bonus or q taken from the wrong
row) give d > 0.1 on every tree here. The tree count is sized by that power (TREE_TRIALS).
"""

from __future__ import annotations

import argparse
import itertools

import pytest
import torch
from torch import Tensor

import mcsd.checks.node as check_module
from mcsd.checks.node import (
    CASES,
    Fit,
    acceptance_bound,
    chi_square,
    exact_outcome,
    goodness_of_fit,
    make_case,
    monte_carlo,
    rule_k,
    run_checks,
)
from mcsd.commands import check as check_command
from mcsd.config import GREEDY, SamplingConfig, SpecConfig
from mcsd.draft.proposer import Drafter
from mcsd.models.toy import TableLM
from mcsd.request import one_request
from mcsd.sampling import sample, warp
from mcsd.tree import TokenTree
from mcsd.verify import NodeResult, get_rule, verify_tree

ALPHA = 1e-4  # per assertion; all seeded, so a pass is reproducible, not luck
NODE_TRIALS = 20_000
# Sized by power (was 8,000; a tree walk took 45-111 s on a 2-core Zen 1 EPYC): a tree-walk bug
# of TV distance d >= 0.1 has noncentrality >= 4 n d^2 = 200, missed at ALPHA = 1e-4 on 23-29
# dof with probability <= 1.4e-13 (noncentral chi-square; 6e-28 at 8,000). Measured (1,500
# trials, every case): a node's p and bonus taken from its parent's row adds >= 0.81 to the
# statistic per trial (missed never), its q from the parent's row >= 0.13 per trial (>= 650 at
# 5,000), least on optimal's path tree, 0.042 (212: missed w.p. ~3e-9; 1e-15 at 8,000). The
# seeded samples are the first 5,000 of the 8,000 and pass (p >= 0.065).
TREE_TRIALS = 5_000


def assert_matches(
    counts: Tensor, expected: Tensor, *, alpha: float = ALPHA, context: str = ""
) -> Fit:
    """Assert ``counts`` ``[C]`` are consistent with the probabilities ``expected`` ``[C]``."""
    fit = goodness_of_fit(counts, expected, alpha=alpha)
    assert fit.passed, (
        f"{context}: counts do not match (TV {fit.tv:.4f} vs bound {fit.tv_bound:.4f}, "
        f"chi2 {fit.chi2:.1f} on {fit.dof} dof, p-value {fit.p_value:.3g}, "
        f"{fit.impossible} impossible draws)"
    )
    return fit


# ---------------------------------------------------------------- one node
# Every rule on one case, the default rule (mcss-wor) on the special ones (its dense case is in
# the tree tests below); `mcsd check` runs every rule on every case.
NODE_CASES = [
    ("sps", "dirichlet"),
    ("mcss", "sparse"),
    ("topk", "near-one-hot"),
    ("mcns", "p=q"),
    ("greedy", "disjoint"),
    *(("mcss-wor", case) for case in ("sparse", "p=q", "disjoint", "near-one-hot")),
    ("kseq", "dirichlet"),
    ("kseq", "near-one-hot"),
    ("optimal", "dirichlet"),
    ("optimal", "sparse"),
    ("traversal", "dirichlet"),
]


@pytest.mark.parametrize(("rule", "case"), NODE_CASES)
def test_node_emits_target(rule: str, case: str) -> None:
    generator = torch.Generator().manual_seed(11)
    k = rule_k(rule, 3)
    pq = make_case(case, 6, k, generator)
    counts = monte_carlo(rule, pq.p, pq.q, k, NODE_TRIALS, generator)
    exact = exact_outcome(rule, pq.p, pq.q, k)
    assert_matches(counts.emitted, exact.target, context=f"{rule}/{case}")
    measured = counts.accepted / NODE_TRIALS
    assert abs(measured - exact.acceptance) <= acceptance_bound(NODE_TRIALS, ALPHA)


# ---------------------------------------------------------------- tree walk
ROOT_TOKEN = 0  # the pending token every tree grows below; contexts are the tokens after it


class ToyPair:
    """Target and draft next-token tables indexed by the context after the root, as table LMs
    (their logits are the log-probabilities)."""

    def __init__(self, vocab: int, depth: int, generator: torch.Generator, greedy: bool) -> None:
        self.vocab = vocab
        self.greedy = greedy
        self.p: dict[tuple[int, ...], Tensor] = {}  # context -> [V] float64
        self.q: dict[tuple[int, ...], Tensor] = {}
        for length in range(depth + 1):
            for context in itertools.product(range(vocab), repeat=length):
                p = -torch.log1p(-torch.rand(vocab, generator=generator, dtype=torch.float64))
                if float(torch.rand((), generator=generator)) < 0.3:
                    p[int(torch.randint(vocab, (), generator=generator))] = 0.0  # some zeros
                p = p**2  # peakier than the draft, so rejections are common
                self.p[context] = p / p.sum()
                q = -torch.log1p(-torch.rand(vocab, generator=generator, dtype=torch.float64))
                # half the draft mass follows the target: a draft that is right fairly often
                self.q[context] = 0.5 * q / q.sum() + 0.5 * self.p[context]
        self.target = TableLM(lambda context: self.p[context[1:]], vocab)
        self.draft = TableLM(lambda context: self.q[context[1:]], vocab)

    @property
    def target_sampling(self) -> SamplingConfig:
        return GREEDY if self.greedy else SamplingConfig(temperature=1.0)

    def next_token(self, context: tuple[int, ...], generator: torch.Generator) -> int:
        p = self.p[context]
        return int(p.argmax()) if self.greedy else sample(p, generator)

    def sequence_distribution(self, length: int) -> Tensor:
        """Probability ``[V**length]`` of every token sequence (base-V index, first token most
        significant) under the (warped) target."""
        probs = torch.zeros(self.vocab**length, dtype=torch.float64)
        for index, seq in enumerate(itertools.product(range(self.vocab), repeat=length)):
            prob = 1.0
            for t in range(length):
                p = self.p[seq[:t]]
                prob *= float(p.argmax() == seq[t]) if self.greedy else float(p[seq[t]])
            probs[index] = prob
        return probs


def run_tree(
    tree: TokenTree, toy: ToyPair, rule: str, trials: int, generator: torch.Generator
) -> tuple[Tensor, int]:
    """Counts ``[V**L]`` of the completed emitted sequences (L = depth + 1), and the number of
    accepted tokens over all trials."""
    record = get_rule(rule)
    spec = SpecConfig(
        tree=tree,
        rule=rule,
        target=toy.target_sampling,
        draft=GREEDY if record.deterministic else SamplingConfig(temperature=1.0),
    )
    proposer = Drafter(toy.draft, vocab_size=toy.vocab)
    mask = torch.zeros(tree.num_nodes + 1, tree.num_nodes + 1, dtype=torch.bool)
    mask[:, 0] = True
    mask[1:, 1:] = tree.ancestor_mask()
    positions = torch.tensor([[0, *tree.depth]])
    length = tree.max_depth + 1
    counts = [0] * toy.vocab**length
    accepted_tokens = 0
    for _ in range(trials):
        request = one_request(spec, [ROOT_TOKEN], generator)
        proposer.start(request)
        (proposal,) = proposer.propose([request], [None])
        tokens = torch.cat([torch.tensor([ROOT_TOKEN]), proposal.tokens])[None]  # [1, N+1]
        toy.target.reset()
        p = warp(toy.target.forward(tokens, positions, mask)[0], toy.target_sampling)
        q = proposal.q if record.reads_q else None  # [N+1, V], rows of leaves zero
        result = verify_tree(tree, proposal.tokens, p, q, rule, generator)
        node_tokens = proposal.tokens.tolist()
        emitted = [node_tokens[a] for a in result.accepted] + [result.token]
        accepted_tokens += len(result.accepted)
        while len(emitted) < length:  # the target itself continues
            emitted.append(toy.next_token(tuple(emitted), generator))
        index = 0
        for token in emitted:
            index = index * toy.vocab + token
        counts[index] += 1
    return torch.tensor(counts), accepted_tokens


PATH_TREE = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0]]
TREE_CASES = [
    ("mcss-wor", "2,2", 4),
    ("mcss", "2,2", 4),
    ("mcns", "2,2", 4),
    ("topk", "3,1", 4),
    ("mcss-wor", PATH_TREE, 3),
    ("sps", "1,1,1", 3),
    ("kseq", "2,2", 4),
    ("optimal", "2,2", 4),
    ("optimal", PATH_TREE, 3),
    ("traversal", "1,1,1", 3),  # a chain: block verification
    ("traversal", "2,2", 4),
    ("traversal", PATH_TREE, 3),
]


@pytest.mark.parametrize(
    ("rule", "shape", "vocab"),
    TREE_CASES,
    ids=[f"{rule}-{TokenTree.parse(shape).describe()}" for rule, shape, _ in TREE_CASES],
)
def test_tree_walk_emits_target_sequences(rule: str, shape: object, vocab: int) -> None:
    tree = TokenTree.parse(shape)
    generator = torch.Generator().manual_seed(12)
    toy = ToyPair(vocab, tree.max_depth, generator, greedy=False)
    counts, accepted = run_tree(tree, toy, rule, TREE_TRIALS, generator)
    expected = toy.sequence_distribution(tree.max_depth + 1)
    assert_matches(counts, expected, context=f"{rule} on {tree.describe()}")
    assert accepted > TREE_TRIALS // 4  # the walk really descends (not only corrections)


def test_greedy_tree_walk_emits_the_greedy_sequence() -> None:
    tree = TokenTree.from_config((2, 2))
    generator = torch.Generator().manual_seed(13)
    toy = ToyPair(4, tree.max_depth, generator, greedy=True)
    expected = toy.sequence_distribution(3)
    counts, accepted = run_tree(tree, toy, "greedy", 2000, generator)
    assert torch.equal(counts, (expected * 2000).long())  # every trial: the one greedy sequence
    assert accepted > 0


# ---------------------------------------------------------------- the helper itself
def test_chi_square_matches_scipy() -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    counts = torch.tensor([480, 220, 140, 110, 50])
    probs = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.float64)
    statistic, dof, p_value = chi_square(counts, probs)
    reference = scipy_stats.chisquare(counts.numpy(), (probs * 1000).numpy())
    assert dof == 4
    assert statistic == pytest.approx(float(reference.statistic), rel=1e-12)
    assert p_value == pytest.approx(float(reference.pvalue), rel=1e-6)


def test_helper_false_failure_rate_is_at_most_alpha() -> None:
    """Counts that really come from ``expected`` fail in about an alpha fraction of seeds (the
    chi-square is calibrated, pooling included; the TV bound is conservative)."""
    generator = torch.Generator().manual_seed(16)
    probs = torch.tensor([0.6, 0.3, 0.0995, 0.0004, 0.0001], dtype=torch.float64)  # tiny bins
    failures = 0
    for _ in range(400):
        draws = torch.multinomial(probs, 2000, replacement=True, generator=generator)
        failures += not goodness_of_fit(draws.bincount(minlength=5), probs, alpha=0.01).passed
    assert failures <= 12  # 4 expected at alpha = 0.01


def test_helper_rejects_impossible_outcomes() -> None:
    probs = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    fit = goodness_of_fit(torch.tensor([5000, 5000, 1]), probs)
    assert fit.impossible == 1 and not fit.passed
    assert goodness_of_fit(torch.tensor([5000, 5000, 0]), probs).passed


# ---------------------------------------------------------------- the helper can fail
def softmax_top_k(q: Tensor, k: int) -> Tensor:
    """The distribution the paper's code verifies a top-k draft against: q renormalised on its
    top k tokens (= softmax over the top-k logits)."""
    top = torch.topk(q, k).indices
    restricted = torch.zeros_like(q)
    restricted[top] = q[top]
    return restricted / restricted.sum()


def test_helper_rejects_softmax_over_top_k() -> None:
    """DESIGN 3's known bias: deterministic top-k candidates verified by MCSS-wor as if they had
    been sampled from softmax(top-k)."""
    generator = torch.Generator().manual_seed(14)
    pq = make_case("dirichlet", 6, 3, generator)
    q_wrong = softmax_top_k(pq.q, 3)
    wrong = exact_outcome("mcss-wor", pq.p, q_wrong, 3, scheme="top", draft=pq.q)
    bias = 0.5 * float((wrong.emitted - pq.p).abs().sum())
    assert bias > 0.04  # the exact size of the bias this test has to catch
    counts = monte_carlo(
        "mcss-wor", pq.p, q_wrong, 3, NODE_TRIALS, generator, scheme="top", draft=pq.q
    )
    with pytest.raises(AssertionError, match="counts do not match"):
        assert_matches(counts.emitted, pq.p)
    assert_matches(counts.emitted, wrong.emitted)  # ...and the counts do follow the biased law


def test_helper_rejects_wor_math_on_iid_candidates() -> None:
    """Candidates drawn with replacement but verified with the without-replacement rule."""
    generator = torch.Generator().manual_seed(15)
    pq = make_case("dirichlet", 4, 3, generator)
    wrong = exact_outcome("mcss-wor", pq.p, pq.q, 3, scheme="iid")
    bias = 0.5 * float((wrong.emitted - pq.p).abs().sum())
    assert bias > 0.04
    counts = monte_carlo("mcss-wor", pq.p, pq.q, 3, NODE_TRIALS, generator, scheme="iid")
    with pytest.raises(AssertionError, match="counts do not match"):
        assert_matches(counts.emitted, pq.p)
    assert_matches(counts.emitted, wrong.emitted)


# ---------------------------------------------------------------- mcsd check
def check_args(**overrides: object) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    check_command.add_parser(parser.add_subparsers())
    args = parser.parse_args(["check", "--trials", "300", "--vocab", "5", "--jobs", "1"])
    for name, value in overrides.items():
        setattr(args, name, value)
    return args


def test_check_command_passes_and_prints_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert check_command.run(check_args(rule="mcss-wor")) == 0
    out = capsys.readouterr().out
    for case in CASES:
        assert case in out
    assert "passed 5 checks" in out


def test_check_command_fails_on_a_wrong_rule(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A broken verify_node (never accepts, always emits argmax p) makes the command fail."""

    def wrong(rule: str, p: Tensor, q: Tensor | None, candidates: Tensor, generator=None):
        return NodeResult(accepted=-1, token=int(p.argmax()))

    monkeypatch.setattr(check_module, "verify_node", wrong)
    assert check_command.run(check_args(rule="mcss", cases="dirichlet")) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "mcss/dirichlet" in out


def test_check_command_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="--vocab must be larger than --k"):
        check_command.run(check_args(vocab=3, k=3))
    with pytest.raises(ValueError, match="unknown case 'nope'"):
        check_command.run(check_args(cases="dirichlet,nope"))


def test_check_results_do_not_depend_on_the_number_of_processes() -> None:
    kwargs = {"k": 2, "vocab": 4, "trials": 200, "seed": 3, "cases": ("sparse", "p=q")}
    serial = run_checks(["mcss-wor", "topk"], jobs=1, **kwargs)
    parallel = run_checks(["mcss-wor", "topk"], jobs=2, **kwargs)
    assert serial == parallel
