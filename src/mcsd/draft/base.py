"""The proposer protocol: what builds each step's token tree of candidates.

A proposer owns whatever state it needs to propose (a draft model's KV cache, a suffix index of
the context, ...). The engine drives it with three calls:

- ``start(prompt_ids)``: a new sequence; the last prompt token is the first *pending* token (the
  target has not run it yet);
- ``propose(committed, generator)``: the tree for the next step below the pending token
  (``committed[-1]``), its node tokens and the draft distribution q each node's children were
  drawn from (``Proposal``). All randomness comes from ``generator``, owned by the engine, so a
  seeded generation is reproducible;
- ``commit(accepted, tokens)``: the step accepted the nodes ``accepted`` (root side first) and
  committed ``tokens`` (the accepted nodes' tokens, then the correction or bonus token, which is
  the next pending token).

A proposer over several rows (``BatchProposer``: the batch engine's, ``mcsd.engine.BatchEngine``)
has the same three calls per row: ``start_row(row, prompt_ids)``, ``propose_rows(rows, committed,
generators)`` (one ``Proposal`` per row, each row's randomness from its own generator, so a row's
candidates do not depend on which rows share the step) and ``commit_rows({row: (accepted,
tokens)})``, plus ``extend_row(row, tokens)`` (tokens committed by a plain step, which the
proposer has not seen) and ``remove_row(row)``. ``OneRow`` runs a one-row ``Proposer`` as a
batch of one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from torch import Tensor

from mcsd.tree import TokenTree

if TYPE_CHECKING:
    from mcsd.config import SpecConfig


@dataclass(frozen=True)
class Proposal:
    """One step's candidates."""

    tree: TokenTree
    tokens: Tensor  # [N] long on the target's device, the candidate token of every node
    # [N+1, V] float32: row 0 the distribution the root's children were drawn from, row u + 1
    # node u's (rows of leaves are zero); None when the candidates are deterministic and the
    # rule does not read q.
    q: Tensor | None
    # Per node: True for a deterministic candidate (copied from the context, verified with the
    # one-hot rule whatever the step's rule), False for one drawn from q. Deterministic siblings
    # come before drawn ones. None: every node is drawn as the step's rule expects.
    deterministic: tuple[bool, ...] | None = None


@runtime_checkable
class Proposer(Protocol):
    @property
    def max_context(self) -> int | None:
        """Positions the proposer can handle (a draft model's context), or None."""
        ...

    @property
    def max_depth(self) -> int:
        """The deepest tree it will propose (the engine keeps room for it in the context)."""
        ...

    def start(self, prompt_ids: Sequence[int]) -> None: ...

    def propose(self, committed: Sequence[int], generator: torch.Generator) -> Proposal: ...

    def commit(self, accepted: Sequence[int], tokens: Sequence[int]) -> None: ...


RowStep = tuple[Sequence[int], Sequence[int]]  # one row's (accepted nodes, committed tokens)


@runtime_checkable
class BatchProposer(Protocol):
    """``Proposer`` over ``batch_size`` rows (see the module docstring)."""

    @property
    def max_context(self) -> int | None: ...

    @property
    def max_depth(self) -> int: ...

    @property
    def batch_size(self) -> int: ...

    def check_spec(self, spec: SpecConfig) -> None:
        """Raise ``ValueError`` when a row with ``spec`` needs candidates drawn otherwise."""
        ...

    def start_row(self, row: int, prompt_ids: Sequence[int]) -> None: ...

    def propose_rows(
        self,
        rows: Sequence[int],
        committed: Sequence[Sequence[int]],
        generators: Sequence[torch.Generator],
        tree: TokenTree | None = None,  # this step's tree (None: the proposer's own)
    ) -> list[Proposal]: ...

    def commit_rows(self, steps: Mapping[int, RowStep]) -> None: ...

    def extend_row(self, row: int, tokens: Sequence[int]) -> None:
        """``row`` committed ``tokens`` without a proposal (a plain decoding step)."""
        ...

    def remove_row(self, row: int) -> None: ...


class OneRow:
    """A one-row ``Proposer`` as a ``BatchProposer`` of ``batch_size`` 1."""

    batch_size = 1

    def __init__(self, proposer: Proposer) -> None:
        self.proposer = proposer

    @property
    def max_context(self) -> int | None:
        return self.proposer.max_context

    @property
    def max_depth(self) -> int:
        return self.proposer.max_depth

    def check_spec(self, spec: SpecConfig) -> None:
        """A one-row proposer was built for its one generation: nothing to compare."""

    def start_row(self, row: int, prompt_ids: Sequence[int]) -> None:
        self.proposer.start(prompt_ids)

    def propose_rows(
        self,
        rows: Sequence[int],
        committed: Sequence[Sequence[int]],
        generators: Sequence[torch.Generator],
        tree: TokenTree | None = None,
    ) -> list[Proposal]:
        """The one-row proposer grows its own trees: ``tree`` is not read."""
        return [self.proposer.propose(committed[0], generators[0])]

    def commit_rows(self, steps: Mapping[int, RowStep]) -> None:
        self.proposer.commit(*steps[0])

    def extend_row(self, row: int, tokens: Sequence[int]) -> None:
        raise ValueError(
            "plain decoding steps of a speculating row (an adaptive tree budget) need a "
            "proposer over rows (a BatchProposer such as ModelProposer)"
        )

    def remove_row(self, row: int) -> None:
        """Nothing to free: the next ``start_row`` starts over."""


def as_batch_proposer(proposer: Proposer | BatchProposer) -> BatchProposer:
    """``proposer`` itself when it handles rows, else wrapped as a batch of one."""
    if isinstance(proposer, BatchProposer):
        return proposer
    return OneRow(proposer)
