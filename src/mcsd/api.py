"""The public Python API: load a draft/target pair, generate (all at once or streamed).

```python
import mcsd
pair = mcsd.load_pair()  # the default offline pair, or load_pair("org/target", "org/draft")
result = mcsd.generate(pair, "def fib(n):", mcsd.SpecConfig(tree="4,2,2", max_new_tokens=64))
print(result.text, result.stats.summary())
```
Text handling (tokenising, chat templates, stop strings, incremental detokenisation) lives here;
the token-level loop is ``mcsd.engine.speculative_decode``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from mcsd.config import COMPILE_CHOICES, SpecConfig
from mcsd.engine import speculative_decode
from mcsd.models.base import SpecModel
from mcsd.stats import Stats

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
Prompt = str | Sequence[int] | Sequence[dict[str, str]]  # text, token ids or chat messages


@dataclass
class ModelPair:
    """A target and a draft sharing one tokenizer, ready for speculative decoding."""

    target: SpecModel
    draft: SpecModel
    tokenizer: Any
    target_name: str = "target"
    draft_name: str = "draft"
    eos_token_ids: tuple[int, ...] = ()

    @property
    def vocab_size(self) -> int:
        """The common vocabulary: logits beyond it (padding ids) are never sampled."""
        sizes = [self.target.vocab_size, self.draft.vocab_size]
        if self.tokenizer is not None:
            sizes.append(len(self.tokenizer))
        return min(sizes)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # generated tokens (after the prompt)
    prompt_ids: list[int]
    finish_reason: str  # "stop" or "length"
    stats: Stats = field(default_factory=Stats)
    wall_time: float = 0.0


@dataclass(frozen=True)
class Chunk:
    """One streamed piece: the tokens and text committed by one speculative step."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bfloat16 on GPUs and on CPUs with native bf16 (AVX-512 BF16), else float32."""
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if torch.cpu._is_avx512_bf16_supported() else torch.float32


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device | str) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(
    name: str,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    attn_implementation: str = "sdpa",
    progress: bool = True,
    static_cache: bool = False,
    compile: bool = False,
    max_length: int | None = None,
) -> tuple[SpecModel, Any, tuple[int, ...]]:
    """Load one causal LM by known name, local directory or Hugging Face id.

    ``static_cache=True`` wraps it in ``StaticHFModel`` (mcsd's static KV cache of ``max_length``
    positions, default min(model limit, 4096); CUDA graphs on GPUs; ``compile=True`` also runs
    ``torch.compile`` on each captured shape, ~30 s per shape) instead of the dynamic-cache
    ``HFModel``. Returns the adapted model, its tokenizer and its EOS token ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mcsd.models.hf import HFModel
    from mcsd.sources import resolve

    if compile and not static_cache:
        raise ValueError("compile=True needs static_cache=True (it compiles the static forward)")
    if max_length is not None and not static_cache:
        raise ValueError("max_length sizes the static cache: it needs static_cache=True")
    device = device or default_device()
    torch_dtype = parse_dtype(dtype, device)
    path = resolve(name, progress=progress)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch_dtype, attn_implementation=attn_implementation
    ).to(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if static_cache:
        from mcsd.models.static import StaticHFModel

        adapted: SpecModel = StaticHFModel(model, max_length=max_length, compile=compile)
    else:
        adapted = HFModel(model)
    return adapted, tokenizer, _eos_ids(model, tokenizer)


def load_pair(
    target: str | None = None,
    draft: str | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    attn_implementation: str = "sdpa",
    progress: bool = True,
    static_cache: bool = False,
    compile: str = "none",
) -> ModelPair:
    """Load a target and a draft (defaults: the offline Qwen2.5-Coder 1.5B / 0.5B pair).

    ``static_cache=True``: both models on mcsd's static KV cache with CUDA graphs on GPUs (the
    fast path; see ``load_model``). ``compile``: which of them ``torch.compile`` also fuses,
    one of ``COMPILE_CHOICES`` (``"draft"`` pays most: a draft forward is mostly small kernels).
    """
    from mcsd.sources import DEFAULT_DRAFT, DEFAULT_TARGET

    if compile not in COMPILE_CHOICES:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_CHOICES)}, got {compile!r}")
    if compile != "none" and not static_cache:
        raise ValueError(f"compile={compile!r} needs static_cache=True")
    target = target or DEFAULT_TARGET
    draft = draft or DEFAULT_DRAFT
    kwargs: dict[str, Any] = dict(
        dtype=dtype,
        device=device,
        attn_implementation=attn_implementation,
        progress=progress,
        static_cache=static_cache,
    )
    target_model, tokenizer, eos = load_model(target, compile=compile == "all", **kwargs)
    draft_model, draft_tokenizer, _ = load_model(
        draft, compile=compile in ("draft", "all"), **kwargs
    )
    check_same_tokenizer(tokenizer, draft_tokenizer)
    return ModelPair(target_model, draft_model, tokenizer, target, draft, eos)


def check_same_tokenizer(target_tokenizer: Any, draft_tokenizer: Any) -> None:
    """Speculative decoding needs one token space: refuse pairs whose tokenizers differ."""
    if target_tokenizer.get_vocab() != draft_tokenizer.get_vocab():
        raise ValueError(
            f"draft and target use different tokenizers ({len(draft_tokenizer)} vs "
            f"{len(target_tokenizer)} tokens, or different ids): pick a draft from the target's "
            "model family"
        )


def _eos_ids(model: Any, tokenizer: Any) -> tuple[int, ...]:
    ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured, getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.append(value)
        elif isinstance(value, list | tuple):
            ids.extend(int(v) for v in value)
    return tuple(dict.fromkeys(ids))


def encode_prompt(tokenizer: Any, prompt: Prompt, *, chat: bool = False) -> list[int]:
    """Token ids for a text prompt (optionally chat-templated), chat messages, or ids."""
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompt must not be empty")
        if chat:
            prompt = [{"role": "user", "content": prompt}]
        else:
            return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    prompt = list(prompt)
    if not prompt:
        raise ValueError("prompt must not be empty")
    if all(isinstance(m, dict) for m in prompt):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("this tokenizer has no chat template: pass plain text instead")
        for m in prompt:
            if "role" not in m or "content" not in m:
                raise ValueError(f"chat messages need 'role' and 'content', got {m!r}")
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    if all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
        return list(prompt)  # type: ignore[arg-type]
    raise ValueError("prompt must be text, a list of token ids, or a list of chat messages")


def stream(
    pair: ModelPair, prompt: Prompt, config: SpecConfig | None = None, *, chat: bool = False
) -> Iterator[tuple[Chunk, Stats]]:
    """Generate step by step, yielding each step's tokens and new text with the running stats."""
    config = config or SpecConfig()
    tokenizer = pair.tokenizer
    prompt_ids = encode_prompt(tokenizer, prompt, chat=chat)
    stop_ids = frozenset(
        config.stop_token_ids if config.stop_token_ids is not None else pair.eos_token_ids
    )
    stats = Stats()
    tokens: list[int] = []
    emitted_text = ""
    hold = max((len(s) for s in config.stop_strings), default=1) - 1
    for step in speculative_decode(
        pair.target,
        pair.draft,
        prompt_ids,
        config,
        vocab_size=pair.vocab_size,
        stop_token_ids=stop_ids,
    ):
        step_tokens = list(step.tokens)
        finish = step.finish_reason
        tokens += step_tokens
        text = tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer is not None else ""
        found = _find_stop(text, config.stop_strings, max(0, len(emitted_text) - hold))
        if found is not None:
            step_tokens, tokens = _tokens_until(tokenizer, tokens, step_tokens, found[1])
            text, finish = text[: found[0]], "stop"
        elif finish is None:
            # Hold back an incomplete UTF-8 character and a possible partial stop string.
            safe = len(text) - (hold if config.stop_strings else 0)
            while safe > 0 and text[safe - 1] == "\ufffd":
                safe -= 1
            text = text[: max(safe, len(emitted_text))]
        # Count only the tokens returned (a stop string can end the text mid-step).
        stats.add(replace(step.record, emitted=len(step_tokens)))
        delta = text[len(emitted_text) :]
        emitted_text = text
        yield Chunk(delta, tuple(step_tokens), finish), stats
        if finish is not None:
            return


def _find_stop(text: str, stops: Sequence[str], start: int) -> tuple[int, int] | None:
    """(start, end) of the earliest stop string in ``text[start:]``, or None."""
    hits = [(i, i + len(s)) for s in stops if (i := text.find(s, start)) >= 0]
    return min(hits) if hits else None


def _tokens_until(
    tokenizer: Any, tokens: list[int], step_tokens: list[int], end: int
) -> tuple[list[int], list[int]]:
    """Drop the step's tokens after the one that completes the stop string ending at ``end``."""
    before = len(tokens) - len(step_tokens)
    for keep in range(1, len(step_tokens) + 1):
        candidate = tokens[: before + keep]
        if len(tokenizer.decode(candidate, skip_special_tokens=True)) >= end:
            return step_tokens[:keep], candidate
    return step_tokens, tokens


def generate(
    pair: ModelPair, prompt: Prompt, config: SpecConfig | None = None, *, chat: bool = False
) -> GenerationResult:
    """Generate a completion of ``prompt`` with speculative decoding; see ``stream``."""
    started = time.perf_counter()
    prompt_ids = encode_prompt(pair.tokenizer, prompt, chat=chat)
    text, tokens, finish, stats = "", [], "length", Stats()
    for chunk, running in stream(pair, prompt_ids, config):
        text += chunk.text
        tokens += chunk.token_ids
        finish = chunk.finish_reason or finish
        stats = running
    return GenerationResult(text, tokens, prompt_ids, finish, stats, time.perf_counter() - started)
