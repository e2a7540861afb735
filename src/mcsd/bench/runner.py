"""Run every method on every prompt, interleaved prompt by prompt, after a warm-up.

Interleaving (question 1: all methods, question 2: all methods, ...; the method order rotates
from one question to the next) makes slow drifts of the machine - thermal state, other processes
- hit every method alike instead of whichever ran last. Multi-turn questions are answered turn
by turn, each method continuing its own conversation (as Spec-Bench does).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from mcsd.api import ModelPair, encode_prompt
from mcsd.bench.datasets import Question
from mcsd.bench.defaults import BenchDefaults
from mcsd.bench.methods import Generation, Method, run_method
from mcsd.config import SpecConfig

WARMUP_TOKENS = BenchDefaults.warmup_tokens


@dataclass(kw_only=True)
class Answer:
    """One method's answer to one turn of one question."""

    method: str
    question: Question
    turn: int  # 0-based
    position: int  # the question's index in the run (ids from files may repeat)
    prompt_ids: list[int]
    generation: Generation
    text: str
    matches_reference: bool | None = None  # greedy only: same prompt and same tokens as reference
    load: float | None = None  # 1-minute load average after the answer (other processes?)

    @property
    def dataset(self) -> str:
        return self.question.dataset


REFERENCES = ("hf-ar", "hf-static", "llama-ar", "ar")  # the target alone, by preference


def reference_method(methods: Sequence[Method]) -> str | None:
    """The method whose greedy output the others must reproduce: the first of ``REFERENCES``
    that ran."""
    names = [m.name for m in methods]
    return next((name for name in REFERENCES if name in names), None)


def build_prompt(
    tokenizer: Any, question: Question, answers: Sequence[str], turn: int, chat: bool
) -> list[int]:
    """Token ids of ``question`` up to user turn ``turn``, after this method's own earlier
    answers. Without a chat template the turns and answers are joined as plain text."""
    if chat:
        messages: list[dict[str, str]] = []
        for i in range(turn + 1):
            messages.append({"role": "user", "content": question.turns[i]})
            if i < turn:
                messages.append({"role": "assistant", "content": answers[i]})
        return encode_prompt(tokenizer, messages)
    parts = [question.turns[0]]
    for i in range(1, turn + 1):
        parts += [answers[i - 1], question.turns[i]]
    return encode_prompt(tokenizer, "\n\n".join(parts))


def method_pairs(pair: ModelPair, methods: Sequence[Method]) -> dict[str, ModelPair]:
    """The pair each method runs with: ``pair``, or one copy per cheaper-draft variant
    (``+int8``, ``+fr=K``) shared by the methods that ask for it."""
    variants: dict[tuple[int | None, bool], ModelPair] = {(None, False): pair}
    pairs = {}
    for method in methods:
        key = (method.draft_vocab, method.draft_int8)
        if key not in variants:
            variants[key] = pair.with_cheap_draft(vocab=key[0], int8=key[1])
        pairs[method.name] = variants[key]
    return pairs


def turn_seed(seed: int | None, index: int, turn: int) -> int:
    """A distinct, reproducible seed for each (question, turn), shared by all methods."""
    return ((seed or 0) * 1_000_003 + index * 64 + turn) % (2**63)


def run_bench(
    pair: ModelPair,
    questions: Sequence[Question],
    methods: Sequence[Method],
    base: SpecConfig,
    *,
    chat: bool | None = None,
    warmup_tokens: int = WARMUP_TOKENS,
    progress: bool = True,
) -> list[Answer]:
    """Answer every turn of every question with every method; return the answers in run order.

    ``chat=None`` applies the tokenizer's chat template when it has one."""
    if not questions or not methods:
        raise ValueError("need at least one question and one method")
    tokenizer = pair.tokenizer
    if chat is None:
        chat = getattr(tokenizer, "chat_template", None) is not None
    reference = reference_method(methods) if base.target.greedy else None
    pairs = method_pairs(pair, methods)
    total = sum(len(q.turns) - len(q.answers) for q in questions) * len(methods)

    with _Progress(progress, total + len(methods)) as bar:
        if warmup_tokens > 0:
            first = build_prompt(tokenizer, questions[0], [], 0, chat)
            short = replace(base, max_new_tokens=min(warmup_tokens, base.max_new_tokens))
            for method in methods:
                bar.describe(f"warm-up {method.name}")
                run_method(method, pairs[method.name], first, short)
                bar.advance(f"warm-up {method.name} done")

        answers: list[Answer] = []
        for index, question in enumerate(questions):
            shift = index % len(methods)
            order = [*methods[shift:], *methods[:shift]]
            # each method's conversation so far: the answers given with the question, then its own
            texts: dict[str, list[str]] = {m.name: list(question.answers) for m in methods}
            for turn in range(len(question.answers), len(question.turns)):
                spec = replace(base, seed=turn_seed(base.seed, index, turn))
                done: dict[str, Answer] = {}
                for method in order:
                    label = f"{question.dataset} {question.question_id} turn {turn + 1}"
                    bar.describe(f"{method.name} | {label}")
                    prompt_ids = build_prompt(tokenizer, question, texts[method.name], turn, chat)
                    generation = run_method(method, pairs[method.name], prompt_ids, spec)
                    text = tokenizer.decode(generation.tokens, skip_special_tokens=True)
                    texts[method.name].append(text)
                    done[method.name] = Answer(
                        method=method.name,
                        question=question,
                        turn=turn,
                        position=index,
                        prompt_ids=prompt_ids,
                        generation=generation,
                        text=text,
                    )
                    done[method.name].load = _load_average()
                    bar.advance(_line(done[method.name]))
                if reference is not None:
                    ref = done[reference]
                    for answer in done.values():
                        answer.matches_reference = (
                            answer.prompt_ids == ref.prompt_ids
                            and answer.generation.tokens == ref.generation.tokens
                        )
                answers += [done[m.name] for m in methods]
    return answers


def _line(answer: Answer) -> str:
    generation = answer.generation
    rate = len(generation.tokens) / generation.wall_time if generation.wall_time > 0 else 0.0
    steps = len(generation.records)
    al = len(generation.tokens) / steps if steps else 0.0
    return (
        f"{answer.method} | {answer.dataset} {answer.question.question_id} turn {answer.turn + 1}"
        f" | {len(generation.tokens)} tokens in {generation.wall_time:.1f}s = {rate:.2f} tok/s,"
        f" AL {al:.2f}, load {answer.load if answer.load is not None else '?'}"
    )


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return None


class _Progress:
    """A rich progress bar on stderr; one line per answer instead when stderr is not a terminal
    (the log of a background run); or nothing."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total = enabled, total
        self._bar: Any = None
        self._lines = enabled and not sys.stderr.isatty()
        self._done = 0

    def __enter__(self) -> _Progress:
        if self.enabled and not self._lines:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("{task.description:<48}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(file=sys.stderr),
            )
            self._bar.__enter__()
            self._task = self._bar.add_task("", total=self.total)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def describe(self, text: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=text[:48])

    def advance(self, line: str = "") -> None:
        self._done += 1
        if self._bar is not None:
            self._bar.advance(self._task)
        elif self._lines and line:
            print(f"[{self._done}/{self.total}] {line}", file=sys.stderr, flush=True)
