"""What ``mcsd bench`` compares: mcsd's trees and the baselines a user would otherwise run.

Method names (``parse_method``):

- ``hf-ar``            the target alone through transformers ``generate`` (the speed reference);
- ``hf-assisted``      transformers assisted generation with the same draft, its default settings
                       (``num_assistant_tokens=20``, confidence threshold 0.4);
- ``hf-assisted:N``    the same with ``num_assistant_tokens=N``;
- ``hf-static``        the target alone through ``generate`` with a transformers ``StaticCache``
                       (one per model, ``HF_STATIC_LENGTH`` slots, reset per prompt), which
                       transformers compiles on GPUs: its fastest decoding of one model;
- ``ar``               mcsd's target alone (``autoregressive_decode``: same adapter, no draft);
- ``sps:G``            an mcsd chain of depth G (rule ``sps`` when sampling, ``greedy`` when not);
- ``tree:K[:RULE]``    an mcsd k-config tree such as ``tree:4,2,2:mcss-wor`` (default rule: the
                       natural one, see ``SpecConfig``); K may also be a JSON list of sibling-rank
                       paths, ``tree:[[0],[1],[0,0]]`` (what ``mcsd bench --sweep`` prints).

An mcsd method may end in modifiers that make its draft cheaper (``mcsd.bench.cheap_draft``;
still lossless): ``+int8`` (int8 weights, CPU) and ``+fr=K`` (the draft scores only the K most
frequent tokens, FR-Spec; ``K`` also as ``32k``), e.g. ``sps:5+int8`` or ``tree:2,1,1+int8+fr=32k``.

Every method turns prompt token ids into a ``Generation``: the new tokens, the wall time and one
``StepRecord`` per target forward, so one set of metrics (``mcsd.stats.Stats``) covers them all.
transformers' own loops are observed, not modified: a forward pre-hook on the target records the
position of the first token of every target forward, from which the tokens committed per forward
(Spec-Bench's ``accept_lengths``) follow.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from mcsd.api import ModelPair
from mcsd.config import RULES, SpecConfig
from mcsd.engine import autoregressive_decode, speculative_decode
from mcsd.models.hf import cache_keyword
from mcsd.stats import StepRecord

BASELINES = ("hf-ar", "hf-static", "hf-assisted", "ar")
MCSD_KINDS = ("sps", "tree")
HF_KINDS = ("hf-ar", "hf-static", "hf-assisted")
HF_STATIC_LENGTH = 4096  # hf-static's cache: one fixed shape, so one compilation for all prompts


@dataclass(frozen=True)
class Method:
    """One decoding method of a benchmark run."""

    name: str  # as written on the command line, e.g. "tree:4,2,2:mcss-wor"
    kind: str  # "hf-ar", "hf-static", "hf-assisted", "ar", "sps" or "tree"
    tree: str | None = None  # k-config ("1,1,1,1") or JSON rank paths ("[[0],[1],[0,0]]")
    rule: str | None = None  # verification rule; None = SpecConfig's natural choice
    assistant_tokens: int | None = None  # hf-assisted's num_assistant_tokens; None = its default
    draft_vocab: int | None = None  # mcsd methods: the draft scores only this many tokens
    draft_int8: bool = False  # mcsd methods: the draft's linear layers in int8

    @property
    def is_mcsd(self) -> bool:
        return self.kind in MCSD_KINDS

    def spec(self, base: SpecConfig) -> SpecConfig:
        """``base`` (sampling, lengths, seed) with this method's tree and rule."""
        if not self.is_mcsd:
            return replace(base, tree=(1,), rule=None)
        return replace(base, tree=parse_tree(self.tree or ""), rule=self.rule)

    def describe(self, base: SpecConfig) -> str:
        if not self.is_mcsd:
            return self.name
        spec = self.spec(base)
        tree = spec.token_tree()
        return f"{self.name} ({tree.num_nodes} nodes, {spec.resolved_rule()})"


def parse_method(text: str) -> Method:
    """A ``Method`` from its command-line name; ``ValueError`` naming the accepted forms."""
    name = text.strip()
    body, *modifiers = name.split("+")
    if modifiers:
        method = replace(parse_method(body), name=name)
        for modifier in modifiers:
            key, _, value = modifier.partition("=")
            if not method.is_mcsd or key not in ("fr", "int8") or (key == "int8" and value):
                raise ValueError(
                    f"method {name!r}: modifiers are +int8 and +fr=K, on sps/tree methods"
                )
            if key == "int8":
                method = replace(method, draft_int8=True)
            else:
                method = replace(method, draft_vocab=parse_count(value, name))
        return method
    kind, _, rest = name.partition(":")
    if kind in ("hf-ar", "hf-static", "ar") and not rest:
        return Method(name, kind)
    if kind == "hf-assisted":
        if not rest:
            return Method(name, kind)
        if rest.isdigit() and int(rest) >= 1:
            return Method(name, kind, assistant_tokens=int(rest))
        raise ValueError(f"method {name!r}: hf-assisted:N needs an integer N >= 1")
    if kind == "sps":
        if rest.isdigit() and 1 <= int(rest) <= 64:
            return Method(name, kind, tree=",".join(["1"] * int(rest)))
        raise ValueError(f"method {name!r}: sps:G needs a depth G in 1..64, e.g. sps:4")
    if kind == "tree" and rest:
        shape, _, rule = rest.partition(":")
        if rule and rule not in RULES:
            raise ValueError(f"method {name!r}: rule must be one of {', '.join(RULES)}")
        SpecConfig(tree=parse_tree(shape), rule=None)  # a bad shape fails here, clearly
        return Method(name, kind, tree=shape, rule=rule or None)
    raise ValueError(
        f"unknown method {name!r}; use hf-ar, hf-static, hf-assisted, hf-assisted:N, ar, sps:G, "
        "tree:K-CONFIG or tree:K-CONFIG:RULE (e.g. tree:4,2,2:mcss-wor)"
    )


def parse_count(text: str, name: str) -> int:
    """``32768`` or ``32k`` (= 32768)."""
    scale = 1024 if text.lower().endswith("k") else 1
    digits = text[:-1] if scale > 1 else text
    if not digits.isdigit() or int(digits) < 1:
        raise ValueError(f"method {name!r}: +fr=K needs a token count like 32768 or 32k")
    return int(digits) * scale


def parse_tree(shape: str) -> str | list:
    """A k-config string as is, or the rank paths of a JSON list."""
    if not shape.lstrip().startswith("["):
        return shape
    try:
        paths = json.loads(shape)
    except json.JSONDecodeError as error:
        raise ValueError(f"tree {shape!r} is not a JSON list of rank paths: {error.msg}") from None
    if not isinstance(paths, list) or not all(isinstance(p, list) for p in paths):
        raise ValueError(f"tree {shape!r} must be a list of paths like [[0],[1],[0,0]]")
    return paths


@dataclass
class Generation:
    """One answer produced by one method."""

    tokens: list[int]  # new tokens (after the prompt)
    wall_time: float  # seconds, prefill included
    records: list[StepRecord]  # one per target forward while decoding
    finish_reason: str


def run_method(
    method: Method, pair: ModelPair, prompt_ids: list[int], base: SpecConfig
) -> Generation:
    """Generate one answer to ``prompt_ids`` with ``method``; sampling, length and seed from
    ``base`` (its tree and rule are ignored except for mcsd methods)."""
    stop = frozenset(base.stop_token_ids if base.stop_token_ids is not None else pair.eos_token_ids)
    if method.kind in HF_KINDS:
        return _run_hf(method, pair, prompt_ids, base, stop)
    tokens: list[int] = []
    records: list[StepRecord] = []
    finish = "length"
    started = time.perf_counter()
    if method.kind == "ar":
        steps = autoregressive_decode(
            pair.target,
            prompt_ids,
            base.target,
            base.max_new_tokens,
            vocab_size=pair.vocab_size,
            stop_token_ids=stop,
            seed=base.seed,
        )
    else:
        steps = speculative_decode(
            pair.target,
            pair.draft,
            prompt_ids,
            method.spec(base),
            vocab_size=pair.vocab_size,
            stop_token_ids=stop,
        )
    for step in steps:
        tokens += step.tokens
        records.append(step.record)
        finish = step.finish_reason or finish
    return Generation(tokens, time.perf_counter() - started, records, finish)


# ------------------------------------------------------------------------------ transformers


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


def hf_generation_config(base: SpecConfig, stop: frozenset[int], max_new_tokens: int) -> Any:
    """A ``GenerationConfig`` that samples like ``base.target``: every warping value explicit, so
    nothing from the model's own generation_config (Qwen ships top_k=20, a repetition penalty)
    changes the distribution."""
    from transformers import GenerationConfig

    sampling = base.target
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
def _run_hf(
    method: Method, pair: ModelPair, prompt_ids: list[int], base: SpecConfig, stop: frozenset[int]
) -> Generation:
    target = pair.target.model  # type: ignore[attr-defined]
    config = hf_generation_config(base, stop, base.max_new_tokens)
    kwargs: dict[str, Any] = {}
    saved = None
    if method.kind == "hf-assisted":
        draft = pair.draft.model  # type: ignore[attr-defined]
        # transformers 5.24 ignores num_assistant_tokens passed to generate(): it reads the
        # assistant's generation_config (DESIGN 8). Set it there, restore it afterwards.
        saved = draft.generation_config
        draft.generation_config = copy.deepcopy(saved)
        if method.assistant_tokens is not None:
            draft.generation_config.num_assistant_tokens = method.assistant_tokens
            draft.generation_config.num_assistant_tokens_schedule = "constant"
        kwargs["assistant_model"] = draft
    if base.seed is not None:
        torch.manual_seed(base.seed)  # transformers samples from the global generator
    ids = torch.tensor([prompt_ids], device=pair.target.device)
    if method.kind == "hf-static":
        return _run_hf_static(target, ids, config, stop)
    log = _ForwardLog(target)
    try:
        started = time.perf_counter()
        out = target.generate(
            ids, attention_mask=torch.ones_like(ids), generation_config=config, **kwargs
        )
        wall = time.perf_counter() - started
    finally:
        log.remove()
        if saved is not None:
            pair.draft.model.generation_config = saved  # type: ignore[attr-defined]
    tokens = [int(t) for t in out[0, len(prompt_ids) :]]
    finish = "stop" if tokens and tokens[-1] in stop else "length"
    return Generation(tokens, wall, log.records(len(prompt_ids), len(tokens)), finish)


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


def _run_hf_static(model: Any, ids: torch.Tensor, config: Any, stop: frozenset[int]) -> Generation:
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
    finish = "stop" if tokens and tokens[-1] in stop else "length"
    return Generation(tokens, wall, records, finish)
