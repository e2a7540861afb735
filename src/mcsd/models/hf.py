"""Runtime: a Hugging Face ``transformers`` causal LM on its own dynamic KV cache.

All contact with transformers' cache API lives in this package, because it drifts inside 5.x
(DESIGN 8):
- the forward keyword for the cache is ``past_key_values`` in 5.17 and ``cache`` in 5.24;
- ``DynamicCache.crop(n)`` changed meaning, so we never call it: committing rewrites each
  layer's ``keys`` / ``values`` tensors (``[B, kv_heads, seq, head_dim]`` in every supported
  version) directly;
- the attention mask is an additive float mask ``[B, 1, n, S + P + n]`` (0 = attend,
  dtype-min = blocked) with explicit ``position_ids``: a boolean 4D mask is silently wrong under
  the "eager" attention implementation.
No modelling file is forked or patched.

Cache layout (every row the same physical length, rows ragged inside it): columns ``[0, S)``
hold the committed prefixes, row b using its first ``committed[b]`` (the rest is padding it never
sees); the pending block follows at ``[S, S + P)``. A commit moves each row's kept entries to
the end of its prefix. A forward of some rows (``forward_rows``) runs the first ``b`` of them
(``mcsd.models.base.BucketRows``) on the cache cut to those rows. Hidden states
(``forward_hidden``) are transformers' ``output_hidden_states`` tuple, indexed as it is.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mcsd.models.base import BucketRows, Keep, Rows, check_keep, to_device

# Attention implementations checked against a chain forward (tests/test_hf_adapter.py).
SUPPORTED_ATTENTION = ("sdpa", "eager")


def cache_keyword(model: Any) -> str:
    """The keyword ``model.forward`` takes its KV cache by: ``past_key_values`` in transformers
    5.17, ``cache`` in 5.24 (DESIGN 8: cache API drift stays in this package)."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def check_attention(model: Any) -> None:
    attention = getattr(model.config, "_attn_implementation", None)
    if attention not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"attention implementation {attention!r} is not supported for tree attention; "
            f"load the model with attn_implementation in {SUPPORTED_ATTENTION}"
        )


def text_config(model: Any) -> Any:
    """The language model's config (a multimodal model's text part)."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def model_label(kind: str, model: Any) -> str:
    """``kind:checkpoint`` for logs and tables, e.g. ``hf:qwen2.5-coder-1.5b-instruct``."""
    source = getattr(model.config, "_name_or_path", "") or type(model).__name__
    return f"{kind}:{Path(str(source)).name}"


class HFModel(BucketRows):
    """A ``transformers`` ``PreTrainedModel`` (causal LM) behind the runtime protocol
    (``mcsd.models.base``), on a ``DynamicCache`` of ``batch_size`` rows."""

    kind = "hf"
    resizable = True
    returns_hidden = True

    def __init__(self, model: Any, *, batch_size: int = 1, vocab_size: int | None = None) -> None:
        from transformers import DynamicCache

        check_attention(model)
        first = next(model.parameters())
        super().__init__(batch_size, first.device, first.dtype)
        self.hf_model = model.eval()  # for mcsd.models only (baselines, cheap drafts)
        self._cache_keyword = cache_keyword(model)
        self._new_cache = lambda: DynamicCache(config=model.config)
        self._cache = self._new_cache()
        # A quantised head has no weight tensor: its width is given (mcsd.models.cheap).
        self._vocab = vocab_size or int(model.get_output_embeddings().weight.shape[0])

    def variant(self, model: Any, *, vocab_size: int | None = None) -> HFModel:
        """The same runtime around another (e.g. cheaper) model."""
        return HFModel(model, batch_size=self._batch, vocab_size=vocab_size)

    def with_rows(self, batch_size: int) -> HFModel:
        """The same model with a cache of ``batch_size`` rows (weights shared)."""
        return HFModel(self.hf_model, batch_size=batch_size, vocab_size=self._vocab)

    # ------------------------------------------------------------------ protocol
    @property
    def name(self) -> str:
        return model_label(self.kind, self.hf_model)

    @property
    def vocab_size(self) -> int:
        return self._vocab

    @property
    def max_context(self) -> int | None:
        return getattr(self.hf_model.config, "max_position_embeddings", None)

    @property
    def num_layers(self) -> int:
        return text_config(self.hf_model).num_hidden_layers

    def _compute(
        self,
        tokens: Tensor,  # [b, n] long: the first b rows (b = B, or a row bucket)
        positions: Tensor,  # [b, n] long
        tree_mask: Tensor,  # [n, P + n] or [b, n, P + n] bool
        logits: Rows,
        layers: tuple[int, ...],
    ) -> tuple[Tensor | None, Tensor | None]:
        """A forward of the first ``b`` rows; below ``B``, every layer's cache is cut to those
        rows for the forward, and the rows beyond get ``n`` zero entries afterwards (pending
        padding nothing reads)."""
        prefix = tokens.shape[0]
        if prefix == self._batch:
            return self._model_forward(tokens, positions, tree_mask, logits, layers)
        layers_cache = self._cache.layers
        full = [(layer.keys, layer.values) for layer in layers_cache]
        for layer, (keys, values) in zip(layers_cache, full, strict=True):
            if isinstance(keys, Tensor):
                layer.keys, layer.values = keys[:prefix], values[:prefix]
        try:
            out = self._model_forward(tokens, positions, tree_mask, logits, layers)
        except BaseException:
            for layer, (keys, values) in zip(layers_cache, full, strict=False):
                layer.keys, layer.values = keys, values
            raise
        before = dict(enumerate(full))  # layers built by this forward had no rows before
        for i, layer in enumerate(self._cache.layers):
            keys, values = before.get(i, (None, None))
            layer.keys = _with_rows(keys, layer.keys, self._batch)
            layer.values = _with_rows(values, layer.values, self._batch)
        return out

    def _model_forward(
        self,
        tokens: Tensor,  # [b, n] long
        positions: Tensor,  # [b, n] long
        tree_mask: Tensor,  # [n, P + n] or [b, n, P + n] bool
        logits: Rows,
        layers: tuple[int, ...],
    ) -> tuple[Tensor | None, Tensor | None]:
        """The transformers forward on the cache as it is (its batch the tokens' ``b``)."""
        batch, n = tokens.shape
        width, pending = self._width, self._pending
        device = tokens.device
        lengths = to_device(self._committed[:batch], device)  # [b]
        prefix = torch.arange(width, device=device)[None, :] < lengths[:, None]  # [b, S]
        block = tree_mask.to(device).expand(batch, n, pending + n)  # [b, n, P + n]
        allowed = torch.cat([prefix[:, None, :].expand(batch, n, width), block], dim=2)
        additive = torch.zeros(allowed.shape, dtype=self._dtype, device=device)
        additive = additive.masked_fill(~allowed, torch.finfo(self._dtype).min)[:, None]
        extra = {"output_hidden_states": True} if layers else {}
        out = self.hf_model(
            input_ids=tokens,
            position_ids=positions,
            attention_mask=additive,  # [b, 1, n, S + P + n]
            use_cache=True,
            logits_to_keep=n if logits == "all" else 1,  # "none": one row, cheaper than n
            **{self._cache_keyword: self._cache},
            **extra,
        )
        first = width + pending == 0
        self._pending += n
        if first:
            self._check_layers()
        # hidden_states: L + 1 tensors [b, n, H], the last after the final norm
        hidden = torch.stack([out.hidden_states[i] for i in layers]) if layers else None
        return None if logits == "none" else out.logits.float(), hidden  # [b, n | 1, V]

    def commit(self, keep: Keep = None) -> None:
        rows = check_keep(self, keep)
        width, pending = self._width, self._pending
        new_width = max(c + len(k) for c, k in zip(self._committed, rows, strict=True))
        if pending:
            device = self._device
            uniform = self._uniform() and len(set(map(len, rows))) == 1
            for layer in self._cache.layers:
                for name in ("keys", "values"):
                    states = getattr(layer, name)  # [B, H, S + P, D]
                    if uniform:  # every row as long as S (batch 1): one gather
                        index = to_device(rows, device) + width  # [B, m]
                        b, h, _, d = states.shape
                        index = index[:, None, :, None].expand(b, h, index.shape[1], d)
                        kept = torch.cat([states[:, :, :width], states.gather(2, index)], dim=2)
                    else:
                        kept = _ragged_commit(states, width, self._committed, rows, new_width)
                    setattr(layer, name, kept)
        self._committed_after(rows)

    def reset(self, row: int | None = None) -> None:
        if self._reset_rows(row):
            self._cache = self._new_cache()
            return
        for layer in self._cache.layers:  # the region may have shrunk: S = max(committed)
            if layer.keys is None:  # nothing run yet (a lazily built layer)
                continue
            layer.keys = layer.keys[:, :, : self._width]
            layer.values = layer.values[:, :, : self._width]

    # ------------------------------------------------------------------ internals
    def _check_layers(self) -> None:
        for i, layer in enumerate(self._cache.layers):
            if getattr(layer, "is_sliding", False) or not isinstance(
                getattr(layer, "keys", None), Tensor
            ):
                raise ValueError(
                    f"{type(self.hf_model).__name__} layer {i} uses a {type(layer).__name__} "
                    "cache (sliding-window or non-attention); mcsd needs full-attention KV caches"
                )


def _with_rows(before: Tensor | None, first: Tensor, batch: int) -> Tensor:
    """A layer's ``[B, H, T + n, D]`` states after a forward of its first ``b`` rows: ``first``
    ``[b, H, T + n, D]`` for them, ``before`` ``[B, H, T, D]`` (None: empty) and ``n`` zero
    entries for the rest."""
    b, h, length, d = first.shape
    out = first.new_zeros(batch, h, length, d)
    out[:b] = first
    if before is not None:
        out[b:, :, : before.shape[2]] = before[b:]
    return out


def _ragged_commit(
    states: Tensor, width: int, committed: list[int], rows: list[list[int]], new_width: int
) -> Tensor:
    """``states`` ``[B, H, S + P, D]`` with each row's kept pending entries moved to the end of
    its own prefix: ``[B, H, new_width, D]``."""
    b, h, _, d = states.shape
    out = states.new_zeros(b, h, new_width, d)
    kept_width = min(width, new_width)
    out[:, :, :kept_width] = states[:, :, :kept_width]
    for row, (start, kept) in enumerate(zip(committed, rows, strict=True)):
        if kept:
            index = to_device(kept, states.device) + width
            out[row, :, start : start + len(kept)] = states[row, :, index]
    return out
