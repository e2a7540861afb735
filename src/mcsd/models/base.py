"""The runtime protocol: what the engine, the proposers and the benchmarks need from a model.

A runtime holds the KV cache of ``batch_size`` rows. Each row has a *committed* prefix (its own
length, ``cache_lengths()[b]``; rows are ragged) and, after it, a *pending block*: the entries
appended by the forwards since the last ``commit``. A speculative step appends a token tree to
the pending block (one forward for the target, one per tree level for a draft), then commits
the accepted path; everything else in the block is dropped.

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

Nothing outside ``mcsd.models`` touches a framework's model or cache object: what callers need
beyond the step (the dtype, a name, scoring a whole sequence) is on the protocol or built on it
here (``score``).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

Keep = Sequence[Sequence[int]] | None  # per row: indices into the pending block to keep
Rows = Literal["all", "last", "none"]  # which logits a forward returns
ROWS = ("all", "last", "none")


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

    def commit(self, keep: Keep = None) -> None:
        """Keep, per row, the pending entries ``keep[b]`` (all of them for ``None``)."""
        ...

    def reset(self, row: int | None = None) -> None:
        """Empty ``row`` (every row for ``None``)."""
        ...


class CommittedRows:
    """The per-row bookkeeping every cache-holding runtime shares: committed lengths (ragged
    rows inside a region of width ``S = max(committed)``), the pending block's size, and the
    protocol properties that only read them, and the row bucket a forward of some rows runs
    (their ``forward_rows`` computes the first ``computed_rows`` rows, on ``_bucket_inputs``).
    Subclasses keep the keys/values themselves."""

    def __init__(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
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

    def computed_rows(self, rows: Sequence[int]) -> int:
        """The rows a forward of ``rows`` (``forward_rows``) computes: the first ``row_bucket``
        of them, the smallest batch size that holds the highest row given."""
        return row_bucket(max(rows) + 1, self._batch)

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

    def _committed_after(self, rows: list[list[int]]) -> None:
        """Record a commit of ``rows`` (the runtime moved the entries already)."""
        self._committed = [c + len(k) for c, k in zip(self._committed, rows, strict=True)]
        self._width = max(self._committed)
        self._pending = 0

    def _reset_rows(self, row: int | None) -> bool:
        """Empty ``row`` (every row for ``None`` or at batch 1); True when everything was."""
        if row is None or self._batch == 1:
            self._committed = [0] * self._batch
            self._width = self._pending = 0
            return True
        if self._pending:
            raise ValueError("reset(row) needs an empty pending block: commit the step first")
        if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < self._batch:
            raise ValueError(f"row must be in [0, {self._batch}), got {row!r}")
        self._committed[row] = 0  # its entries become padding it never sees
        self._width = max(self._committed)
        return False


ROW_RUNTIMES = "table, hf, hf-static, fast and llama.cpp"  # the runtimes that hold several rows


def with_rows(runtime: Runtime, batch_size: int) -> Runtime:
    """``runtime`` itself when it holds ``batch_size`` rows, else the same model (weights
    shared) with a cache of ``batch_size`` rows; a runtime that holds one row refuses."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if runtime.batch_size == batch_size:
        return runtime
    resize = getattr(runtime, "with_rows", None)
    if resize is None:
        raise ValueError(
            f"batch_size: runtime {runtime.name} holds one row; batch_size > 1 runs on the "
            f"{ROW_RUNTIMES} runtimes, got batch_size={batch_size}"
        )
    return resize(batch_size)


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
    """A forward of ``rows`` only (in increasing order): every other row of the runtime runs
    ``n`` padding tokens (token 0 at its committed length), each seeing only itself, so nothing
    of that row is read or changed; the caller drops the padding entries at the commit (keeps
    none of them). Returns logits indexed by runtime row, ``[B', n, V]`` with ``B' > max(rows)``
    (the other rows' logits are meaningless). A runtime with a native subset forward (an
    optional ``forward_rows`` method of this signature) computes fewer rows: llama.cpp ``rows``
    alone, hf, hf-static and fast the first ``row_bucket`` rows, the smallest batch size that
    holds them; every row's pending block still grows by ``n`` entries, so the
    commit is the same."""
    batch = runtime.batch_size
    if len(rows) == batch:
        return runtime.forward(tokens, positions, tree_mask, logits=logits)
    native = getattr(runtime, "forward_rows", None)
    if native is not None:
        return native(rows, tokens, positions, tree_mask, logits=logits)
    lengths, pending = runtime.cache_lengths(), runtime.pending_length
    padded = pad_rows(batch, rows, tokens, positions, tree_mask, lengths, pending, runtime.device)
    return runtime.forward(*padded, logits=logits)


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
