"""The model protocol the engine needs: a causal LM with a KV cache it can append to and compact.

A ``SpecModel`` holds the KV cache of one batch of sequences (every row the same cache length).
The engine only ever:
- appends new tokens with explicit positions and an explicit boolean attention mask over the whole
  cache plus the new tokens (``forward``), which is how a token tree is evaluated in one pass;
- keeps the committed prefix and the accepted path, dropping the rest (``compact``);
- trims the cache back to a length (``trim``), or empties it (``reset``).

Nothing in mcsd outside ``mcsd.models`` touches a framework's cache classes.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class SpecModel(Protocol):
    @property
    def vocab_size(self) -> int:
        """Width of the logits (may include padding ids beyond the tokenizer's vocabulary)."""
        ...

    @property
    def max_context(self) -> int | None:
        """Largest number of positions the model supports, or None if unbounded."""
        ...

    @property
    def device(self) -> torch.device: ...

    @property
    def cache_length(self) -> int:
        """Number of positions held in the KV cache."""
        ...

    def forward(
        self,
        tokens: Tensor,  # [B, n] long, appended after the cache
        positions: Tensor,  # [B, n] long, rotary / absolute positions of the new tokens
        mask: Tensor,  # [B, n, cache_length + n] bool, True = may attend
    ) -> Tensor:
        """Run the new tokens and append their keys/values; returns logits ``[B, n, V]`` float32."""
        ...

    def compact(self, start: int, keep: Tensor) -> None:
        """Keep cache positions ``[0, start)`` followed by ``keep`` (``[B, m]`` long, increasing,
        all ``>= start``); drop every other position."""
        ...

    def trim(self, length: int) -> None:
        """Keep the first ``length`` cache positions."""
        ...

    def reset(self) -> None:
        """Empty the cache."""
        ...


def causal_mask(batch: int, cache_length: int, n: int, device: torch.device | str) -> Tensor:
    """Boolean ``[B, n, cache_length + n]`` mask of a plain chain: new token j sees the whole
    cache and the new tokens up to itself."""
    cols = torch.arange(cache_length + n, device=device)  # [C + n]
    rows = torch.arange(n, device=device)[:, None] + cache_length  # [n, 1]
    return (cols[None, :] <= rows).expand(batch, n, cache_length + n)
