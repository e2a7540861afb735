"""Cheaper drafts, still lossless: int8 weights and a restricted vocabulary (FR-Spec).

On a CPU a draft forward is bound by the bytes of weights it reads, so a draft at 0.3 of the
target's cost caps what a chain can gain. Two switchable ways to make it cheaper:

- ``int8``: the draft's linear layers quantised to int8 (per output channel, activations
  quantised on the fly: ``torch.ao`` dynamic quantisation, CPU only): half the bytes of bf16 and
  fbgemm's int8 kernels; the draft agrees a little less often with the target.
- ``vocab=K`` (FR-Spec, Zhao et al. 2025): the LM head scores only the K most frequent tokens
  (``mcsd.models.frequent``). For Qwen2.5-0.5B the head is 136M of the ~500M weights a forward
  reads (V = 151,936).

Both are lossless because the draft only proposes: verification makes the output follow the
target whatever the draft is. Tokens outside the kept vocabulary get draft probability 0 (logit
-inf), never proposed; every rule handles q(x) = 0 (the correction covers them), and greedy
verification accepts exactly the target's argmax. Only the acceptance rate changes.

``cheap_draft`` works on the transformers runtimes (``hf`` and ``hf-static``: the variant is the
same runtime, with the same settings, around the modified model) and, for ``vocab``, on the fast
runtime (its own copy of the kept rows of the head, the weights shared).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from mcsd.models.base import Keep, Rows, Runtime, Scored, with_rows
from mcsd.models.frequent import frequent_tokens


def _shallow_copy(hf: Any) -> Any:
    """A copy of a transformers model sharing every submodule (and weight) with the original,
    whose own submodules can be replaced without touching the original."""
    clone = copy.copy(hf)
    clone._modules = dict(hf._modules)  # new module table, same submodules
    return clone


def _restrict_head(hf: Any, keep: Tensor) -> None:
    """Replace ``hf``'s LM head by one scoring only the ``keep`` token ids (rows copied)."""
    head = hf.get_output_embeddings()
    keep = keep.to(head.weight.device)
    small = torch.nn.Linear(
        head.in_features, len(keep), bias=head.bias is not None, device=keep.device
    ).to(head.weight.dtype)
    with torch.no_grad():
        small.weight.copy_(head.weight[keep])
        if head.bias is not None:
            small.bias.copy_(head.bias[keep])
    small.requires_grad_(False)
    hf.set_output_embeddings(small)


def quantize_int8(hf: Any) -> Any:
    """An int8 copy of ``hf`` (CPU): linear layers dynamically quantised per output channel,
    everything else in float32 (the quantised kernels take float32 activations)."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    if next(hf.parameters()).device.type != "cpu":
        raise ValueError("int8 drafts use torch's CPU quantised kernels; use a CPU device")
    work = copy.deepcopy(hf).float()
    with warnings.catch_warnings():  # torch.ao's eager quantisation is deprecated, still works
        warnings.simplefilter("ignore")
        quantize_dynamic(
            work, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True
        )
    return work


class RestrictedVocabModel:
    """A runtime around one whose LM head scores only ``keep``: logits come back full width,
    every other token at -inf. Everything else (rows, capabilities, hidden states) is the inner
    runtime's."""

    def __init__(self, inner: Runtime, keep: Tensor, full_vocab: int) -> None:
        self.inner = inner
        self.keep = keep.to(inner.device)
        self.full_vocab = full_vocab

    def with_rows(self, batch_size: int) -> RestrictedVocabModel:
        return RestrictedVocabModel(with_rows(self.inner, batch_size), self.keep, self.full_vocab)

    @property
    def name(self) -> str:
        return f"{self.inner.name}+fr={len(self.keep)}"

    @property
    def vocab_size(self) -> int:
        return self.full_vocab

    @property
    def max_context(self) -> int | None:
        return self.inner.max_context

    @property
    def device(self) -> torch.device:
        return self.inner.device

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.dtype

    @property
    def batch_size(self) -> int:
        return self.inner.batch_size

    @property
    def num_layers(self) -> int | None:
        return self.inner.num_layers

    @property
    def resizable(self) -> bool:
        return self.inner.resizable

    @property
    def returns_hidden(self) -> bool:
        return self.inner.returns_hidden

    def cache_lengths(self) -> tuple[int, ...]:
        return self.inner.cache_lengths()

    @property
    def pending_length(self) -> int:
        return self.inner.pending_length

    def computed_rows(self, rows: Sequence[int]) -> int:
        return self.inner.computed_rows(rows)

    def forward(
        self, tokens: Tensor, positions: Tensor, tree_mask: Tensor, *, logits: Rows = "all"
    ) -> Tensor | None:
        return self._widen(self.inner.forward(tokens, positions, tree_mask, logits=logits))

    def forward_rows(
        self,
        rows: Sequence[int],
        tokens: Tensor,
        positions: Tensor,
        tree_mask: Tensor,
        *,
        logits: Rows = "all",
    ) -> Tensor | None:
        out = self.inner.forward_rows(rows, tokens, positions, tree_mask, logits=logits)
        return self._widen(out)

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
        scored = self.inner.forward_hidden(
            tokens, positions, tree_mask, hidden_layers=hidden_layers, rows=rows, logits=logits
        )
        return Scored(logits=self._widen(scored.logits), hidden=scored.hidden)

    def _widen(self, small: Tensor | None) -> Tensor | None:
        """``[B, n, K]`` logits of the kept ids -> ``[B, n, V]``, -inf elsewhere."""
        if small is None:
            return None
        full = small.new_full((*small.shape[:-1], self.full_vocab), float("-inf"))  # [B, n, V]
        return full.index_copy_(-1, self.keep, small)

    def commit(self, keep: Keep = None) -> None:
        self.inner.commit(keep)

    def reset(self, row: int | None = None) -> None:
        self.inner.reset(row)


def cheap_draft(
    draft: Any,
    tokenizer: Any,
    *,
    vocab: int | None = None,
    int8: bool = False,
    texts: Iterable[str] | None = None,
) -> Runtime:
    """A cheaper variant of a transformers ``draft`` runtime: int8 and/or scoring only the
    ``vocab`` most frequent tokens (of ``texts``, default the built-in corpus). The original is
    not modified (the vocabulary cut alone shares its weights)."""
    if vocab is None and not int8:
        return draft
    if hasattr(draft, "restricted"):  # the fast runtime: its own head's rows
        if int8:
            raise ValueError(
                "int8 drafts use torch's CPU quantised kernels on the transformers runtimes; the "
                "fast runtime has no int8 weights yet: drop +int8, or use runtime hf on a CPU"
            )
        keep = frequent_tokens(tokenizer, vocab, draft.vocab_size, texts=texts)
        return RestrictedVocabModel(draft.restricted(keep), keep, draft.vocab_size)
    hf = getattr(draft, "hf_model", None)
    if hf is None or not hasattr(draft, "variant"):
        raise ValueError(
            f"cheap drafts (int8, +fr) need a transformers runtime (hf or hf-static), got "
            f"{draft.name}"
        )
    full_vocab = int(hf.get_output_embeddings().weight.shape[0])
    work = _shallow_copy(hf)
    keep = None
    if vocab is not None:
        keep = frequent_tokens(tokenizer, vocab, full_vocab, texts=texts)
        _restrict_head(work, keep)
    if int8:
        work = quantize_int8(work)
    width = full_vocab if keep is None else len(keep)  # of the head actually in the model
    cheap: Runtime = draft.variant(work, vocab_size=width)
    if keep is not None:
        cheap = RestrictedVocabModel(cheap, keep, full_vocab)
    return cheap
