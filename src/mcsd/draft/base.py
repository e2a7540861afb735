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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from mcsd.tree import TokenTree


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
