"""The public Python API: load a draft/target pair, generate (all at once or streamed).

```python
import mcsd
pair = mcsd.load_pair()  # the default offline pair, or load_pair("org/target", "org/draft")
result = mcsd.generate(pair, "def fib(n):", mcsd.SpecConfig(tree="4,2,2", max_new_tokens=64))
print(result.text, result.stats.summary())
```
Text handling (tokenising, chat templates, stop strings, incremental detokenisation) lives here;
the token-level work is the engine's (``mcsd.engine.Engine``: requests in, steps out).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field, replace
from typing import Any

from mcsd.budget import TreeBudget, probe_budget
from mcsd.config import (
    COMPILE_CHOICES,
    DEFAULT_ATTENTION,
    DEFAULT_DTYPE,
    DEFAULT_MAX_BATCH,
    DEFAULT_RUNTIME,
    LlamaCppConfig,
    ParallelConfig,
    SpecConfig,
)
from mcsd.draft.context import RequestStore
from mcsd.draft.proposer import Drafter
from mcsd.engine import Engine, Step
from mcsd.errors import ParamError
from mcsd.models.base import Runtime, with_rows
from mcsd.models.factory import load_runtime as load_model
from mcsd.stats import Stats
from mcsd.tree import TokenTree

Prompt = str | Sequence[int] | Sequence[dict[str, str]]  # text, token ids or chat messages


@dataclass
class ModelPair:
    """A target and a draft sharing one tokenizer, ready for speculative decoding. ``draft``
    is None for a pair loaded for context drafting only (``load_pair(load_draft=False)``)."""

    target: Runtime
    draft: Runtime | None
    tokenizer: Any
    target_name: str = "target"
    draft_name: str = "draft"
    eos_token_ids: tuple[int, ...] = ()
    # (tree, batch size) -> the budget measured for it, once per pair (``tree_budget``)
    _budgets: dict[tuple[TokenTree, int], TreeBudget] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @property
    def names(self) -> str:
        """``target <- draft`` for the commands' log lines."""
        draft = "no draft (context drafting)" if self.draft is None else self.draft.name
        return f"{self.target.name} <- {draft}"

    @property
    def vocab_size(self) -> int:
        """The common vocabulary: logits beyond it (padding ids) are never sampled."""
        sizes = [self.target.vocab_size]
        if self.draft is not None:
            sizes.append(self.draft.vocab_size)
        if self.tokenizer is not None:
            sizes.append(len(self.tokenizer))
        return min(sizes)

    def stop_ids(self, config: SpecConfig) -> frozenset[int]:
        """The stop tokens of a generation: ``config``'s, else the tokenizer's EOS ids."""
        ids = config.stop_token_ids
        return frozenset(ids if ids is not None else self.eos_token_ids)

    def batch_engine(
        self,
        batch_size: int,
        *,
        budget_tree: TokenTree | None = None,
        store: RequestStore | None = None,
    ) -> Engine:
        """A ``Engine`` of ``batch_size`` rows on this pair (copies of both runtimes with
        caches of that many rows, weights shared; the pair's own runtimes at batch 1). Requests
        of every plan can be its rows side by side: static, dynamic, context and mixed trees and
        plain decoding (``mcsd.draft.proposer.Drafter``). ``budget_tree``: the requests growing
        this tree with the draft grow, each step, it, a smaller prefix of it or none (plain
        decoding), whichever the step cost of both models (measured once per pair:
        ``tree_budget``) and the acceptance seen so far say is fastest (``mcsd.budget``).
        ``store``: earlier requests the context may copy from."""
        target = with_rows(self.target, batch_size)
        draft = None if self.draft is None else with_rows(self.draft, batch_size)
        budget = None
        if budget_tree is not None:
            if draft is None:
                raise ValueError("adaptive: the tree budget needs a draft model (load_draft=True)")
            budget = self.tree_budget(budget_tree, batch_size, runtimes=(target, draft))
        proposer = Drafter(draft, vocab_size=self.vocab_size, device=target.device, store=store)
        return Engine(target, proposer, vocab_size=self.vocab_size, budget=budget)

    def tree_budget(
        self,
        tree: TokenTree,
        batch_size: int = 1,
        *,
        runtimes: tuple[Runtime, Runtime] | None = None,
    ) -> TreeBudget:
        """The adaptive budget of ``tree`` at ``batch_size`` rows (``mcsd.budget``): both
        models' step costs measured the first time it is asked for (a few forwards of
        ``runtimes``, default copies of this pair's runtimes with that many rows; they are
        emptied), then the same for every engine of this pair, so seeded generations repeat."""
        key = (tree, batch_size)
        if key not in self._budgets:
            if self.draft is None:
                raise ValueError("adaptive: the tree budget needs a draft model (load_draft=True)")
            if runtimes is None:
                runtimes = (with_rows(self.target, batch_size), with_rows(self.draft, batch_size))
            self._budgets[key] = probe_budget(tree, *runtimes)
        return self._budgets[key]

    def with_cheap_draft(
        self, *, vocab: int | None = None, int8: bool = False, texts: Iterable[str] | None = None
    ) -> ModelPair:
        """A copy whose draft is int8 and/or scores only the ``vocab`` most frequent tokens (of
        ``texts``, default the built-in corpus; ``mcsd.models.cheap``, still lossless). The
        original draft is not modified."""
        from mcsd.models.cheap import cheap_draft

        if vocab is None and not int8:
            return self
        if self.draft is None:
            raise ValueError("this pair has no draft model (loaded with load_draft=False)")
        draft = cheap_draft(self.draft, self.tokenizer, vocab=vocab, int8=int8, texts=texts)
        notes = [*([f"top {vocab} tokens"] if vocab else []), *(["int8"] if int8 else [])]
        return replace(self, draft=draft, draft_name=f"{self.draft_name} ({', '.join(notes)})")


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


def load_pair(
    target: str | None = None,
    draft: str | None = None,
    *,
    runtime: str = DEFAULT_RUNTIME,
    dtype: Any = DEFAULT_DTYPE,
    device: Any = None,
    attn_implementation: str = DEFAULT_ATTENTION,
    progress: bool = True,
    compile: str = "none",
    llamacpp: LlamaCppConfig | None = None,
    load_draft: bool = True,
    tp: int = ParallelConfig.size,
    check_ranks: bool = ParallelConfig.check_ranks,
) -> ModelPair:
    """Load a target and a draft (defaults: the offline Qwen2.5-Coder 1.5B / 0.5B pair) on
    one runtime (``load_model``, i.e. ``mcsd.models.factory.load_runtime``; ``auto`` is
    resolved once, from the target, and logged). ``compile``: which of them ``torch.compile``
    also fuses on a compiling runtime, one of ``COMPILE_CHOICES`` (``"draft"`` pays most: a draft
    forward is mostly small kernels). ``llamacpp``: the llama.cpp contexts' settings (each model
    gets its own context). ``tp``: the target tensor-parallel over that many processes on the
    fast runtime, the draft replicated on every rank (each process calls ``load_pair``: under
    ``mcsd.models.fast.parallel.launch`` or torchrun); ``check_ranks``: check every step that
    the ranks agree (``ParallelConfig``). ``load_draft=False``: the target alone, for
    ``proposer="context"`` (candidates copied from the context, no draft forward)."""
    target, draft = _pair_names(target, draft)
    parallel = ParallelConfig(size=tp, check_ranks=check_ranks)
    kind = _pair_runtime(target, runtime, parallel, device=device, dtype=dtype, compile=compile)
    options: dict[str, Any] = dict(
        runtime=kind,  # auto resolved once, for the target: both models on one runtime
        dtype=dtype,
        attn_implementation=attn_implementation,
        progress=progress,
        llamacpp=llamacpp,
    )
    target_model, tokenizer, eos = load_model(
        target, device=device, compile=compile == "all", parallel=parallel, **options
    )
    if not load_draft:
        return ModelPair(
            target=target_model,
            draft=None,
            tokenizer=tokenizer,
            target_name=target,
            draft_name="none",
            eos_token_ids=eos,
        )
    draft_model, draft_tokenizer, _ = load_model(
        draft,
        device=_draft_device(device, parallel),
        compile=compile in ("draft", "all"),
        **options,
    )
    check_same_tokenizer(tokenizer, draft_tokenizer)
    return ModelPair(
        target=target_model,
        draft=draft_model,
        tokenizer=tokenizer,
        target_name=target,
        draft_name=draft,
        eos_token_ids=eos,
    )


def _pair_names(target: str | None, draft: str | None) -> tuple[str, str]:
    """The names to load, None meaning the default pair's."""
    from mcsd.sources import DEFAULT_DRAFT, DEFAULT_TARGET

    for role, name in (("target", target), ("draft", draft)):
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise ParamError(
                f"{role} must be a model name, directory or HF id, got {name!r}",
                param=role,
                allowed="a model name, directory or HF id",
            )
    return target or DEFAULT_TARGET, draft or DEFAULT_DRAFT


def _pair_runtime(
    target: str, runtime: str, parallel: ParallelConfig, *, device: Any, dtype: Any, compile: str
) -> str:
    """The runtime both models load on, ``auto`` resolved once from the target and logged.

    Every option is refused here, before the target loads, by the factory's own checks (those
    ``load_runtime`` runs for each model), so a bad draft option never costs a target load."""
    from mcsd.models.factory import (
        check_options,
        check_parallel,
        log_auto_choice,
        parse_device,
        runtime_kind,
    )

    if compile not in COMPILE_CHOICES:
        raise ParamError(
            f"compile must be one of {', '.join(COMPILE_CHOICES)}, got {compile!r}",
            param="compile",
            allowed=", ".join(COMPILE_CHOICES),
        )
    torch_device = parse_device(device)
    parallel = check_parallel(parallel, runtime)
    kind = runtime_kind("fast" if parallel.size > 1 else runtime, torch_device, target, dtype)
    check_options(kind, compile=compile != "none", max_length=None, dtype=dtype)
    if runtime == "auto" and parallel.size == 1:
        log_auto_choice(kind, torch_device)
    return kind.name


def _draft_device(device: Any, parallel: ParallelConfig) -> Any:
    """Where the draft loads: the target's device, or this rank's under tensor parallelism (the
    draft is replicated on every rank)."""
    if parallel.size == 1:
        return device
    import torch.distributed as dist

    from mcsd.models.factory import parse_device
    from mcsd.models.fast.parallel import rank_device

    return rank_device(parse_device(device), dist.get_rank())


def check_same_tokenizer(target_tokenizer: Any, draft_tokenizer: Any) -> None:
    """Speculative decoding needs one token space: refuse pairs whose tokenizers differ."""
    if target_tokenizer.get_vocab() != draft_tokenizer.get_vocab():
        raise ValueError(
            f"draft and target use different tokenizers ({len(draft_tokenizer)} vs "
            f"{len(target_tokenizer)} tokens, or different ids): pick a draft from the target's "
            "model family"
        )


PROMPT_FORMS = "text, a list of token ids, or a list of chat messages ({'role', 'content'})"


def encode_prompt(
    tokenizer: Any, prompt: Prompt, *, chat: bool = False, vocab_size: int | None = None
) -> list[int]:
    """Token ids for a text prompt (optionally chat-templated), chat messages, or ids (checked
    against ``vocab_size`` when given)."""
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompt must not be empty")
        if chat:
            prompt = [{"role": "user", "content": prompt}]
        else:
            return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if not isinstance(prompt, Sequence) or isinstance(prompt, bytes | bytearray):
        raise ValueError(f"prompt must be {PROMPT_FORMS}; got {type(prompt).__name__}")
    prompt = list(prompt)
    if not prompt:
        raise ValueError("prompt must not be empty")
    if all(isinstance(m, dict) for m in prompt):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("this tokenizer has no chat template: pass plain text instead")
        for m in prompt:
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(
                    f"chat messages need string 'role' and 'content' fields, got {m!r}"
                )
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    if all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
        ids = list(prompt)  # type: ignore[arg-type]
        if vocab_size is not None and (min(ids) < 0 or max(ids) >= vocab_size):
            bad = next(i for i in ids if not 0 <= i < vocab_size)
            raise ValueError(f"prompt token ids must be in [0, {vocab_size}), got {bad}")
        return ids
    raise ValueError(f"prompt must be {PROMPT_FORMS}")


def _check_call(pair: object, config: object) -> SpecConfig:
    if not isinstance(pair, ModelPair):
        raise ValueError(
            f"pair must be a ModelPair (from mcsd.load_pair), got {type(pair).__name__}"
        )
    if config is None:
        return SpecConfig()
    if not isinstance(config, SpecConfig):
        raise ValueError(f"config must be a SpecConfig, got {type(config).__name__}")
    return config


def adaptive_tree(config: SpecConfig) -> TokenTree:
    """The tree an adaptive budget shrinks: ``config``'s static draft-model tree (``ValueError``
    naming ``adaptive`` for any other)."""
    if not config.speculative or config.dynamic is not None or config.proposer != "model":
        raise ParamError(
            f"adaptive: the tree budget shrinks a static draft tree; tree "
            f"{config.describe_tree()} with proposer {config.proposer!r} has none",
            param="adaptive",
        )
    return config.token_tree()


def is_prompt_list(prompt: object) -> bool:
    """Several prompts (a list of texts, of token-id lists or of chat conversations), not one
    prompt (a text, token ids or chat messages)."""
    return (
        isinstance(prompt, list | tuple)
        and bool(prompt)
        and all(
            isinstance(p, str) or (isinstance(p, list | tuple) and not isinstance(p, dict))
            for p in prompt
        )
    )


def stream(
    pair: ModelPair,
    prompt: Prompt | Sequence[Prompt],
    config: SpecConfig | None = None,
    *,
    chat: bool = False,
    batch_size: int | None = None,
    adaptive: bool = False,
    store: RequestStore | None = None,
) -> Iterator[tuple[Chunk, Stats]] | Iterator[tuple[int, Chunk, Stats]]:
    """Generate step by step, yielding each step's tokens and new text with the running stats.

    One prompt yields ``(chunk, stats)``; a list of prompts yields ``(index, chunk, stats)``,
    the prompts decoded as rows of one batch (``batch_size`` rows, default
    ``min(len(prompts), DEFAULT_MAX_BATCH)``; a prompt joins as soon as a row is free), each
    row exactly as it would run alone (its own seeded generator: ``config.seed`` for every
    prompt). ``adaptive``: each step's tree is picked from ``config``'s tree, its smaller
    prefixes and plain decoding by the measured step cost (once per pair) and the acceptance
    seen so far, one prompt or several (``ModelPair.batch_engine``, ``mcsd.budget``).
    ``store``: earlier requests the context proposer may copy from (``proposer`` "context"
    or "mixed"); the caller adds finished requests to it."""
    if is_prompt_list(prompt):
        return _stream_rows(
            pair,
            list(prompt),
            config,
            chat=chat,
            batch_size=batch_size,
            adaptive=adaptive,
            store=store,
        )
    return _one_row(_stream_rows(pair, [prompt], config, chat=chat, adaptive=adaptive, store=store))


def _one_row(rows: Iterator[tuple[int, Chunk, Stats]]) -> Iterator[tuple[Chunk, Stats]]:
    with closing(rows):  # closing this generator frees the row at once
        for _, chunk, stats in rows:
            yield chunk, stats


def _stream_rows(
    pair: ModelPair,
    prompts: list,
    config: SpecConfig | None,
    *,
    chat: bool,
    batch_size: int | None = None,
    adaptive: bool = False,
    store: RequestStore | None = None,
) -> Iterator[tuple[int, Chunk, Stats]]:
    config = _check_call(pair, config)
    if batch_size is None:
        batch_size = min(len(prompts), DEFAULT_MAX_BATCH)
    ids = [encode_prompt(pair.tokenizer, p, chat=chat, vocab_size=pair.vocab_size) for p in prompts]
    budget_tree = adaptive_tree(config) if adaptive else None
    engine = pair.batch_engine(batch_size, budget_tree=budget_tree, store=store)
    stop = pair.stop_ids(config)
    texts = {
        engine.add_request(prompt_ids, config, stop_token_ids=stop): TextRow(
            index, pair.tokenizer, config.stop_strings
        )
        for index, prompt_ids in enumerate(ids)
    }  # every request is checked before any runs
    try:
        while engine.has_unfinished():
            for request, step in engine.step():
                text = texts[request]
                chunk = text.feed(step)
                yield text.index, chunk, text.stats
                if chunk.finish_reason is not None:
                    engine.abort(request)  # a stop string may end it before the engine does
    finally:
        for request in texts:
            engine.abort(request)


class TextRow:
    """One generation's text: decoding, stop strings and held-back text, step by step."""

    def __init__(self, index: int, tokenizer: Any, stop_strings: tuple[str, ...]) -> None:
        self.index = index
        self.tokenizer = tokenizer
        self.stop_strings = stop_strings
        self.hold = max((len(s) for s in stop_strings), default=1) - 1
        self.tokens: list[int] = []
        self.emitted_text = ""
        self.stats = Stats()

    def feed(self, step: Step) -> Chunk:
        """The chunk of ``step`` (its tokens cut after a stop string)."""
        tokenizer = self.tokenizer
        step_tokens = list(step.tokens)
        finish = step.finish_reason
        self.tokens += step_tokens
        tokens = self.tokens
        text = tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer is not None else ""
        found = _find_stop(text, self.stop_strings, max(0, len(self.emitted_text) - self.hold))
        if found is not None:
            step_tokens, self.tokens = _tokens_until(tokenizer, tokens, step_tokens, found[1])
            text, finish = text[: found[0]], "stop"
        elif finish is None:
            # Hold back an incomplete UTF-8 character and a possible partial stop string.
            safe = len(text) - (self.hold if self.stop_strings else 0)
            while safe > 0 and text[safe - 1] == "\ufffd":
                safe -= 1
            text = text[: max(safe, len(self.emitted_text))]
        # Count only the tokens returned (a stop string can end the text mid-step).
        self.stats.add(replace(step.record, emitted=len(step_tokens)))
        delta = text[len(self.emitted_text) :]
        self.emitted_text = text
        return Chunk(delta, tuple(step_tokens), finish)


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
    pair: ModelPair,
    prompt: Prompt | Sequence[Prompt],
    config: SpecConfig | None = None,
    *,
    chat: bool = False,
    batch_size: int | None = None,
    adaptive: bool = False,
    store: RequestStore | None = None,
) -> GenerationResult | list[GenerationResult]:
    """Generate a completion of ``prompt`` with speculative decoding; see ``stream``. A list of
    prompts returns one result per prompt, in order (decoded as rows of one batch; each
    result's ``wall_time`` is the whole batch's)."""
    started = time.perf_counter()
    several = is_prompt_list(prompt)
    prompts = list(prompt) if several else [prompt]
    config = _check_call(pair, config)
    ids = [encode_prompt(pair.tokenizer, p, chat=chat, vocab_size=pair.vocab_size) for p in prompts]
    results = [GenerationResult("", [], prompt_ids, "length") for prompt_ids in ids]
    rows = _stream_rows(
        pair, ids, config, chat=False, batch_size=batch_size, adaptive=adaptive, store=store
    )
    for index, chunk, stats in rows:
        result = results[index]
        result.text += chunk.text
        result.token_ids += chunk.token_ids
        result.finish_reason = chunk.finish_reason or result.finish_reason
        result.stats = stats
    for result in results:
        result.wall_time = time.perf_counter() - started
    return results if several else results[0]
