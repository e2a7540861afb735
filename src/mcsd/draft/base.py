"""The proposer protocol: what builds each step's token tree of candidates, for any set of rows.

A proposer owns whatever state it needs (a draft model's KV cache with one row per engine row,
the suffix index of each request's context, ...): the per-request part lives on the request
(``Request.cursor``, set by ``start``). The engine (``mcsd.engine``) drives it with:

- ``check(plan)``: refuse, before a request is queued, a plan it cannot propose for (a draft
  model's tree without a draft model);
- ``max_context(plan)``: the positions the proposer can handle for such a request, or None;
- ``start(request)``: a new request in ``request.row``; the last prompt token is the first
  *pending* token (the target has not run it yet);
- ``propose(requests, trees)``: one ``Proposal`` per request, each grown as its own plan says
  (a static tree, a dynamic one, the context's, a mixed one; ``trees[i]`` overrides a static
  tree for this step: the adaptive budget's choice). Every request draws from its own
  generator in the order it would alone, so its candidates do not depend on its neighbours;
  requests that can share a draft forward share it;
- ``commit(requests, steps)``: each request's step accepted the nodes ``accepted`` (root side
  first) and committed ``tokens`` (the accepted nodes' tokens, then the correction or bonus
  token, which is the next pending token);
- ``extend(request, tokens)``: tokens committed without a proposal (a plain step);
- ``remove(request)``: the request left its row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from torch import Tensor

from mcsd.tree import TokenTree

if TYPE_CHECKING:
    from mcsd.plan import Plan
    from mcsd.request import Request


@dataclass(frozen=True)
class Proposal:
    """One step's candidates for one request."""

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


@dataclass(frozen=True)
class RowStep:
    """What one request's step kept."""

    accepted: Sequence[int]  # the accepted nodes, root side first
    tokens: Sequence[int]  # the committed tokens: accepted nodes' tokens, then correction/bonus


@runtime_checkable
class Proposer(Protocol):
    """See the module docstring."""

    @property
    def batch_size(self) -> int:
        """The engine rows it can follow (its draft model's rows)."""
        ...

    def check(self, plan: Plan) -> None:
        """``ValueError`` naming the parameter when it cannot propose for ``plan``."""
        ...

    def max_context(self, plan: Plan) -> int | None: ...

    def start(self, request: Request) -> None: ...

    def propose(
        self, requests: Sequence[Request], trees: Sequence[TokenTree | None]
    ) -> list[Proposal]: ...

    def commit(self, requests: Sequence[Request], steps: Sequence[RowStep]) -> None: ...

    def extend(self, request: Request, tokens: Sequence[int]) -> None: ...

    def remove(self, request: Request) -> None: ...
