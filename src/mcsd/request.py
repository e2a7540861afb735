"""``Request``: one request's state inside the engine, from ``add_request`` to its end.

It owns everything that belongs to one generation: the prompt and the committed tokens, the
spec and its ``Plan`` (resolved once), its seeded generator, its stop rules and usable token
budget, the row it runs in, the proposer's cursor (``mcsd.draft``'s per-request state) and its
stats. The engine (``mcsd.engine``) schedules requests; consumers (the API, the server, the
benchmarks, the checks) read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mcsd.config import SpecConfig
from mcsd.plan import Plan, resolve
from mcsd.stats import Stats


@dataclass(eq=False)
class Request:
    """One generation (compared by identity: a consumer may key its own state by it)."""

    prompt_ids: list[int]
    spec: SpecConfig
    plan: Plan
    stop_token_ids: frozenset[int]
    max_new_tokens: int  # the usable budget (the context may cut the one asked for)
    generator: torch.Generator  # every draw of this request, in the order a batch of one draws
    committed: list[int] = field(default_factory=list)  # prompt + generated; last one pending
    row: int | None = None  # the engine row it runs in; None while waiting or after its end
    produced: int = 0
    finish_reason: str | None = None  # "stop", "length", or "abort"
    prefill_time: float = 0.0  # reported on its first step's record
    cursor: Any = None  # the proposer's state for this request (``Proposer.start``)
    stats: Stats = field(default_factory=Stats)

    @property
    def status(self) -> str:
        """``waiting`` (queued), ``running`` (in a row) or ``finished``."""
        if self.finish_reason is not None:
            return "finished"
        return "waiting" if self.row is None else "running"

    @property
    def output_ids(self) -> list[int]:
        """The generated tokens so far."""
        return self.committed[len(self.prompt_ids) :]


def one_request(
    spec: SpecConfig, prompt_ids: list[int], generator: torch.Generator, *, row: int = 0
) -> Request:
    """A request in ``row`` outside any engine, for driving a proposer by hand (the statistical
    checks of one step): its plan resolved, no stop tokens, the whole budget usable."""
    return Request(
        prompt_ids=list(prompt_ids),
        spec=spec,
        plan=resolve(spec),
        stop_token_ids=frozenset(),
        max_new_tokens=spec.max_new_tokens,
        generator=generator,
        committed=list(prompt_ids),
        row=row,
    )
