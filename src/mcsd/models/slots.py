"""The static slot cache shared by the GPU runtimes (``hf-static`` and ``fast``).

A runtime on this base owns one KV buffer ``[layers, 2, B, kv_heads, L, head_dim]`` and persistent
input buffers, and only has to say how one forward runs over them (``_body``) and how its output
becomes logits (``_logits``). Everything else is here, once:

- Slots: committed prefixes occupy ``[0, committed[b])`` of each row, inside a region of width
  ``S = max(committed)``; the pending block is written at ``S, S + 1, ...``, so rejected tree
  nodes cost nothing, and a commit is one gather plus one copy for all layers (one per row when
  rows keep different numbers of entries).
- Fixed shapes: the ``n`` new tokens are padded up to a bucket (1, 2, 4, ... ``max_graph_tokens``)
  and attention runs over the first ``A`` slots, ``A`` = first write slot + padded tokens
  rounded up to ``attention_block`` (``attention_block = L``: one attention length). The
  additive float mask ``[B, 1, n_pad, A]`` (0 = attend, dtype-min = blocked), tokens, positions
  and write slots live in persistent buffers. A padding row attends only to itself; its output
  is dropped and its slot is never visible to a real row. ``max_context`` leaves
  ``tree_reserve`` slots (default ``max_graph_tokens``) for the tree nodes of a step.
- Row buckets (``mcsd.models.base.BucketRows``): ``forward_rows`` (a forward of some rows)
  runs only the first ``b`` rows of the cache, ``b`` the smallest power of two (or ``B``) that
  holds the highest row given (``row_bucket``), the others among them as padding; rows beyond
  ``b`` are neither read nor written. Engines fill the lowest free row first, so one busy row
  of sixteen costs a one-row forward, not a sixteen-row one.
- CUDA graphs: on a CUDA device every (b, n_pad, A) shape is captured once and replayed
  (``mcsd.models.graphs.GraphRunner``), through the subclass's compiled function if it has one.
  A forward that returns no logits is a prefill: it runs eagerly (never compiled, never
  captured: prompt lengths are one-offs), as does one beyond ``max_graph_tokens``. A forward
  that also returns hidden states (``forward_hidden``, the subclass's ``_body_hidden``) is
  captured per (shape, layers) too, never compiled, with the attention of a plain forward of
  its shape (so the same numbers as the plain forward without ``compile``).

A forward issues no host synchronisation: tokens, positions and masks arrive as device tensors,
the write slots are computed on the device, committed lengths live on the host.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mcsd.config import MAX_GRAPH_TOKENS
from mcsd.models.base import BucketRows, Keep, Rows, check_keep, to_device
from mcsd.models.graphs import GraphRunner


def bucket(n: int, max_tokens: int = MAX_GRAPH_TOKENS) -> int:
    """The padded token count for ``n`` new tokens: the next power of two (``n`` itself beyond
    ``max_tokens``, where forwards run eagerly)."""
    if n > max_tokens:
        return n
    return 1 << (n - 1).bit_length()


class SlotCacheRuntime(BucketRows):
    """The runtime protocol over a static slot cache (see the module docstring). Subclasses
    implement ``_body`` and ``_logits`` and call ``_allocate`` once the KV shape is known."""

    def __init__(
        self,
        *,
        device: torch.device,
        dtype: torch.dtype,
        max_length: int,
        batch_size: int,
        cuda_graphs: bool,
        max_graph_tokens: int,
        attention_block: int,
        tree_reserve: int | None,
        label: str,
    ) -> None:
        super().__init__(batch_size, device, dtype)
        self.tree_reserve = max_graph_tokens if tree_reserve is None else tree_reserve
        if max_length <= self.tree_reserve + 1:
            raise ValueError(
                f"need max_length > tree_reserve + 1 = {self.tree_reserve + 1}, got {max_length}"
            )
        self.max_length = max_length
        self.max_graph_tokens = max_graph_tokens
        self.attention_block = attention_block
        self._blocked = torch.finfo(dtype).min

        # Persistent inputs; a forward's view of them has a fixed shape per (n_pad, A).
        width = max(max_graph_tokens, 1)
        self._tokens = torch.zeros(batch_size, width, dtype=torch.long, device=device)
        self._positions = torch.zeros_like(self._tokens)
        self._slot_base = torch.arange(width, device=device)  # [width]
        self._slots = torch.zeros(width, dtype=torch.long, device=device)  # write slots
        self._mask = torch.zeros(
            batch_size, 1, width, max_length, dtype=dtype, device=device
        )  # [B, 1, width, L] additive
        self._kv: Tensor | None = None  # [layers, 2, B, kv_heads, L, head_dim]
        self._graphs = GraphRunner(device, enabled=cuda_graphs, label=label)

    # ------------------------------------------------------------------ subclass hooks
    def _body(
        self,
        tokens: Tensor,
        positions: Tensor,
        mask: Tensor,
        slots: Tensor,
        attend: int,
        *,
        compiled: bool,
    ) -> Tensor:
        """One forward over the persistent views (writes the new keys/values at ``slots``);
        ``compiled``: through the compiled function, if the subclass has one."""
        raise NotImplementedError

    def _body_hidden(
        self,
        tokens: Tensor,
        positions: Tensor,
        mask: Tensor,
        slots: Tensor,
        attend: int,
        *,
        explicit: bool,
        layers: tuple[int, ...],
    ) -> tuple[Tensor, Tensor]:
        """``_body``, eagerly, and the hidden states at ``layers`` ``[len(layers), b, n_pad,
        H]`` (only on a runtime that ``returns_hidden``); ``explicit``: the attention that a
        captured forward of this shape runs."""
        raise NotImplementedError

    def _logits(self, out: Tensor, n: int, rows: Rows) -> Tensor:
        """float32 logits ``[B, n | 1, V]`` of the first ``n`` rows of ``_body``'s output."""
        raise NotImplementedError

    def _allocate(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> Tensor:
        if self._kv is None:
            shape = (layers, 2, self._batch, kv_heads, self.max_length, head_dim)
            # Zeros, not empty: masked slots must still hold finite numbers (NaN * 0 is NaN).
            self._kv = torch.zeros(shape, dtype=dtype, device=self._device)
        return self._kv

    @property
    def graph_captures(self) -> int:
        return self._graphs.captures

    # ------------------------------------------------------------------ protocol
    @property
    def max_context(self) -> int | None:
        # The engine bounds positions; the cache also holds one step's tree nodes beyond them.
        return self.max_length - self.tree_reserve

    def _compute(
        self,
        tokens: Tensor,  # [b, n] long: the first b rows (b = B, or a row bucket)
        positions: Tensor,  # [b, n] long
        tree_mask: Tensor,  # [n, P + n] or [b, n, P + n] bool
        logits: Rows,
        layers: tuple[int, ...],
    ) -> tuple[Tensor | None, Tensor | None]:
        batch, n = tokens.shape
        width, pending = self._width, self._pending
        start = width + pending  # first write slot
        if start + n > self.max_length:
            raise ValueError(
                f"static KV cache full: {start} cached + {n} new tokens > max_length "
                f"{self.max_length} (build the runtime with a larger max_length)"
            )
        padded = bucket(n, self.max_graph_tokens)
        if start + padded > self.max_length:
            padded = n  # no room to pad at the very end of the cache: run this one eagerly
        block = self.attention_block
        attend = min(-(-(start + padded) // block) * block, self.max_length)
        capturable = padded <= self.max_graph_tokens and padded == bucket(n, self.max_graph_tokens)

        if padded <= self.max_graph_tokens:
            self._tokens[:batch, :n].copy_(tokens)
            self._positions[:batch, :n].copy_(positions)
            torch.add(self._slot_base[:padded], start, out=self._slots[:padded])
            tokens_in = self._tokens[:batch, :padded]
            positions_in = self._positions[:batch, :padded]
            slots = self._slots[:padded]
            mask_view = self._mask[:batch, :, :padded, :attend]  # [b, 1, padded, A]
        else:  # long prefill: exact shape, fresh tensors
            tokens_in, positions_in = tokens, positions
            slots = torch.arange(start, start + n, device=self._device)
            mask_view = torch.empty(batch, 1, n, attend, dtype=self._dtype, device=self._device)
        mask_view.fill_(self._blocked)
        rows = mask_view[:, 0, :n]  # [b, n, A]
        committed = self._committed[:batch]
        if all(c == width for c in committed):  # every row's prefix fills [0, S)
            rows[:, :, :width].fill_(0.0)
        else:
            lengths = to_device(committed, self._device)  # [b]
            prefix = torch.arange(width, device=self._device)[None, :] < lengths[:, None]
            rows[:, :, :width].masked_fill_(prefix[:, None, :], 0.0)
        rows[:, :, width : start + n].masked_fill_(tree_mask.to(self._device), 0.0)
        if padded > n:  # padding rows see only their own slot
            mask_view[:, 0, n:, start + n : start + padded].diagonal(dim1=-2, dim2=-1).fill_(0.0)

        def graphed() -> Tensor:
            return self._body(tokens_in, positions_in, mask_view, slots, attend, compiled=True)

        captured = capturable and logits != "none"

        def stacked() -> Tensor:  # [len(layers) + 1, b, n_pad, H]: the hidden states, then out
            out, hidden = self._body_hidden(
                tokens_in, positions_in, mask_view, slots, attend, explicit=captured, layers=layers
            )
            return torch.cat([hidden, out[None]])

        hidden = None
        if layers:
            key = (batch, padded, attend, layers)
            # a captured graph's output is its buffer, which the next replay overwrites: copied
            states = self._graphs.run(key, stacked).clone() if captured else stacked()
            out, hidden = states[-1], states[:-1, :, :n]  # [b, n_pad, H], [len(layers), b, n, H]
        elif captured:
            out = self._graphs.run((batch, padded, attend), graphed)
        else:
            out = self._body(tokens_in, positions_in, mask_view, slots, attend, compiled=False)
        self._pending += n
        return None if logits == "none" else self._logits(out, n, logits), hidden

    @torch.inference_mode()
    def commit(self, keep: Keep = None) -> None:
        rows = check_keep(self, keep)
        width = self._width
        kv = self._kv
        if self._pending and kv is not None:
            layers, two, b, h, _, d = kv.shape
            same = len(set(map(len, rows))) == 1
            if same and self._uniform():  # batch 1: one gather
                m = len(rows[0])
                if m:
                    index = to_device(rows, self._device) + width  # [B, m]
                    index = index[None, None, :, None, :, None].expand(layers, two, b, h, m, d)
                    kv[:, :, :, :, width : width + m] = kv.gather(4, index)
            else:
                for row, (begin, kept) in enumerate(zip(self._committed, rows, strict=True)):
                    if kept:
                        index = to_device(kept, self._device) + width
                        kv[:, :, row, :, begin : begin + len(kept)] = kv[:, :, row, :, index]
        self._committed_after(rows)

    def reset(self, row: int | None = None) -> None:
        self._reset_rows(row)
