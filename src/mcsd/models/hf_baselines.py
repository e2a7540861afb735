"""transformers' own decoding loops, run on mcsd runtimes: the baselines of ``mcsd bench``.

- ``generate``  the target alone through ``generate`` (dynamic cache);
- ``static``    the target alone through ``generate`` with a transformers ``StaticCache`` (one per
                model, ``HF_STATIC_LENGTH`` slots, reset per prompt), which transformers compiles
                on GPUs: its fastest decoding of one model;
- ``assisted``  assisted generation with the draft (``num_assistant_tokens`` N, or its default
                20 with the confidence threshold 0.4);
- ``pld``       prompt lookup decoding, no draft model: ``generate(prompt_lookup_num_tokens=N)``
                copies a chain of up to N tokens that followed the last n-gram earlier in the
                sequence (``PROMPT_LOOKUP_TOKENS`` unless given).

transformers' loops are observed, not modified: a forward pre-hook on the target records the
position of the first token of every target forward, from which the tokens committed per
forward (Spec-Bench's ``accept_lengths``) follow. Only the transformers runtimes (``hf``,
``hf-static``) carry a transformers model; any other runtime is refused with a clear error.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch

from mcsd.config import HF_STATIC_LENGTH, SamplingConfig
from mcsd.models.base import Runtime
from mcsd.models.hf import cache_keyword
from mcsd.stats import StepRecord

KINDS = ("generate", "static", "assisted", "pld")
PROMPT_LOOKUP_TOKENS = 10  # transformers' documented example value of prompt_lookup_num_tokens


def transformers_model(runtime: Runtime, method: str) -> Any:
    """The transformers model a runtime runs; ``ValueError`` for any other runtime."""
    model = getattr(runtime, "hf_model", None)
    if model is None:
        raise ValueError(
            f"method {method} runs transformers' own loop: it needs a transformers runtime (hf, "
            f"hf-static), not {runtime.name}"
        )
    return model


class _ForwardLog:
    """Forward pre-hook on the target: the sequence position of each forward's first token and
    the number of tokens it ran."""

    def __init__(self, model: Any) -> None:
        self.starts: list[int] = []
        self.sizes: list[int] = []
        self._handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        positions = kwargs.get("position_ids")
        if positions is not None:
            start = int(positions[0, 0])
        else:  # no explicit positions: the cache holds everything before this forward
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            start = int(cache.get_seq_length()) if cache is not None else 0
        self.starts.append(start)
        self.sizes.append(int(ids.shape[-1]) if ids is not None else 1)

    def remove(self) -> None:
        self._handle.remove()

    def records(self, prompt_length: int, new_tokens: int) -> list[StepRecord]:
        """One ``StepRecord`` per target forward.

        Forward k starts at the pending token (position s_k, already committed) and commits the
        tokens up to the next forward's pending token: s_{k+1} - s_k of them; the first forward
        runs the prompt (s_0 = 0) and commits s_1 - P + 1; the last commits the rest."""
        starts, total = self.starts, prompt_length + new_tokens
        if not starts:
            return []
        records = []
        for k, (start, size) in enumerate(zip(starts, self.sizes, strict=True)):
            begin = prompt_length - 1 if k == 0 else start  # position of the pending token
            end = starts[k + 1] if k + 1 < len(starts) else total - 1
            emitted = max(end - begin, 0)
            candidates = size - (prompt_length - start if k == 0 else 1)  # draft tokens verified
            accepted = min(max(emitted - 1, 0), candidates)
            attempted = accepted + (1 if accepted < candidates else 0)
            records.append(StepRecord(accepted, emitted, attempted, (), candidates, 0.0, 0.0))
        return records


def hf_generation_config(
    sampling: SamplingConfig, stop: frozenset[int], max_new_tokens: int
) -> Any:
    """A ``GenerationConfig`` that samples like ``sampling``: every warping value explicit, so
    nothing from the model's own generation_config (Qwen ships top_k=20, a repetition penalty)
    changes the distribution."""
    from transformers import GenerationConfig

    eos = sorted(stop)
    kwargs: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        eos_token_id=eos or None,
        pad_token_id=eos[0] if eos else None,
        repetition_penalty=1.0,
    )
    if sampling.greedy:
        kwargs.update(do_sample=False)
    else:
        kwargs.update(
            do_sample=True,
            temperature=sampling.temperature,
            top_k=sampling.top_k,  # 0 disables it in transformers too
            top_p=sampling.top_p,
        )
    return GenerationConfig(**kwargs)


@torch.inference_mode()
def run(
    kind: str,
    target: Runtime,
    draft: Runtime | None,
    prompt_ids: list[int],
    sampling: SamplingConfig,
    stop: frozenset[int],
    max_new_tokens: int,
    *,
    seed: int | None = None,
    assistant_tokens: int | None = None,
    lookup_tokens: int | None = None,
) -> tuple[list[int], float, list[StepRecord]]:
    """One answer with transformers' loop ``kind`` (``KINDS``): the new tokens, the wall time
    and one ``StepRecord`` per target forward. ``lookup_tokens``: ``pld``'s
    ``prompt_lookup_num_tokens``."""
    name = f"hf-{'ar' if kind == 'generate' else kind}"
    model = transformers_model(target, name)
    config = hf_generation_config(sampling, stop, max_new_tokens)
    kwargs: dict[str, Any] = {}
    helper, saved = None, None
    if kind == "assisted":
        assert draft is not None
        helper = transformers_model(draft, name)
        # transformers 5.24 ignores num_assistant_tokens passed to generate(): it reads the
        # assistant's generation_config (DESIGN 8). Set it there, restore it afterwards.
        saved = helper.generation_config
        helper.generation_config = copy.deepcopy(saved)
        if assistant_tokens is not None:
            helper.generation_config.num_assistant_tokens = assistant_tokens
            helper.generation_config.num_assistant_tokens_schedule = "constant"
        kwargs["assistant_model"] = helper
    if kind == "pld":  # on the config: generate() warns about it beside a generation_config
        config.prompt_lookup_num_tokens = lookup_tokens or PROMPT_LOOKUP_TOKENS
    if seed is not None:
        torch.manual_seed(seed)  # transformers samples from the global generator
    ids = torch.tensor([prompt_ids], device=target.device)
    if kind == "static":
        return _run_static(model, ids, config)
    log = _ForwardLog(model)
    try:
        started = time.perf_counter()
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), generation_config=config, **kwargs
        )
        wall = time.perf_counter() - started
    finally:
        log.remove()
        if helper is not None:
            helper.generation_config = saved
    tokens = [int(t) for t in out[0, len(prompt_ids) :]]
    return tokens, wall, log.records(len(prompt_ids), len(tokens))


def _static_cache(model: Any, length: int) -> Any:
    """The model's transformers ``StaticCache`` (made once, so its compiled forward is reused),
    emptied for a new prompt."""
    from transformers import StaticCache

    cache = getattr(model, "_mcsd_static_cache", None)
    if cache is None or getattr(cache, "max_cache_len", 0) < length:
        size = max(HF_STATIC_LENGTH, length)
        cache = StaticCache(config=model.config, max_cache_len=size)
        model._mcsd_static_cache = cache
    else:
        cache.reset()
    return cache


def _run_static(
    model: Any, ids: torch.Tensor, config: Any
) -> tuple[list[int], float, list[StepRecord]]:
    """``hf-static``: no forward hook (it would break transformers' compiled forward); the target
    runs one forward per token, so each decoding step commits one token."""
    cache = {cache_keyword(model): _static_cache(model, ids.shape[-1] + config.max_new_tokens)}
    started = time.perf_counter()
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), generation_config=config, **cache
    )
    tokens = [int(t) for t in out[0, ids.shape[-1] :]]
    wall = time.perf_counter() - started
    records = [StepRecord(0, 1, 0, (), 0, 0.0, 0.0) for _ in tokens]
    return tokens, wall, records
