"""Runtime: a ``transformers`` causal LM on an mcsd-owned static KV cache (``hf-static``).

Same runtime protocol and the same numbers as ``mcsd.models.hf.HFModel`` (the tests compare the
two to 1e-5 in float32); the slot cache, fixed shapes and CUDA graphs are the shared
``mcsd.models.slots.SlotCacheRuntime``. The cache reaches the model through a small
``transformers.Cache`` subclass whose ``update`` writes by slot; no modelling file is forked or
patched. With ``compile=True`` the captured function is first compiled with ``torch.compile``
(fuses the small element-wise kernels; ~30 s per shape).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mcsd.config import ATTENTION_BLOCK, MAX_GRAPH_TOKENS, STATIC_MAX_LENGTH
from mcsd.models.hf import cache_keyword, check_attention, model_label, text_config
from mcsd.models.slots import Rows, SlotCacheRuntime, bucket

__all__ = ["StaticHFModel", "bucket"]


class StaticHFModel(SlotCacheRuntime):
    """A ``transformers`` ``PreTrainedModel`` (causal LM) behind the runtime protocol, with a
    static KV cache of ``max_length`` positions per row and CUDA-graph replay on GPUs."""

    kind = "hf-static"
    resizable = True  # hidden states: not yet (returns_hidden False, forward_hidden refuses)

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
        config = text_config(model)
        layer_types = getattr(config, "layer_types", None) or ["full_attention"]
        if any(kind != "full_attention" for kind in layer_types):
            raise ValueError(
                f"{type(model).__name__} has {sorted(set(layer_types))} layers; the static cache "
                "supports full-attention layers only (use runtime 'hf')"
            )
        limit = getattr(config, "max_position_embeddings", None)
        max_length = max_length or min(limit or STATIC_MAX_LENGTH, STATIC_MAX_LENGTH)
        if limit is not None and max_length > limit:
            max_length = limit
        first = next(model.parameters())
        super().__init__(
            device=first.device,
            dtype=first.dtype,
            max_length=max_length,
            batch_size=batch_size,
            cuda_graphs=cuda_graphs,
            max_graph_tokens=max_graph_tokens,
            attention_block=attention_block,
            tree_reserve=tree_reserve,
            label=type(model).__name__,
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
        self._num_layers = int(config.num_hidden_layers)
        self._cache_keyword = cache_keyword(model)
        self._vocab = vocab_size or int(model.get_output_embeddings().weight.shape[0])
        self._cache = _SlotCache(self)
        # What the cache's update() reads while a forward runs (baked into a captured graph).
        self._write: Tensor = self._slots[:1]
        self._attend = 0
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

    def with_rows(self, batch_size: int) -> StaticHFModel:
        """The same model and settings with a cache of ``batch_size`` rows (weights shared)."""
        options = self.options | {"batch_size": batch_size}
        return StaticHFModel(self.hf_model, vocab_size=self._vocab, **options)

    @property
    def name(self) -> str:
        return model_label(self.kind, self.hf_model)

    @property
    def vocab_size(self) -> int:
        return self._vocab

    @property
    def num_layers(self) -> int:
        return self._num_layers

    # ------------------------------------------------------------------ SlotCacheRuntime
    def _body(self, tokens, positions, mask, slots, attend: int, *, compiled: bool) -> Tensor:
        self._write, self._attend = slots, attend
        return (self._run if compiled else self._forward_impl)(tokens, positions, mask)

    def _logits(self, out: Tensor, n: int, rows: Rows) -> Tensor:
        return (out[:, n - 1 : n] if rows == "last" else out[:, :n]).float()  # [B, n | 1, V]

    def _forward_impl(self, tokens: Tensor, positions: Tensor, mask: Tensor) -> Tensor:
        out = self.hf_model(
            input_ids=tokens,
            position_ids=positions,
            attention_mask=mask,
            use_cache=True,
            **{self._cache_keyword: self._cache},
        )
        return out.logits  # [B, n_pad, V] in the model dtype

    def _buffers(self, key_states: Tensor) -> Tensor:
        _, h, _, d = key_states.shape
        return self._allocate(self._num_layers, h, d, key_states.dtype)


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
        rows = key_states.shape[0]  # the first b rows (a row bucket, or all B)
        keys, values = kv[layer_idx, 0, :rows], kv[layer_idx, 1, :rows]  # [b, H, L, D]
        keys.index_copy_(2, owner._write, key_states)
        values.index_copy_(2, owner._write, value_states)
        return keys[:, :, : owner._attend], values[:, :, : owner._attend]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.owner._width + self.owner._pending

    def __len__(self) -> int:
        return self.owner._num_layers
