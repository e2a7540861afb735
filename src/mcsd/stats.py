"""Acceptance metrics (DESIGN 6; names follow vLLM so users recognise them).

- steps: target forward passes while decoding; new_tokens: tokens committed.
- mean accepted length AL = new_tokens / steps (counts the correction / bonus token; the paper's
  block efficiency).
- acceptance rate at depth d = P(a node at depth d is accepted | its parent was accepted).
- accepted-sibling-rank histogram: how often the accepted child was the 1st, 2nd, ... candidate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class StepRecord:
    """What one speculative step did."""

    accepted: int  # draft tokens accepted (the path length m)
    emitted: int  # tokens committed this step (m + 1, fewer when a stop cut it short)
    attempted: int  # depths at which verification ran: m, or m + 1 when a depth rejected
    ranks: tuple[int, ...]  # sibling rank of the accepted node at each depth
    tree_size: int  # draft nodes verified this step (0: a plain step, the target alone)
    draft_time: float  # seconds spent drafting
    target_time: float  # seconds in the target forward and verification
    prefill_time: float = 0.0  # seconds reading the prompt (models' prefill), on the first step
    accepted_context: int = 0  # accepted nodes copied from the context (mcsd.draft.context)


@dataclass(kw_only=True)
class Stats:
    """Accumulates ``StepRecord``s; every metric is derived, nothing is stored twice."""

    records: list[StepRecord] = field(default_factory=list)

    def add(self, record: StepRecord) -> None:
        self.records.append(record)

    @property
    def steps(self) -> int:
        return len(self.records)

    @property
    def new_tokens(self) -> int:
        return sum(r.emitted for r in self.records)

    @property
    def mean_accepted_length(self) -> float:
        return self.new_tokens / self.steps if self.steps else 0.0

    @property
    def accept_lengths(self) -> list[int]:
        """Tokens committed per step (Spec-Bench's ``accept_lengths``)."""
        return [r.emitted for r in self.records]

    def acceptance_per_depth(self) -> list[float]:
        """Acceptance rate at depth 1, 2, ... (conditional on the parent being accepted)."""
        depth = max((r.attempted for r in self.records), default=0)
        rates = []
        for d in range(1, depth + 1):
            tried = sum(1 for r in self.records if r.attempted >= d)
            accepted = sum(1 for r in self.records if r.accepted >= d)
            rates.append(accepted / tried if tried else 0.0)
        return rates

    def rank_histogram(self) -> list[int]:
        """``histogram[i]`` = accepted nodes that were their parent's (i+1)-th candidate."""
        width = max((max(r.ranks) + 1 for r in self.records if r.ranks), default=0)
        histogram = [0] * width
        for r in self.records:
            for rank in r.ranks:
                histogram[rank] += 1
        return histogram

    @property
    def mean_tree_size(self) -> float:
        """Draft nodes verified per step (context trees vary from step to step)."""
        return sum(r.tree_size for r in self.records) / self.steps if self.steps else 0.0

    @property
    def plain_steps(self) -> int:
        """Steps of the target alone (``tree_size`` 0: ``tree="none"``, or an adaptive budget
        that switched speculation off)."""
        return sum(1 for r in self.records if r.tree_size == 0)

    @property
    def context_share(self) -> float | None:
        """Share of the accepted draft tokens that were copied from the context; None when
        nothing was accepted."""
        accepted = sum(r.accepted for r in self.records)
        return sum(r.accepted_context for r in self.records) / accepted if accepted else None

    @property
    def prefill_time(self) -> float:
        return sum(r.prefill_time for r in self.records)

    @property
    def draft_time(self) -> float:
        return sum(r.draft_time for r in self.records)

    @property
    def target_time(self) -> float:
        return sum(r.target_time for r in self.records)

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "new_tokens": self.new_tokens,
            "mean_accepted_length": self.mean_accepted_length,
            "acceptance_per_depth": self.acceptance_per_depth(),
            "rank_histogram": self.rank_histogram(),
            "accept_lengths": self.accept_lengths,
            "tree_size": self.records[0].tree_size if self.records else 0,
            "mean_tree_size": self.mean_tree_size,
            "plain_steps": self.plain_steps,
            "context_share": self.context_share,
            "draft_time": self.draft_time,
            "target_time": self.target_time,
            "prefill_time": self.prefill_time,
        }

    def summary(self) -> str:
        per_depth = ", ".join(f"{rate:.2f}" for rate in self.acceptance_per_depth())
        plain = self.plain_steps
        some = f" ({plain} plain)" if plain else ""
        return (
            f"{self.new_tokens} tokens in {self.steps} steps{some}, mean accepted length "
            f"{self.mean_accepted_length:.2f}, acceptance per depth [{per_depth}], "
            f"prefill {self.prefill_time:.2f}s, draft {self.draft_time:.2f}s / target "
            f"{self.target_time:.2f}s"
        )
