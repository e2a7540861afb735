"""llama.cpp's own decoding loops on mcsd's llama.cpp runtimes: the baselines of ``mcsd bench``.

- ``autoregressive``  the target alone, what a llama.cpp user runs (``llama-ar``): the prompt in
                      one ``llama_decode`` (logits of its last token only), then one decode and one
                      llama.cpp sampler call per token;
- ``speculative``     llama.cpp's draft-model speculative decoding, "draft-simple" (``llama-spec``;
                      ``common/speculative.cpp`` + ``examples/speculative-simple`` of the vendored
                      llama.cpp), re-implemented through the same bindings: the draft proposes a
                      chain greedily (its top token among its top 10, up to ``n_max`` tokens,
                      stopping early when that token's probability is below ``p_min``; llama.cpp's
                      defaults are 3 and 0), the target scores [pending, chain] in one decode and
                      llama.cpp's sampler draws the target's token at each position in turn,
                      keeping draft tokens while they match (lossless: each emitted token is a
                      draw from the target at its position). The draft decodes each committed
                      token once (llama.cpp also re-feeds it the target's batch).

Both sample with llama.cpp's sampler chain (logits of ids past ``vocab_size`` masked, then
temperature, top-k, top-p, as ``mcsd.sampling.warp`` orders them; greedy = argmax) seeded per
answer, and run on the runtimes' own contexts (``LlamaCppModel.raw_*``), which they leave empty.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from mcsd.config import SamplingConfig
from mcsd.models.base import Runtime
from mcsd.models.llamacpp import LlamaCppModel
from mcsd.stats import StepRecord

DRAFT_MAX = 3  # llama.cpp's --spec-draft-n-max default (common_params_speculative_draft)
DRAFT_P_MIN = 0.0  # llama.cpp's --spec-draft-p-min default
DRAFT_TOP_K = 10  # draft-simple's draft sampler: the top token among the top 10


def llamacpp_model(runtime: Runtime, method: str) -> LlamaCppModel:
    """``runtime`` as a ``LlamaCppModel``; ``ValueError`` for any other runtime."""
    if not isinstance(runtime, LlamaCppModel):
        raise ValueError(
            f"method {method} runs llama.cpp's own loop: it needs the llama.cpp runtime "
            f"(--runtime llama.cpp), not {runtime.name}"
        )
    return runtime


class _Sampler:
    """A llama.cpp sampler chain that draws like ``sampling`` over the first ``vocab_size`` ids."""

    def __init__(self, model: LlamaCppModel, sampling: SamplingConfig, vocab_size: int, seed: int):
        lib = model._lib
        self.lib, self.context = lib, model.raw_context
        self.chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        width = model.vocab_size
        if vocab_size < width:  # padding ids beyond the tokenizer are never drawn (as in mcsd)
            masked = (lib.llama_logit_bias * (width - vocab_size))()
            for i, token in enumerate(range(vocab_size, width)):
                masked[i].token, masked[i].bias = token, float("-inf")
            self._keep = masked  # the sampler keeps a copy; hold ours until it is built
            self._add(lib.llama_sampler_init_logit_bias(width, width - vocab_size, masked))
        if sampling.greedy:
            self._add(lib.llama_sampler_init_greedy())
            return
        self._add(lib.llama_sampler_init_temp(sampling.temperature))
        if sampling.top_k > 0:
            self._add(lib.llama_sampler_init_top_k(sampling.top_k))
        if sampling.top_p < 1.0:
            self._add(lib.llama_sampler_init_top_p(sampling.top_p, 1))
        self._add(lib.llama_sampler_init_dist(seed % (2**32)))

    def _add(self, sampler: Any) -> None:
        self.lib.llama_sampler_chain_add(self.chain, sampler)

    def sample(self, index: int) -> int:
        """Draw from the logits of output ``index`` of the last decode (and accept the token)."""
        return int(self.lib.llama_sampler_sample(self.chain, self.context, index))

    def close(self) -> None:
        self.lib.llama_sampler_free(self.chain)


def _budget(model: LlamaCppModel, prompt_ids: Sequence[int], max_new_tokens: int) -> int:
    room = (model.max_context or max_new_tokens + len(prompt_ids)) - len(prompt_ids)
    if room < 1:
        raise ValueError(
            f"prompt has {len(prompt_ids)} tokens, at or beyond the model context of "
            f"{model.max_context}"
        )
    return min(max_new_tokens, room)


def autoregressive(
    target: Runtime,
    prompt_ids: Sequence[int],
    sampling: SamplingConfig,
    stop: frozenset[int],
    max_new_tokens: int,
    *,
    vocab_size: int,
    seed: int | None = None,
) -> tuple[list[int], float, list[StepRecord]]:
    """``llama-ar``: the new tokens, the wall time (prefill included) and one record per token."""
    model = llamacpp_model(target, "llama-ar")
    budget = _budget(model, prompt_ids, max_new_tokens)
    model.reset()
    tokens: list[int] = []
    records: list[StepRecord] = []
    started = time.perf_counter()
    sampler = _Sampler(model, sampling, vocab_size, seed or 0)
    try:
        model.raw_decode(prompt_ids, 0, all_logits=False)
        prefill = time.perf_counter() - started
        for position in range(len(prompt_ids), len(prompt_ids) + budget):
            step = time.perf_counter()
            token = sampler.sample(-1)
            tokens.append(token)
            if token in stop or len(tokens) == budget:
                records.append(StepRecord(0, 1, 0, (), 0, 0.0, 0.0, prefill_time=prefill))
                break
            model.raw_decode([token], position, all_logits=False)
            elapsed = time.perf_counter() - step
            records.append(StepRecord(0, 1, 0, (), 0, 0.0, elapsed, prefill_time=prefill))
            prefill = 0.0
    finally:
        sampler.close()
        model.reset()
    return tokens, time.perf_counter() - started, records


def speculative(
    target: Runtime,
    draft: Runtime,
    prompt_ids: Sequence[int],
    sampling: SamplingConfig,
    stop: frozenset[int],
    max_new_tokens: int,
    *,
    vocab_size: int,
    seed: int | None = None,
    n_max: int = DRAFT_MAX,
    p_min: float = DRAFT_P_MIN,
) -> tuple[list[int], float, list[StepRecord]]:
    """``llama-spec``: the new tokens, the wall time (prefill included) and one record per
    target decode (accepted draft tokens, emitted tokens, the chain's length)."""
    main = llamacpp_model(target, "llama-spec")
    helper = llamacpp_model(draft, "llama-spec")
    budget = _budget(main, prompt_ids, max_new_tokens)
    main.reset()
    helper.reset()
    committed = list(prompt_ids)
    tokens: list[int] = []
    records: list[StepRecord] = []
    started = time.perf_counter()
    sampler = _Sampler(main, sampling, vocab_size, seed or 0)
    try:
        if len(committed) > 1:
            main.raw_decode(committed[:-1], 0, all_logits=False)
        helper_length = 0  # committed tokens whose KV the draft holds
        prefill = time.perf_counter() - started
        while len(tokens) < budget:
            step = time.perf_counter()
            pending = len(committed) - 1  # position of the pending (last committed) token
            room = budget - len(tokens) - 1  # draft tokens that can still be emitted
            uncached = committed[helper_length:]
            limit = min(n_max, room)
            chain, decoded = _draft_chain(helper, uncached, helper_length, limit, p_min, vocab_size)
            helper_length = len(committed) + decoded
            drafted = time.perf_counter()
            main.raw_decode([committed[-1], *chain], pending, all_logits=True)
            emitted: list[int] = []
            for i in range(len(chain) + 1):
                token = sampler.sample(i)
                emitted.append(token)
                if i == len(chain) or token != chain[i] or token in stop:
                    break
            accepted = len(emitted) - 1
            main.raw_truncate(pending + 1 + accepted)  # keep the pending token and the matches
            helper.raw_truncate(min(helper_length, pending + 1 + accepted))
            helper_length = min(helper_length, pending + 1 + accepted)
            for i, token in enumerate(emitted):
                if token in stop or len(tokens) + i + 1 >= budget:
                    emitted = emitted[: i + 1]
                    break
            committed += emitted
            tokens += emitted
            verified = time.perf_counter()
            records.append(
                StepRecord(
                    accepted=min(accepted, len(emitted)),
                    emitted=len(emitted),
                    attempted=accepted + (0 if accepted == len(chain) else 1),
                    ranks=(),
                    tree_size=len(chain),
                    draft_time=drafted - step,
                    target_time=verified - drafted,
                    prefill_time=prefill,
                )
            )
            prefill = 0.0
            if emitted and emitted[-1] in stop:
                break
    finally:
        sampler.close()
        main.reset()
        helper.reset()
    return tokens, time.perf_counter() - started, records


def _draft_chain(
    draft: LlamaCppModel,
    uncached: list[int],
    start: int,
    n_max: int,
    p_min: float,
    vocab_size: int,
) -> tuple[list[int], int]:
    """Greedy draft-simple chain after the ``uncached`` committed tokens (the last one pending):
    up to ``n_max`` tokens, each the draft's top token, stopping when its probability among the
    draft's top ``DRAFT_TOP_K`` falls below ``p_min``. Returns the chain and how many of its
    tokens the draft has decoded (all but a last one that reached ``n_max``)."""
    chain: list[int] = []
    if n_max < 1:
        return chain, 0
    logits = draft.raw_decode(uncached, start, all_logits=False)[-1, :vocab_size]
    position = start + len(uncached)
    k = min(DRAFT_TOP_K, vocab_size)
    while True:
        top = np.argpartition(logits, -k)[-k:]  # [k] ids
        weights = np.exp(logits[top] - logits[top].max())
        if weights.max() / weights.sum() < p_min:
            return chain, len(chain)
        chain.append(int(top[np.argmax(weights)]))
        if len(chain) == n_max:
            return chain, len(chain) - 1
        logits = draft.raw_decode(chain[-1:], position, all_logits=False)[-1, :vocab_size]
        position += 1
