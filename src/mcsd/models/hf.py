"""Adapter: a Hugging Face ``transformers`` causal LM as a ``SpecModel``.

All contact with transformers' cache API lives here, because it drifts inside 5.x (DESIGN 8):
- the forward keyword for the cache is ``past_key_values`` in 5.17 and ``cache`` in 5.24;
- ``DynamicCache.crop(n)`` changed meaning, so we never call it: trimming and accepted-path
  compaction rewrite each layer's ``keys`` / ``values`` tensors (``[B, kv_heads, seq, head_dim]``
  in every supported version) directly;
- the tree mask is passed as an additive float mask ``[B, 1, n, cache + n]`` (0 = attend,
  dtype-min = blocked) with explicit ``position_ids``: a boolean 4D mask is silently wrong under
  the "eager" attention implementation.
No modelling file is forked or patched.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor

# Attention implementations checked against a chain forward (tests/test_hf_adapter.py).
SUPPORTED_ATTENTION = ("sdpa", "eager")


def cache_keyword(model: Any) -> str:
    """The keyword ``model.forward`` takes its KV cache by: ``past_key_values`` in transformers
    5.17, ``cache`` in 5.24 (DESIGN 8: cache API drift stays in this module)."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


class HFModel:
    """A ``transformers`` ``PreTrainedModel`` (causal LM) behind the ``SpecModel`` protocol."""

    def __init__(self, model: Any) -> None:
        from transformers import DynamicCache

        self.model = model.eval()
        attention = getattr(model.config, "_attn_implementation", None)
        if attention not in SUPPORTED_ATTENTION:
            raise ValueError(
                f"attention implementation {attention!r} is not supported for tree attention; "
                f"load the model with attn_implementation in {SUPPORTED_ATTENTION}"
            )
        self._cache_keyword = cache_keyword(model)
        self._new_cache = lambda: DynamicCache(config=model.config)
        self._cache = self._new_cache()
        self._length = 0
        self._dtype = next(model.parameters()).dtype

    # ------------------------------------------------------------------ protocol
    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def max_context(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def cache_length(self) -> int:
        return self._length

    @torch.inference_mode()
    def forward(self, tokens: Tensor, positions: Tensor, mask: Tensor) -> Tensor:
        batch, n = tokens.shape
        expected = (batch, n, self._length + n)
        if tuple(mask.shape) != expected:
            raise ValueError(f"mask must have shape {list(expected)}, got {list(mask.shape)}")
        blocked = torch.finfo(self._dtype).min
        additive = torch.zeros(mask.shape, dtype=self._dtype, device=mask.device)
        additive = additive.masked_fill(~mask, blocked)[:, None]  # [B, 1, n, cache + n]
        out = self.model(
            input_ids=tokens,
            position_ids=positions,
            attention_mask=additive,
            use_cache=True,
            **{self._cache_keyword: self._cache},
        )
        self._length += n
        if self._length == n:
            self._check_layers()
        return out.logits.float()  # [B, n, V]

    def compact(self, start: int, keep: Tensor) -> None:
        if keep.shape[-1] == 0:
            self.trim(start)
            return
        for layer in self._layers():
            index = keep[:, None, :, None]  # [B, 1, m, 1]
            for name in ("keys", "values"):
                states = getattr(layer, name)  # [B, H, S, D]
                b, h, _, d = states.shape
                kept = states.gather(2, index.expand(b, h, keep.shape[-1], d))
                setattr(layer, name, torch.cat([states[:, :, :start], kept], dim=2))
        self._length = start + keep.shape[-1]

    def trim(self, length: int) -> None:
        if length >= self._length:
            return
        if length == 0:
            self.reset()
            return
        for layer in self._layers():
            layer.keys = layer.keys[:, :, :length]
            layer.values = layer.values[:, :, :length]
        self._length = length

    def reset(self) -> None:
        self._cache = self._new_cache()
        self._length = 0

    # ------------------------------------------------------------------ internals
    def _layers(self) -> list[Any]:
        return list(self._cache.layers)

    def _check_layers(self) -> None:
        for i, layer in enumerate(self._layers()):
            if getattr(layer, "is_sliding", False) or not isinstance(
                getattr(layer, "keys", None), Tensor
            ):
                raise ValueError(
                    f"{type(self.model).__name__} layer {i} uses a {type(layer).__name__} cache "
                    "(sliding-window or non-attention); mcsd needs full-attention KV caches"
                )
