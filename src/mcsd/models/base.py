"""The runtime protocol: what the engine, the proposers and the benchmarks need from a model.

A runtime holds the KV cache of ``batch_size`` rows. Each row has a *committed* prefix (its own
length, ``cache_lengths()[b]``; rows are ragged) and, after it, a *pending block*: the entries
appended by the forwards since the last ``commit``. A speculative step appends a token tree to
the pending block (one forward for the target, one per tree level for a draft), then commits
the accepted path; everything else in the block is dropped.

The step:

- ``forward(tokens [B, n], positions [B, n], tree_mask)``: run ``n`` new tokens per row and
  append them to the pending block. Every new token attends to its row's whole committed prefix
  and to the pending entries ``tree_mask`` allows: ``tree_mask`` is boolean ``[n, P + n]`` (the
  same for every row) or ``[B, n, P + n]``, where ``P = pending_length`` is the block size
  before this call. Column ``j < P`` is the j-th pending entry, column ``P + i`` the i-th new
  token; a token must see itself and nothing after it. A chain is the lower-triangular mask, a
  tree its ancestor mask. The caller never builds a dense ``[B, n, cache + n]`` mask: each
  runtime turns this into what its kernels take (an additive float mask for transformers,
  sequence-id sets for llama.cpp, block masks for a compiled model). Positions are explicit
  (rotary positions of tree nodes are depth-based, not slot-based). Returns float32 logits
  ``[B, n, vocab_size]``; ``logits="last"`` only the last new token's (``[B, 1, V]``), and
  ``logits="none"`` none at all (``None``: a prefill), so a runtime can skip the head's work.
- ``commit(keep)``: for each row, the pending entries to keep (indices into the block,
  increasing), appended to that row's committed prefix in that order; the rest of the block is
  dropped. ``keep=None`` keeps the whole block (a prefill). Rows may keep different numbers of
  entries (ragged acceptance).
- ``reset(row=None)``: empty every row, or one row between steps (its pending block empty).

Rows (every runtime has these members; ``RuntimeBase`` gives the defaults):

- ``forward_rows(rows, tokens [R, n], positions [R, n], tree_mask)``: a forward of ``rows``
  only (increasing runtime row indices, one per row of ``tokens``); the mask is ``[n, P + n]``
  or ``[R, n, P + n]``. Every row's pending block still grows by ``n`` entries: the rows not
  given get padding entries that nothing sees, and their commit keeps none of them
  (``keep_rows``). Returns logits indexed by runtime row, ``[B', n | 1, V]`` with
  ``B' > max(rows)``; the other rows' logits are meaningless.
- ``computed_rows(rows) -> int``: the rows that forward computes, what it costs: every row
  (``RuntimeBase``: the others run padding tokens; the toy table), the first
  ``row_bucket(max(rows) + 1)`` (``BucketRows``: hf, hf-static, fast), or exactly ``len(rows)``
  (llama.cpp).
- ``with_rows(batch_size) -> Runtime``: the same model (weights shared) with an empty cache of
  ``batch_size`` rows. Declared by ``resizable``; a runtime that holds one row only refuses
  with a ``ValueError`` naming ``batch_size`` and the runtimes that can (``ROW_RUNTIMES``).

Hidden states (``returns_hidden``, on hf and fast; the others refuse with a ``ValueError``
naming the runtime and ``HIDDEN_RUNTIMES``):

- ``forward_hidden(tokens, positions, tree_mask, *, hidden_layers, rows=None, logits="all")``:
  the forward of ``forward`` (``rows=None``) or of ``forward_rows`` (``rows`` given), which also
  returns the hidden states of every new token at the layers named: a frozen ``Scored`` with
  ``logits`` as that forward returns them and ``hidden`` ``[len(hidden_layers), B', n, H]`` in
  the runtime's dtype (``B'`` as the logits; all ``n`` new tokens whatever ``logits`` says, so
  a prefill with ``logits="none"`` still gets its tokens' states). Layer indices are those of
  transformers' ``hidden_states`` tuple: ``0`` the embeddings' output, ``i`` the output of
  decoder layer ``i`` (1-based) for ``i < L``, and ``L = num_layers`` the final hidden state
  after the final norm (what the head reads); ``-1`` is ``L``, ``-k`` is ``L + 1 - k``.
  The cache changes exactly as in the plain forward, and the logits are the plain forward's.

Nothing outside ``mcsd.models`` touches a framework's model or cache object: what callers need
beyond the step (the dtype, a name, scoring a whole sequence) is on the protocol or built on it
here (``score``). The free functions ``rows_forward`` and ``with_rows`` are the validated entry
points to ``forward_rows`` and ``with_rows``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

Keep = Sequence[Sequence[int]] | None  # per row: indices into the pending block to keep
Rows = Literal["all", "last", "none"]  # which logits a forward returns
ROWS = ("all", "last", "none")
ROW_RUNTIMES = "table, hf, hf-static, fast and llama.cpp"  # the runtimes that hold several rows
HIDDEN_RUNTIMES = "hf and fast"  # the runtimes that return hidden states (``forward_hidden``)


@dataclass(frozen=True)
class Scored:
    """What ``forward_hidden`` returns: the forward's logits and the hidden states asked for."""

    logits: Tensor | None  # [B', n | 1, V] float32, as forward / forward_rows return them
    hidden: Tensor  # [len(hidden_layers), B', n, H] in the runtime's dtype, every new token


@runtime_checkable
class Runtime(Protocol):
    @property
    def name(self) -> str:
        """What the runtime runs, for logs and benchmark tables (e.g. ``hf:Qwen2ForCausalLM``)."""
        ...

    @property
    def vocab_size(self) -> int:
        """Width of the logits (may include padding ids beyond the tokenizer's vocabulary)."""
        ...

    @property
    def max_context(self) -> int | None:
        """Largest number of positions a row may use, or None if unbounded."""
        ...

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype:
        """Precision of the weights and compute (logits are always returned as float32)."""
        ...

    @property
    def batch_size(self) -> int:
        """Rows the runtime holds a cache for."""
        ...

    @property
    def num_layers(self) -> int | None:
        """Decoder layers (``hidden_layers`` run ``0 .. num_layers``); None without layers."""
        ...

    @property
    def resizable(self) -> bool:
        """Whether ``with_rows`` makes runtimes of other batch sizes."""
        ...

    @property
    def returns_hidden(self) -> bool:
        """Whether ``forward_hidden`` returns hidden states (else it refuses)."""
        ...

    def cache_lengths(self) -> tuple[int, ...]:
        """Committed positions of every row (``[B]``)."""
        ...

    @property
    def pending_length(self) -> int:
        """Entries appended since the last ``commit`` (the same for every row)."""
        ...

    def forward(
        self,
        tokens: Tensor,  # [B, n] long
        positions: Tensor,  # [B, n] long, rotary / absolute positions of the new tokens
        tree_mask: Tensor,  # [n, P + n] or [B, n, P + n] bool over the pending block
        *,
        logits: Rows = "all",
    ) -> Tensor | None:
        """Append ``tokens`` to every row's pending block; logits ``[B, n, V]`` float32 (or the
        last row's, or None)."""
        ...

    def forward_rows(
        self,
        rows: Sequence[int],  # increasing runtime row indices, one per row of ``tokens``
        tokens: Tensor,  # [R, n] long, the new tokens of ``rows``
        positions: Tensor,  # [R, n] long
        tree_mask: Tensor,  # [n, P + n] or [R, n, P + n] bool
        *,
        logits: Rows = "all",
    ) -> Tensor | None:
        """A forward of ``rows`` only (the others get padding entries); logits indexed by
        runtime row, ``[B', n | 1, V]`` with ``B' > max(rows)``, or None."""
        ...

    def computed_rows(self, rows: Sequence[int]) -> int:
        """The rows ``forward_rows(rows, ...)`` computes (what it costs)."""
        ...

    def with_rows(self, batch_size: int) -> Runtime:
        """The same model (weights shared) with an empty cache of ``batch_size`` rows."""
        ...

    def forward_hidden(
        self,
        tokens: Tensor,  # [B, n] long, or [R, n] with ``rows``
        positions: Tensor,  # [B, n] / [R, n] long
        tree_mask: Tensor,  # [n, P + n], [B, n, P + n] or [R, n, P + n] bool
        *,
        hidden_layers: Sequence[int],
        rows: Sequence[int] | None = None,
        logits: Rows = "all",
    ) -> Scored:
        """``forward`` (or ``forward_rows`` of ``rows``) that also returns the hidden states at
        ``hidden_layers``: ``Scored.hidden`` ``[len(hidden_layers), B', n, H]``."""
        ...

    def commit(self, keep: Keep = None) -> None:
        """Keep, per row, the pending entries ``keep[b]`` (all of them for ``None``)."""
        ...

    def reset(self, row: int | None = None) -> None:
        """Empty ``row`` (every row for ``None``)."""
        ...


class RuntimeBase:
    """The members every runtime shares on top of its own ``forward``: a forward of some rows
    that runs the others as padding (``forward_rows`` over every row, so ``computed_rows`` is
    ``batch_size``), and the declared capabilities with their refusals (``resizable`` and
    ``returns_hidden`` False here: ``with_rows`` and ``forward_hidden`` raise a ``ValueError``
    naming the runtimes that can). Runtimes override what they do better."""

    resizable: ClassVar[bool] = False
    returns_hidden: ClassVar[bool] = False

    @property
    def num_layers(self) -> int | None:
        return None

    def forward_rows(
        self,
        rows: Sequence[int],
        tokens: Tensor,  # [R, n] long, the new tokens of ``rows``
        positions: Tensor,  # [R, n] long
        tree_mask: Tensor,  # [n, P + n] or [R, n, P + n] bool
        *,
        logits: Rows = "all",
    ) -> Tensor | None:
        """A forward of every row, the rows not given running ``n`` padding tokens (token 0 at
        its committed length, each seeing only itself: nothing of that row is read or
        changed). Returns ``[B, n | 1, V]``."""
        check_forward(self, tokens, positions, tree_mask, logits, rows=rows)
        lengths, pending = self.cache_lengths(), self.pending_length
        batch, device = self.batch_size, self.device
        padded = pad_rows(batch, rows, tokens, positions, tree_mask, lengths, pending, device)
        return self.forward(*padded, logits=logits)

    def computed_rows(self, rows: Sequence[int]) -> int:
        """Every row: ``forward_rows`` runs the others as padding, which costs what rows do."""
        return self.batch_size

    def with_rows(self, batch_size: int) -> Runtime:
        """This runtime when it holds ``batch_size`` rows; a runtime that holds one row only
        (``resizable`` False) refuses any other size."""
        check_batch_size(batch_size)
        if batch_size == self.batch_size:
            return self
        raise one_row(self.name, batch_size)

    def forward_hidden(
        self,
        tokens: Tensor,
        positions: Tensor,
        tree_mask: Tensor,
        *,
        hidden_layers: Sequence[int],
        rows: Sequence[int] | None = None,
        logits: Rows = "all",
    ) -> Scored:
        """Refused here: ``check_hidden`` names the runtimes that return hidden states."""
        check_hidden(self, hidden_layers)
        raise NotImplementedError(f"{type(self).__name__} declares returns_hidden")


class CommittedRows(RuntimeBase):
    """The per-row bookkeeping every cache-holding runtime shares: committed lengths (ragged
    rows inside a region of width ``S = max(committed)``), the pending block's size, and the
    protocol properties that only read them. Subclasses keep the keys/values (or tokens, or
    llama.cpp sequence ids) themselves and call ``_committed_after`` / ``_reset_rows``."""

    def __init__(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> None:
        check_batch_size(batch_size)
        self._batch = batch_size
        self._device, self._dtype = device, dtype
        self._committed = [0] * batch_size
        self._width = 0  # S: where the pending block starts
        self._pending = 0

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def batch_size(self) -> int:
        return self._batch

    def cache_lengths(self) -> tuple[int, ...]:
        return tuple(self._committed)

    @property
    def pending_length(self) -> int:
        return self._pending

    def _uniform(self) -> bool:
        """Every row's committed prefix fills ``[0, S)`` (always so at batch 1)."""
        return all(c == self._width for c in self._committed)

    def _committed_after(self, rows: list[list[int]]) -> None:
        """Record a commit of ``rows`` (the runtime moved the entries already)."""
        self._committed = [c + len(k) for c, k in zip(self._committed, rows, strict=True)]
        self._width = max(self._committed)
        self._pending = 0

    def _reset_rows(self, row: int | None) -> bool:
        """Empty ``row`` (every row for ``None`` or at batch 1); True when everything was."""
        if row is not None and (
            isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < self._batch
        ):
            raise ValueError(f"row must be in [0, {self._batch}), got {row!r}")
        if row is None or self._batch == 1:
            self._committed = [0] * self._batch
            self._width = self._pending = 0
            return True
        if self._pending:
            raise ValueError("reset(row) needs an empty pending block: commit the step first")
        self._committed[row] = 0  # its entries become padding it never sees
        self._width = max(self._committed)
        return False


class BucketRows(CommittedRows):
    """``CommittedRows`` whose forwards run the first ``b`` rows of the cache (hf, and the slot
    cache of hf-static and fast): a forward of some rows computes the first ``row_bucket`` of
    them, the smallest batch size that holds the highest row given, the others among them as
    padding (``pad_rows``); rows beyond ``b`` are neither read nor written (their pending
    entries are padding). ``forward``, ``forward_rows`` and ``forward_hidden`` are here, once;
    a subclass implements ``_compute`` over the first ``b`` rows."""

    def _compute(
        self,
        tokens: Tensor,  # [b, n] long: the first b rows (b = B, or a row bucket)
        positions: Tensor,  # [b, n] long
        tree_mask: Tensor,  # [n, P + n] or [b, n, P + n] bool
        logits: Rows,
        layers: tuple[int, ...],  # hidden states to return (resolved, in [0, L]); () for none
    ) -> tuple[Tensor | None, Tensor | None]:
        """One forward of the first ``b`` rows: logits ``[b, n | 1, V]`` float32 (None for
        ``"none"``) and, for ``layers``, hidden states ``[len(layers), b, n, H]`` (else None)."""
        raise NotImplementedError

    def _forward(
        self, tokens: Tensor, positions: Tensor, tree_mask: Tensor, logits: Rows
    ) -> Tensor | None:
        """The logits of ``_compute`` (every plain forward goes through here)."""
        return self._compute(tokens, positions, tree_mask, logits, ())[0]

    def computed_rows(self, rows: Sequence[int]) -> int:
        """The first ``row_bucket`` rows: the smallest batch size holding the highest row."""
        return row_bucket(max(rows) + 1, self._batch)

    @torch.inference_mode()
    def forward(
        self, tokens: Tensor, positions: Tensor, tree_mask: Tensor, *, logits: Rows = "all"
    ) -> Tensor | None:
        check_forward(self, tokens, positions, tree_mask, logits)
        return self._forward(tokens, positions, tree_mask, logits)

    @torch.inference_mode()
    def forward_rows(
        self,
        rows: Sequence[int],
        tokens: Tensor,  # [R, n] long, the new tokens of ``rows``
        positions: Tensor,  # [R, n] long
        tree_mask: Tensor,  # [n, P + n] or [R, n, P + n] bool
        *,
        logits: Rows = "all",
    ) -> Tensor | None:
        """A forward of the first ``computed_rows(rows)`` rows only: a server with one busy row
        of sixteen computes one. Returns ``[b, n | 1, V]``, row ``r`` at index ``r``."""
        check_forward(self, tokens, positions, tree_mask, logits, rows=rows)
        return self._forward(*self._bucket_inputs(rows, tokens, positions, tree_mask), logits)

    @torch.inference_mode()
    def forward_hidden(
        self,
        tokens: Tensor,  # [B, n] long, or [R, n] with ``rows``
        positions: Tensor,  # [B, n] / [R, n] long
        tree_mask: Tensor,  # [n, P + n], [B, n, P + n] or [R, n, P + n] bool
        *,
        hidden_layers: Sequence[int],
        rows: Sequence[int] | None = None,
        logits: Rows = "all",
    ) -> Scored:
        layers = check_hidden(self, hidden_layers)
        check_forward(self, tokens, positions, tree_mask, logits, rows=rows)
        if rows is not None:
            tokens, positions, tree_mask = self._bucket_inputs(rows, tokens, positions, tree_mask)
        out, hidden = self._compute(tokens, positions, tree_mask, logits, layers)
        assert hidden is not None
        return Scored(logits=out, hidden=hidden)

    def _bucket_inputs(
        self,
        rows: Sequence[int],
        tokens: Tensor,  # [R, n] long, the new tokens of ``rows``
        positions: Tensor,  # [R, n] long
        tree_mask: Tensor,  # [n, P + n] or [R, n, P + n] bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``rows``' inputs over the first ``computed_rows(rows)`` rows (``pad_rows``: the
        others among them run padding); as given when ``rows`` are those rows already."""
        prefix = self.computed_rows(rows)
        if len(rows) == prefix:
            return tokens, positions, tree_mask
        lengths, pending, device = self._committed, self._pending, self._device
        return pad_rows(prefix, rows, tokens, positions, tree_mask, lengths, pending, device)


def check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")


def with_rows(runtime: Runtime, batch_size: int) -> Runtime:
    """``runtime`` itself when it holds ``batch_size`` rows, else the same model (weights
    shared) with a cache of ``batch_size`` rows (``runtime.with_rows``); a runtime that holds
    one row refuses."""
    check_batch_size(batch_size)
    if runtime.batch_size == batch_size:
        return runtime
    if not getattr(runtime, "resizable", False):  # an object that declares nothing: one row
        raise one_row(runtime.name, batch_size)
    return runtime.with_rows(batch_size)


def one_row(name: str, batch_size: int) -> ValueError:
    """The refusal of ``batch_size`` rows by the runtime ``name``, which holds one row."""
    return ValueError(
        f"batch_size: runtime {name} holds one row; batch_size > 1 runs on the {ROW_RUNTIMES} "
        f"runtimes, got batch_size={batch_size}"
    )


def check_hidden(runtime: Runtime, hidden_layers: Sequence[int]) -> tuple[int, ...]:
    """``hidden_layers`` resolved into ``[0, L]`` (``L = num_layers``; ``-1`` is ``L``); a
    ``ValueError`` when the runtime returns no hidden states or an index is out of range."""
    if not runtime.returns_hidden:
        raise ValueError(
            f"hidden_layers: runtime {runtime.name} does not return hidden states; the "
            f"{HIDDEN_RUNTIMES} runtimes do"
        )
    count = runtime.num_layers
    assert count is not None, f"{runtime.name} returns hidden states without num_layers"
    listed = list(hidden_layers)
    if not listed or any(
        isinstance(i, bool) or not isinstance(i, int) or not -count - 1 <= i <= count
        for i in listed
    ):
        raise ValueError(
            f"hidden_layers must be a non-empty sequence of integers in [{-count - 1}, {count}] "
            f"(0: the embeddings, i: after decoder layer i, {count}: the final norm's output; "
            f"-1 is {count}), got {listed}"
        )
    return tuple(i % (count + 1) for i in listed)


def to_device(values: list, device: torch.device | str) -> Tensor:
    """A long tensor from nested Python ints on ``device``. On CUDA it goes through pinned
    memory without blocking: a plain ``torch.tensor(..., device="cuda")`` waits for every queued
    kernel, which would stall the host once per call."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.tensor(values, dtype=torch.long, device=device)
    return torch.tensor(values, dtype=torch.long).pin_memory().to(device, non_blocking=True)


def chain_mask(n: int, pending: int = 0, device: torch.device | str = "cpu") -> Tensor:
    """Boolean ``[n, pending + n]``: ``n`` new tokens in a chain after a pending block of
    ``pending`` entries that they all see."""
    rows = torch.arange(n, device=device)[:, None] + pending  # [n, 1]
    return torch.arange(pending + n, device=device)[None, :] <= rows  # [n, P + n]


def rows_forward(
    runtime: Runtime,
    rows: Sequence[int],
    tokens: Tensor,  # [R, n] long, the new tokens of ``rows``
    positions: Tensor,  # [R, n] long
    tree_mask: Tensor,  # [n, P + n] or [R, n, P + n] bool
    *,
    logits: Rows = "all",
) -> Tensor | None:
    """A forward of ``rows`` only (in increasing order): ``runtime.forward`` when they are
    every row, else ``runtime.forward_rows`` (the module docstring: the other rows get padding
    entries the caller's commit keeps none of). Returns logits indexed by runtime row,
    ``[B', n | 1, V]`` with ``B' > max(rows)`` (the other rows' logits are meaningless); the
    runtime computes ``runtime.computed_rows(rows)`` rows."""
    if len(rows) == runtime.batch_size:
        return runtime.forward(tokens, positions, tree_mask, logits=logits)
    return runtime.forward_rows(rows, tokens, positions, tree_mask, logits=logits)


def pad_rows(
    batch: int,
    rows: Sequence[int],
    tokens: Tensor,  # [R, n] long, the new tokens of ``rows``
    positions: Tensor,  # [R, n] long
    tree_mask: Tensor,  # [n, P + n] or [R, n, P + n] bool
    lengths: Sequence[int],  # committed lengths of the runtime's rows (the first ``batch`` used)
    pending: int,
    device: torch.device,
) -> tuple[Tensor, Tensor, Tensor]:
    """``rows``' inputs spread over the first ``batch`` runtime rows: the others get ``n``
    padding tokens (token 0 at their committed length) that see only themselves. Returns
    tokens and positions ``[batch, n]`` and the mask ``[batch, n, P + n]``."""
    n = tokens.shape[1]
    index = to_device(list(rows), device)  # [R]
    all_tokens = torch.zeros(batch, n, dtype=torch.long, device=device)  # [batch, n]
    all_tokens[index] = tokens
    committed = to_device(list(lengths[:batch]), device)  # [batch]
    all_positions = committed[:, None].repeat(1, n)  # [batch, n]
    all_positions[index] = positions
    mask = torch.zeros(batch, n, pending + n, dtype=torch.bool, device=device)  # [batch, n, P + n]
    new = torch.arange(n, device=device)
    mask[:, new, pending + new] = True
    mask[index] = tree_mask.to(device).expand(len(rows), n, pending + n)
    return all_tokens, all_positions, mask


def row_bucket(rows: int, batch_size: int) -> int:
    """The captured batch size a forward of the first ``rows`` rows runs at: the next power of
    two, at most ``batch_size`` (so a cache of 16 rows captures 1, 2, 4, 8 and 16)."""
    return min(1 << (rows - 1).bit_length(), batch_size)


def row_buckets(batch_size: int) -> list[int]:
    """Every batch size ``row_bucket`` gives for a cache of ``batch_size`` rows."""
    return sorted({row_bucket(rows, batch_size) for rows in range(1, batch_size + 1)})


def reset_row(runtime: Runtime, row: int) -> None:
    """Empty ``row``; a runtime of one row is emptied whole (so a pending block that an
    interrupted step or an uncommitted proposal left goes too)."""
    runtime.reset(None if runtime.batch_size == 1 else row)


def keep_rows(batch_size: int, keep: dict[int, list[int]]) -> list[list[int]]:
    """``commit`` argument keeping ``keep[row]`` for the rows listed and nothing for the others
    (their padding entries of ``rows_forward``)."""
    return [keep.get(row, []) for row in range(batch_size)]


def check_forward(
    runtime: Runtime,
    tokens: Tensor,
    positions: Tensor,
    tree_mask: Tensor,
    logits: str = "all",
    *,
    rows: Sequence[int] | None = None,
) -> tuple[int, int]:
    """Validate a ``forward`` call's shapes (of ``forward_rows`` for ``rows``: increasing row
    indices, one per row of ``tokens``); returns ``(B, n)``, ``B`` the rows of ``tokens``.
    Shared by every runtime so that a wrong call fails the same clear way everywhere."""
    if tokens.dim() != 2 or positions.shape != tokens.shape:
        raise ValueError(
            f"tokens and positions must both be [B, n], got {list(tokens.shape)} and "
            f"{list(positions.shape)}"
        )
    batch, n = tokens.shape
    if rows is None and batch != runtime.batch_size:
        raise ValueError(f"this runtime holds {runtime.batch_size} rows, got a batch of {batch}")
    if rows is not None:
        listed = list(rows)
        if (
            len(listed) != batch
            or any(isinstance(r, bool) or not isinstance(r, int) for r in listed)
            or any(not 0 <= r < runtime.batch_size for r in listed)
            or any(j <= i for i, j in itertools.pairwise(listed))
        ):
            raise ValueError(
                f"rows must be {batch} increasing row indices in [0, {runtime.batch_size}) (one "
                f"per row of tokens), got {listed}"
            )
    width = runtime.pending_length + n
    if tuple(tree_mask.shape) not in ((n, width), (batch, n, width)):
        raise ValueError(
            f"tree_mask must be [{n}, {width}] or [{batch}, {n}, {width}] (new tokens x pending "
            f"block + new tokens), got {list(tree_mask.shape)}"
        )
    if tree_mask.dtype != torch.bool:
        raise ValueError(f"tree_mask must be boolean, got {tree_mask.dtype}")
    if logits not in ROWS:
        raise ValueError(f"logits must be one of {', '.join(ROWS)}; got {logits!r}")
    return batch, n


def check_keep(runtime: Runtime, keep: Keep) -> list[list[int]]:
    """``keep`` as per-row lists, validated against the pending block (``None``: all of it)."""
    pending = runtime.pending_length
    if keep is None:
        return [list(range(pending))] * runtime.batch_size
    rows = [list(row) for row in keep]
    if len(rows) != runtime.batch_size:
        raise ValueError(f"keep must list {runtime.batch_size} rows, got {len(rows)}")
    for b, row in enumerate(rows):
        if any(not 0 <= i < pending for i in row) or any(
            j <= i for i, j in itertools.pairwise(row)
        ):
            raise ValueError(
                f"keep[{b}] must be increasing indices into the pending block [0, {pending}), "
                f"got {row}"
            )
    return rows


@torch.inference_mode()
def score(runtime: Runtime, ids: Sequence[int]) -> Tensor:
    """Logits ``[T, V]`` of one sequence read in one forward (teacher forcing), row 0 of an
    emptied runtime; the runtime is emptied again afterwards."""
    device = runtime.device
    runtime.reset()
    tokens = torch.tensor([list(ids)] * runtime.batch_size, device=device)  # [B, T]
    positions = torch.arange(len(ids), device=device).expand_as(tokens)  # [B, T]
    logits = runtime.forward(tokens, positions, chain_mask(len(ids), device=device))
    runtime.reset()
    return logits[0]
