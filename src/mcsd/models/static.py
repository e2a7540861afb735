"""Adapter: a ``transformers`` causal LM with an mcsd-owned static KV cache (the GPU fast path).

Same ``SpecModel`` protocol and the same numbers as ``mcsd.models.hf.HFModel`` (the tests compare
the two to 1e-5 in float32), but nothing is allocated or re-shaped per step:

- KV cache: one buffer ``[layers, 2, B, kv_heads, L, head_dim]`` allocated at the first forward.
  New keys/values are written by slot (``index_copy_`` at ``cache_length + i``), so rejected tree
  nodes cost nothing, and accepted-path compaction is one gather plus one copy for all layers.
  It reaches the model through a small ``transformers.Cache`` subclass whose ``update`` writes by
  slot; no modelling file is forked or patched.
- Fixed shapes: the ``n`` new tokens are padded up to a bucket (1, 2, 4, ... ``max_graph_tokens``)
  and attention runs over the first ``A`` cache slots, ``A`` = cache + padded tokens rounded up to
  ``attention_block``. The additive float mask ``[B, 1, n_pad, A]`` (0 = attend, dtype-min =
  blocked; DESIGN 8: never a boolean mask), the tokens, positions and write slots live in
  persistent buffers. A padding row attends only to itself; its logits are dropped and its slot
  is never visible to a real row. ``max_context`` (the positions the engine may use) leaves
  ``tree_reserve`` slots (default ``max_graph_tokens``) for the tree nodes of the last step.
- CUDA graphs: on a CUDA device every (n_pad, A) shape is captured once (after two eager warm-up
  runs) and replayed afterwards; with ``compile=True`` the captured function is first compiled
  with ``torch.compile`` (fuses the small element-wise kernels; ~30 s per shape). If capture or
  compilation fails the model logs one warning and runs eagerly from then on.

A forward issues no host synchronisation: tokens, positions and masks arrive as device tensors
and the write slots are computed on the device.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from mcsd.models.hf import SUPPORTED_ATTENTION, cache_keyword

log = logging.getLogger(__name__)

MAX_GRAPH_TOKENS = 128  # new tokens per forward up to which forwards are padded and captured
ATTENTION_BLOCK = 256  # attention length granularity: fewer graphs, little wasted attention


def bucket(n: int, max_tokens: int = MAX_GRAPH_TOKENS) -> int:
    """The padded token count for ``n`` new tokens: the next power of two (``n`` itself beyond
    ``max_tokens``, where forwards run eagerly)."""
    if n > max_tokens:
        return n
    return 1 << (n - 1).bit_length()


class StaticHFModel:
    """A ``transformers`` ``PreTrainedModel`` (causal LM) behind the ``SpecModel`` protocol, with
    a static KV cache of ``max_length`` positions and CUDA-graph replay on GPUs."""

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
    ) -> None:
        self.model = model.eval()
        config = model.config
        attention = getattr(config, "_attn_implementation", None)
        if attention not in SUPPORTED_ATTENTION:
            raise ValueError(
                f"attention implementation {attention!r} is not supported for tree attention; "
                f"load the model with attn_implementation in {SUPPORTED_ATTENTION}"
            )
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        layer_types = getattr(text_config, "layer_types", None) or ["full_attention"]
        if any(kind != "full_attention" for kind in layer_types):
            raise ValueError(
                f"{type(model).__name__} has {sorted(set(layer_types))} layers; the static cache "
                "supports full-attention layers only (use mcsd.models.hf.HFModel)"
            )
        limit = getattr(text_config, "max_position_embeddings", None)
        max_length = max_length or min(limit or 4096, 4096)
        if limit is not None and max_length > limit:
            max_length = limit
        self.tree_reserve = max_graph_tokens if tree_reserve is None else tree_reserve
        if batch_size < 1 or max_length <= self.tree_reserve + 1:
            raise ValueError(
                f"need batch_size >= 1 and max_length > tree_reserve + 1 = {self.tree_reserve + 1}"
                f", got {batch_size}, {max_length}"
            )
        self.max_length = max_length
        self.batch_size = batch_size
        self.max_graph_tokens = max_graph_tokens
        self.attention_block = attention_block
        self._num_layers = int(text_config.num_hidden_layers)
        self._cache_keyword = cache_keyword(model)
        first = next(model.parameters())
        self._dtype, self._device = first.dtype, first.device
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
        self._length = 0
        # What the cache's update() reads while a forward runs (baked into a captured graph).
        self._write: Tensor = self._slots[:1]
        self._attend = 0

        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self._use_graphs = cuda_graphs and self._device.type == "cuda"
        self._pool = torch.cuda.graph_pool_handle() if self._use_graphs else None
        self._run = self._forward_impl
        if compile:
            # One compilation per captured shape, and every instance shares the method's code
            # object: lift dynamo's default limit of 8 so later shapes are not left uncompiled.
            config = torch._dynamo.config
            config.recompile_limit = max(config.recompile_limit, 256)
            config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 1024)
            self._run = torch.compile(self._forward_impl, dynamic=False)
        self.graph_captures = 0  # shapes captured so far (reported by the benchmarks)

    # ------------------------------------------------------------------ protocol
    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def max_context(self) -> int | None:
        # The engine bounds positions; the cache also holds one step's tree nodes beyond them.
        return self.max_length - self.tree_reserve

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def cache_length(self) -> int:
        return self._length

    @torch.inference_mode()
    def forward(self, tokens: Tensor, positions: Tensor, mask: Tensor) -> Tensor:
        batch, n = tokens.shape
        cache = self._length
        expected = (batch, n, cache + n)
        if tuple(mask.shape) != expected:
            raise ValueError(f"mask must have shape {list(expected)}, got {list(mask.shape)}")
        if batch != self.batch_size:
            raise ValueError(f"this static cache holds batch size {self.batch_size}, got {batch}")
        if cache + n > self.max_length:
            raise ValueError(
                f"static KV cache full: {cache} cached + {n} new tokens > max_length "
                f"{self.max_length} (build StaticHFModel with a larger max_length)"
            )
        padded = bucket(n, self.max_graph_tokens)
        if cache + padded > self.max_length:
            padded = n  # no room to pad at the very end of the cache: run this one eagerly
        block = self.attention_block
        attend = min(-(-(cache + padded) // block) * block, self.max_length)
        capturable = padded <= self.max_graph_tokens and padded == bucket(n, self.max_graph_tokens)

        if padded <= self.max_graph_tokens:
            self._tokens[:, :n].copy_(tokens)
            self._positions[:, :n].copy_(positions)
            torch.add(self._slot_base[:padded], cache, out=self._slots[:padded])
            tokens_in, positions_in = self._tokens[:, :padded], self._positions[:, :padded]
            slots = self._slots[:padded]
            mask_view = self._mask[:, :, :padded, :attend]  # [B, 1, padded, A]
        else:  # long prefill: exact shape, fresh tensors
            tokens_in, positions_in = tokens, positions
            slots = torch.arange(cache, cache + n, device=self._device)
            mask_view = torch.empty(batch, 1, n, attend, dtype=self._dtype, device=self._device)
        mask_view.fill_(self._blocked)
        mask_view[:, 0, :n, : cache + n].masked_fill_(mask, 0.0)
        if padded > n:  # padding rows see only their own slot
            mask_view[:, 0, n:, cache + n : cache + padded].diagonal(dim1=-2, dim2=-1).fill_(0.0)

        key = (padded, attend)
        if capturable and self._use_graphs:
            if key not in self._graphs:
                self._capture(key, tokens_in, positions_in, mask_view, slots)
            if key in self._graphs:
                graph, logits = self._graphs[key]
                graph.replay()
                self._length = cache + n
                return logits[:, :n].float()
        logits = self._call(self._forward_impl, tokens_in, positions_in, mask_view, slots, attend)
        self._length = cache + n
        return logits[:, :n].float()  # [B, n, V]

    @torch.inference_mode()
    def compact(self, start: int, keep: Tensor) -> None:
        m = keep.shape[-1]
        if m and self._kv is not None:
            kv = self._kv
            layers, two, b, h, _, d = kv.shape
            index = keep[None, None, :, None, :, None].expand(layers, two, b, h, m, d)
            kv[:, :, :, :, start : start + m] = kv.gather(4, index)
        self._length = start + m

    def trim(self, length: int) -> None:
        self._length = min(self._length, length)

    def reset(self) -> None:
        self._length = 0

    # ------------------------------------------------------------------ internals
    def _forward_impl(self, tokens: Tensor, positions: Tensor, mask: Tensor) -> Tensor:
        out = self.model(
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

    def _capture(self, key, tokens, positions, mask, slots) -> None:
        """Warm up twice on a side stream, then capture one forward. The warm-up runs compute
        exactly what the replay will (same inputs), so the cache writes they make are harmless."""
        padded, attend = key
        try:
            stream = torch.cuda.Stream(self._device)
            stream.wait_stream(torch.cuda.current_stream(self._device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._call(self._run, tokens, positions, mask, slots, attend)
            torch.cuda.current_stream(self._device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                logits = self._call(self._run, tokens, positions, mask, slots, attend)
            self._graphs[key] = (graph, logits)
            self.graph_captures += 1
        except Exception as error:  # any failure: fall back to eager, say so once
            log.warning(
                "mcsd: CUDA graph capture of %s failed for %d tokens x %d attention slots "
                "(%s: %s); running eagerly from now on",
                type(self.model).__name__,
                padded,
                attend,
                type(error).__name__,
                error,
            )
            self._use_graphs = False
            self._graphs.clear()

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
        return self.owner._length

    def __len__(self) -> int:
        return self.owner._num_layers
