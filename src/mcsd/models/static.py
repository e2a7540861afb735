"""Runtime: a ``transformers`` causal LM on an mcsd-owned static KV cache (the GPU fast path).

Same runtime protocol and the same numbers as ``mcsd.models.hf.HFModel`` (the tests compare the
two to 1e-5 in float32), but nothing is allocated or re-shaped per step:

- KV cache: one buffer ``[layers, 2, B, kv_heads, L, head_dim]`` allocated at the first forward.
  Committed prefixes occupy slots ``[0, committed[b])`` of each row, inside a region of width
  ``S = max(committed)``; the pending block is written at ``S, S + 1, ...`` (``index_copy_``),
  so rejected tree nodes cost nothing, and a commit is one gather plus one copy for all layers.
  It reaches the model through a small ``transformers.Cache`` subclass whose ``update`` writes by
  slot; no modelling file is forked or patched.
- Fixed shapes: the ``n`` new tokens are padded up to a bucket (1, 2, 4, ... ``max_graph_tokens``)
  and attention runs over the first ``A`` cache slots, ``A`` = first write slot + padded tokens
  rounded up to ``attention_block``. The additive float mask ``[B, 1, n_pad, A]`` (0 = attend,
  dtype-min = blocked; DESIGN 8: never a boolean mask), the tokens, positions and write slots
  live in persistent buffers. A padding row attends only to itself; its logits are dropped and
  its slot is never visible to a real row. ``max_context`` (the positions the engine may use)
  leaves ``tree_reserve`` slots (default ``max_graph_tokens``) for the tree nodes of a step.
- CUDA graphs: on a CUDA device every (n_pad, A) shape is captured once and replayed afterwards
  (``mcsd.models.graphs.GraphRunner``); with ``compile=True`` the captured function is first
  compiled with ``torch.compile`` (fuses the small element-wise kernels; ~30 s per shape).

A forward issues no host synchronisation: tokens, positions and masks arrive as device tensors
and the write slots are computed on the device.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mcsd.config import ATTENTION_BLOCK, MAX_GRAPH_TOKENS, STATIC_MAX_LENGTH
from mcsd.models.base import Keep, check_forward, check_keep, to_device
from mcsd.models.graphs import GraphRunner
from mcsd.models.hf import cache_keyword, check_attention, model_label


def bucket(n: int, max_tokens: int = MAX_GRAPH_TOKENS) -> int:
    """The padded token count for ``n`` new tokens: the next power of two (``n`` itself beyond
    ``max_tokens``, where forwards run eagerly)."""
    if n > max_tokens:
        return n
    return 1 << (n - 1).bit_length()


class StaticHFModel:
    """A ``transformers`` ``PreTrainedModel`` (causal LM) behind the runtime protocol, with a
    static KV cache of ``max_length`` positions per row and CUDA-graph replay on GPUs."""

    kind = "hf-static"

    def __init__(
        self,
        model: Any,
        *,
        max_length: int | None = None,
        batch_size: int = 1,
        cuda_graphs: bool = True,
        compile: bool = False,
        max_graph_tokens: int = MAX_GRAPH_TOKENS,
        attention_block: int = ATTENTION_BLOCK,
        tree_reserve: int | None = None,
        vocab_size: int | None = None,
    ) -> None:
        check_attention(model)
        self.hf_model = model.eval()  # for mcsd.models only (baselines, cheap drafts)
        config = model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        layer_types = getattr(text_config, "layer_types", None) or ["full_attention"]
        if any(kind != "full_attention" for kind in layer_types):
            raise ValueError(
                f"{type(model).__name__} has {sorted(set(layer_types))} layers; the static cache "
                "supports full-attention layers only (use runtime 'hf')"
            )
        limit = getattr(text_config, "max_position_embeddings", None)
        max_length = max_length or min(limit or STATIC_MAX_LENGTH, STATIC_MAX_LENGTH)
        if limit is not None and max_length > limit:
            max_length = limit
        self.tree_reserve = max_graph_tokens if tree_reserve is None else tree_reserve
        if batch_size < 1 or max_length <= self.tree_reserve + 1:
            raise ValueError(
                f"need batch_size >= 1 and max_length > tree_reserve + 1 = {self.tree_reserve + 1}"
                f", got {batch_size}, {max_length}"
            )
        self.options = dict(
            max_length=max_length,
            batch_size=batch_size,
            cuda_graphs=cuda_graphs,
            compile=compile,
            max_graph_tokens=max_graph_tokens,
            attention_block=attention_block,
            tree_reserve=tree_reserve,
        )  # what ``variant`` copies
        self.max_length = max_length
        self.max_graph_tokens = max_graph_tokens
        self.attention_block = attention_block
        self._batch = batch_size
        self._num_layers = int(text_config.num_hidden_layers)
        self._cache_keyword = cache_keyword(model)
        first = next(model.parameters())
        self._dtype, self._device = first.dtype, first.device
        self._vocab = vocab_size or int(model.get_output_embeddings().weight.shape[0])
        self._blocked = torch.finfo(self._dtype).min

        # Persistent inputs; a forward's view of them has a fixed shape per (n_pad, A).
        width = max(max_graph_tokens, 1)
        self._tokens = torch.zeros(batch_size, width, dtype=torch.long, device=self._device)
        self._positions = torch.zeros_like(self._tokens)
        self._slot_base = torch.arange(width, device=self._device)  # [width]
        self._slots = torch.zeros(width, dtype=torch.long, device=self._device)  # write slots
        self._mask = torch.zeros(
            batch_size, 1, width, max_length, dtype=self._dtype, device=self._device
        )  # [B, 1, width, L] additive
        self._kv: Tensor | None = None  # [layers, 2, B, kv_heads, L, head_dim]
        self._cache = _SlotCache(self)
        self._committed = [0] * batch_size
        self._width = 0  # S = max(committed): where the pending block starts
        self._pending = 0
        # What the cache's update() reads while a forward runs (baked into a captured graph).
        self._write: Tensor = self._slots[:1]
        self._attend = 0

        self._graphs = GraphRunner(self._device, enabled=cuda_graphs, label=type(model).__name__)
        self._run = self._forward_impl
        if compile:
            # One compilation per captured shape, and every instance shares the method's code
            # object: lift dynamo's default limit of 8 so later shapes are not left uncompiled.
            dynamo = torch._dynamo.config
            dynamo.recompile_limit = max(dynamo.recompile_limit, 256)
            dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 1024)
            self._run = torch.compile(self._forward_impl, dynamic=False)

    def variant(self, model: Any, *, vocab_size: int | None = None) -> StaticHFModel:
        """The same runtime, with the same settings, around another (e.g. cheaper) model."""
        return StaticHFModel(model, vocab_size=vocab_size, **self.options)

    @property
    def graph_captures(self) -> int:
        return self._graphs.captures

    # ------------------------------------------------------------------ protocol
    @property
    def name(self) -> str:
        return model_label(self.kind, self.hf_model)

    @property
    def vocab_size(self) -> int:
        return self._vocab

    @property
    def max_context(self) -> int | None:
        # The engine bounds positions; the cache also holds one step's tree nodes beyond them.
        return self.max_length - self.tree_reserve

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

    @torch.inference_mode()
    def forward(self, tokens: Tensor, positions: Tensor, tree_mask: Tensor) -> Tensor:
        batch, n = check_forward(self, tokens, positions, tree_mask)
        width, pending = self._width, self._pending
        start = width + pending  # first write slot
        if start + n > self.max_length:
            raise ValueError(
                f"static KV cache full: {start} cached + {n} new tokens > max_length "
                f"{self.max_length} (build StaticHFModel with a larger max_length)"
            )
        padded = bucket(n, self.max_graph_tokens)
        if start + padded > self.max_length:
            padded = n  # no room to pad at the very end of the cache: run this one eagerly
        block = self.attention_block
        attend = min(-(-(start + padded) // block) * block, self.max_length)
        capturable = padded <= self.max_graph_tokens and padded == bucket(n, self.max_graph_tokens)

        if padded <= self.max_graph_tokens:
            self._tokens[:, :n].copy_(tokens)
            self._positions[:, :n].copy_(positions)
            torch.add(self._slot_base[:padded], start, out=self._slots[:padded])
            tokens_in, positions_in = self._tokens[:, :padded], self._positions[:, :padded]
            slots = self._slots[:padded]
            mask_view = self._mask[:, :, :padded, :attend]  # [B, 1, padded, A]
        else:  # long prefill: exact shape, fresh tensors
            tokens_in, positions_in = tokens, positions
            slots = torch.arange(start, start + n, device=self._device)
            mask_view = torch.empty(batch, 1, n, attend, dtype=self._dtype, device=self._device)
        mask_view.fill_(self._blocked)
        rows = mask_view[:, 0, :n]  # [B, n, A]
        if all(c == width for c in self._committed):  # every row's prefix fills [0, S)
            rows[:, :, :width].fill_(0.0)
        else:
            lengths = to_device(self._committed, self._device)  # [B]
            prefix = torch.arange(width, device=self._device)[None, :] < lengths[:, None]
            rows[:, :, :width].masked_fill_(prefix[:, None, :], 0.0)
        rows[:, :, width : start + n].masked_fill_(tree_mask.to(self._device), 0.0)
        if padded > n:  # padding rows see only their own slot
            mask_view[:, 0, n:, start + n : start + padded].diagonal(dim1=-2, dim2=-1).fill_(0.0)

        def run() -> Tensor:
            return self._call(self._run, tokens_in, positions_in, mask_view, slots, attend)

        if capturable:
            logits = self._graphs.run((padded, attend), run)
        else:
            logits = self._call(
                self._forward_impl, tokens_in, positions_in, mask_view, slots, attend
            )
        self._pending += n
        return logits[:, :n].float()  # [B, n, V]

    @torch.inference_mode()
    def commit(self, keep: Keep = None) -> None:
        rows = check_keep(self, keep)
        width = self._width
        lengths = [c + len(k) for c, k in zip(self._committed, rows, strict=True)]
        kv = self._kv
        if self._pending and kv is not None:
            layers, two, b, h, _, d = kv.shape
            same = len(set(map(len, rows))) == 1
            if same and all(c == width for c in self._committed):  # batch 1: one gather
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
        self._committed = lengths
        self._width = max(lengths)
        self._pending = 0

    def reset(self, row: int | None = None) -> None:
        if row is None or self._batch == 1:
            self._committed = [0] * self._batch
            self._width = self._pending = 0
            return
        if self._pending:
            raise ValueError("reset(row) needs an empty pending block: commit the step first")
        if not 0 <= row < self._batch:
            raise ValueError(f"row must be in [0, {self._batch}), got {row}")
        self._committed[row] = 0
        self._width = max(self._committed)

    # ------------------------------------------------------------------ internals
    def _forward_impl(self, tokens: Tensor, positions: Tensor, mask: Tensor) -> Tensor:
        out = self.hf_model(
            input_ids=tokens,
            position_ids=positions,
            attention_mask=mask,
            use_cache=True,
            **{self._cache_keyword: self._cache},
        )
        return out.logits  # [B, n_pad, V] in the model dtype

    def _call(self, fn: Any, tokens, positions, mask, slots, attend: int) -> Tensor:
        self._write, self._attend = slots, attend
        return fn(tokens, positions, mask)

    def _buffers(self, key_states: Tensor) -> Tensor:
        if self._kv is None:
            b, h, _, d = key_states.shape
            shape = (self._num_layers, 2, b, h, self.max_length, d)
            # Zeros, not empty: masked slots must still hold finite numbers (NaN * 0 is NaN).
            self._kv = torch.zeros(shape, dtype=key_states.dtype, device=key_states.device)
        return self._kv


def _cache_base() -> type:
    from transformers import Cache

    return Cache


class _SlotCache(_cache_base()):  # type: ignore[misc]
    """The ``transformers.Cache`` the model sees: ``update`` writes the new keys/values at the
    owner's write slots and returns the first ``A`` slots of the layer's buffers."""

    def __init__(self, owner: StaticHFModel) -> None:
        super().__init__(layers=[])
        self.owner = owner

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        owner = self.owner
        kv = owner._buffers(key_states)
        keys, values = kv[layer_idx, 0], kv[layer_idx, 1]  # [B, H, L, D]
        keys.index_copy_(2, owner._write, key_states)
        values.index_copy_(2, owner._write, value_states)
        return keys[:, :, : owner._attend], values[:, :, : owner._attend]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.owner._width + self.owner._pending

    def __len__(self) -> int:
        return self.owner._num_layers
