"""Whole-engine losslessness: toy table LMs through the real decoding loop.

Every rule on every tree shape it applies to: the distribution of generated 3-token sequences
must equal the exact target distribution (chi-square + total variation, mcsd.checks' helper).
3,000 seeded generations per case keep the file near two minutes on 2 cores; the same helper
with the same count rejects a deliberately broken engine (test_wrong_engine_is_caught), and
``mcsd check --engine --trials 100000`` runs the full-size check (results in docs/).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

import mcsd.plan as plan_module
from mcsd.checks.engine import DYNAMIC_TREES, EngineCase, engine_cases, run_engine_case

TRIALS = 3000


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("case", engine_cases(), ids=lambda c: c.describe().replace(" ", "-"))
def test_engine_output_is_target_distribution(case: EngineCase) -> None:
    result = run_engine_case(case, TRIALS, seed=1)
    assert result.fit.passed, (case.describe(), result.fit)
    if case.same_models:
        assert result.full_acceptance
        if case.tree not in DYNAMIC_TREES:  # a dynamic tree's accepted node may have no children
            assert result.mean_accepted_length == pytest.approx(case.length)


def test_wrong_engine_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """Draw candidates without replacement but verify them with the iid rule (mcss): a classic
    mismatch between drafting and verification. The same test must reject it."""
    original = plan_module.candidate_scheme

    def without_replacement(rule, draft):
        return replace(original(rule, draft), replacement=False)

    monkeypatch.setattr(plan_module, "candidate_scheme", without_replacement)
    result = run_engine_case(EngineCase("mcss", "4,2,2"), TRIALS, seed=1)
    assert not result.fit.passed, result.fit


def test_greedy_draft_with_sampled_verification_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The paper code's bias: a deterministic (top-k) draft verified as if sampled from q."""
    original = plan_module.candidate_scheme

    def deterministic(rule, draft):
        return replace(original(rule, draft), deterministic=True)

    monkeypatch.setattr(plan_module, "candidate_scheme", deterministic)
    result = run_engine_case(EngineCase("mcss", "2,2"), TRIALS, seed=1)
    assert not result.fit.passed, result.fit


def test_wrong_batched_verifier_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The device verifier with mcss-wor's q update left out (the iid rule applied to draws
    without replacement) must fail the same test."""
    from mcsd.verify import device

    original = device.SampledTreeVerifier.__init__

    def with_replacement(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.without_replacement = False

    monkeypatch.setattr(device.SampledTreeVerifier, "__init__", with_replacement)
    case = EngineCase("mcss-wor", "4,2,2", device_verify=True)
    result = run_engine_case(case, TRIALS, seed=1)
    assert not result.fit.passed, result.fit


def test_check_command_engine_mode(capsys: pytest.CaptureFixture[str]) -> None:
    from mcsd import cli

    assert cli.main(["check", "--engine", "--rule", "sps", "--engine-trials", "300"]) == 0
    out = capsys.readouterr().out
    assert "sps tree=1,1,1" in out and "sps tree=1,1,1 device-verify" in out
    assert "sps tree=1,1,1 runtime=fast" in out and "sps tree=1,1,1 proposer=mixed" in out
    assert "passed 4 engine checks" in out  # host walk, device verifier, fast runtime, mixed


def test_wrong_one_hot_device_verifier_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """topk's device verifier leaving a rejected candidate in p (accept the next one with its
    unconditional p(c), correct from p itself) must fail the same test."""
    from mcsd.verify import device

    monkeypatch.setattr(device, "one_hot_reject", lambda p, c: p)
    case = EngineCase("topk", "4,2,2", device_verify=True)
    result = run_engine_case(case, TRIALS, seed=1)
    assert not result.fit.passed, result.fit
