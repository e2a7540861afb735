"""Seeded outputs of every rule on the toy engine cases, pinned.

Refactoring the engine, the proposer, the rules or the samplers must not change what a seeded
generation emits: each case of ``engine_cases()`` runs 8 seeds of 6 tokens and the steps (the
tokens committed by each target forward) must equal the ones recorded in
``tests/data/seeded_engine_outputs.json`` (written by main at b6bc713, before the house issue's
refactor). A change that alters the random stream or the math shows up here as a diff.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from mcsd.checks.engine import EngineCase, engine_cases, run_engine_steps

PINNED = Path(__file__).parent / "data" / "seeded_engine_outputs.json"
SEEDS = range(8)
LENGTH = 6

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def outputs(case: EngineCase) -> list[list[list[int]]]:
    """Per seed, the tokens of every step."""
    long = replace(case, length=LENGTH)
    return [[list(step) for step in run_engine_steps(long, seed)] for seed in SEEDS]


PINNED_CASES = json.loads(PINNED.read_text())
CASES = [case for case in engine_cases() if case.describe() in PINNED_CASES]


def test_every_pinned_case_still_exists() -> None:
    assert sorted(c.describe() for c in CASES) == sorted(PINNED_CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.describe().replace(" ", "-"))
def test_seeded_outputs_unchanged(case: EngineCase) -> None:
    assert outputs(case) == PINNED_CASES[case.describe()]


if __name__ == "__main__":  # regenerate (only when a change of the random stream is intended)
    PINNED.write_text(
        json.dumps({c.describe(): outputs(c) for c in engine_cases()}, indent=None) + "\n"
    )
