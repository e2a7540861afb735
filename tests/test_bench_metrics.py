"""Metrics, method names and result files of ``mcsd bench`` on hand-made step records.

The Spec-Bench answer files are read back by ``spec_bench_speed`` below, written from Spec-Bench's
``evaluation/speed.py`` field names (``choices[0]["new_tokens"]``, ``["wall_time"]``,
``["accept_lengths"]``), not from our writer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from mcsd.bench.datasets import Question
from mcsd.bench.methods import Generation, parse_method
from mcsd.bench.report import (
    ALL,
    method_slug,
    metrics,
    render_table,
    summarize,
    table_text,
    write_results,
)
from mcsd.bench.runner import Answer, turn_seed
from mcsd.models.hf_baselines import _ForwardLog
from mcsd.stats import StepRecord


def record(accepted: int, attempted: int, ranks=(), size=0, draft=0.0, target=0.0) -> StepRecord:
    return StepRecord(
        accepted=accepted,
        emitted=accepted + 1,
        attempted=attempted,
        ranks=tuple(ranks),
        tree_size=size,
        draft_time=draft,
        target_time=target,
    )


def answer(method: str, dataset: str, qid, records, wall: float, turn: int = 0, equal=None):
    tokens = list(range(sum(r.emitted for r in records)))
    question = Question(question_id=qid, turns=("q0", "q1"), category="cat", dataset=dataset)
    generation = Generation(
        tokens=tokens, wall_time=wall, records=list(records), finish_reason="length"
    )
    return Answer(
        method=method,
        question=question,
        turn=turn,
        position=0,
        prompt_ids=[1, 2, 3],
        generation=generation,
        text=f"text {qid}",
        matches_reference=equal,
    )


def test_metrics_from_step_records() -> None:
    # Tree steps: depth 1 tried 3 times (accepted 3), depth 2 tried 3 (accepted 2), depth 3 tried
    # 2 (accepted 1, the other step stopped with a bonus: attempted == accepted).
    records = [
        record(3, 3, ranks=(0, 1, 0), size=6, draft=0.2, target=0.5),
        record(1, 2, ranks=(2,), size=6, draft=0.2, target=0.5),
        record(2, 3, ranks=(0, 0), size=6, draft=0.2, target=0.5),
    ]
    row = metrics([answer("tree:2,1", "d", 1, records, wall=2.0, equal=True)])
    assert row["new_tokens"] == 9 and row["steps"] == 3
    assert row["mean_accepted_length"] == pytest.approx(3.0)
    assert row["tokens_per_s"] == pytest.approx(4.5)
    assert row["acceptance_per_depth"] == pytest.approx([1.0, 2 / 3, 1 / 2])
    assert row["rank_histogram"] == [4, 1, 1]
    assert row["tree_size"] == 6
    assert row["draft_share"] == pytest.approx(0.3) and row["target_share"] == pytest.approx(0.75)
    assert row["equal_rate"] == 1.0


def test_summary_speedups_and_geometric_mean() -> None:
    ar = [record(0, 0)] * 10  # 10 tokens
    spec = [record(4, 4)] * 4  # 20 tokens
    answers = [
        answer("hf-ar", "a", 1, ar, wall=10.0, equal=True),
        answer("sps:4", "a", 1, spec, wall=5.0, equal=False),  # 4 tok/s vs 1: 4x
        answer("hf-ar", "b", 1, ar, wall=5.0, equal=True),
        answer("sps:4", "b", 1, spec, wall=20.0, equal=True),  # 1 tok/s vs 2: 0.5x
    ]
    methods = [parse_method("hf-ar"), parse_method("sps:4")]
    summary = summarize(answers, methods)
    assert list(summary) == ["a", "b", ALL]
    assert summary["a"]["sps:4"]["speedup_vs_hf-ar"] == pytest.approx(4.0)
    assert summary["b"]["sps:4"]["speedup_vs_hf-ar"] == pytest.approx(0.5)
    assert summary[ALL]["sps:4"]["speedup_vs_hf-ar"] == pytest.approx(math.sqrt(2.0))
    assert summary[ALL]["sps:4"]["tokens_per_s"] == pytest.approx(40 / 25)
    assert summary[ALL]["sps:4"]["equal_rate"] == 0.5
    assert summary[ALL]["hf-ar"]["mean_accepted_length"] == 1.0
    text = table_text(render_table(summary, methods, "t"))
    assert "sps:4" in text and "4.00x" in text and "= hf-ar" in text and "50%" in text


def test_method_names() -> None:
    assert parse_method("hf-ar").kind == "hf-ar"
    assert parse_method("hf-static").kind == "hf-static"
    assert parse_method("hf-assisted").assistant_tokens is None
    assert parse_method("hf-assisted:5").assistant_tokens == 5
    sps = parse_method("sps:3")
    assert sps.kind == "sps" and sps.tree == "1,1,1" and sps.rule is None
    tree = parse_method("tree:4,2,2:mcss-wor")
    assert (tree.tree, tree.rule, tree.is_mcsd) == ("4,2,2", "mcss-wor", True)
    assert parse_method("tree:2,2").rule is None
    bad_names = ("tree", "tree:4,x", "tree:2,2:nope", "sps:0", "sps:x", "hf-assisted:0", "beam")
    for bad in (*bad_names, "hf-static:2"):
        with pytest.raises(ValueError):
            parse_method(bad)
    assert method_slug("tree:4,2,2:mcss-wor") == "tree-4.2.2-mcss-wor"


def test_context_method_names() -> None:
    from mcsd.config import GREEDY, SamplingConfig, SpecConfig

    base = SpecConfig(target=SamplingConfig(temperature=1.0))
    ctx = parse_method("ctx")
    assert (ctx.kind, ctx.proposer, ctx.context_nodes, ctx.uses_draft) == (
        "ctx",
        "context",
        None,
        False,
    )
    spec = parse_method("ctx:8").spec(base)
    assert (spec.proposer, spec.context.max_nodes, spec.resolved_rule()) == ("context", 8, "topk")
    assert parse_method("ctx").spec(SpecConfig(target=GREEDY)).resolved_rule() == "greedy"
    mixed = parse_method("mixed:4,2,2")
    assert (mixed.proposer, mixed.tree, mixed.uses_draft) == ("mixed", "4,2,2", True)
    assert mixed.spec(base).resolved_rule() == "mcss-wor"
    assert parse_method("mixed:2,2:mcss+int8").draft_int8
    assert "context" in mixed.describe(base)
    pld = parse_method("hf-pld:5")
    assert (pld.kind, pld.lookup_tokens, pld.is_mcsd) == ("hf-pld", 5, False)
    assert parse_method("hf-pld").lookup_tokens is None
    assert parse_method("tree:2,2").spec(base).proposer == "model"
    for bad in ("ctx:0", "ctx:x", "ctx+int8", "mixed", "mixed:2,2:traversal", "hf-pld:0"):
        with pytest.raises(ValueError):
            parse_method(bad)
    assert turn_seed(0, 1, 0) != turn_seed(0, 0, 1) and turn_seed(3, 2, 1) == turn_seed(3, 2, 1)


def test_forward_log_accept_lengths() -> None:
    """Positions seen by the target in a real transformers assisted run (prompt of 5 tokens,
    30 new tokens): the first forward runs the prompt and 2 candidates, the next ones the pending
    token and up to 5 candidates."""
    log = _ForwardLog.__new__(_ForwardLog)
    log.starts = [0, 7, 13, 19, 25, 28, 30]
    log.sizes = [7, 6, 6, 6, 6, 2, 4]
    records = log.records(prompt_length=5, new_tokens=30)
    assert [r.emitted for r in records] == [3, 6, 6, 6, 3, 2, 4]
    assert sum(r.emitted for r in records) == 30
    assert [r.tree_size for r in records] == [2, 5, 5, 5, 5, 1, 3]
    assert [r.accepted for r in records] == [2, 5, 5, 5, 2, 1, 3]
    assert [r.attempted for r in records] == [2, 5, 5, 5, 3, 1, 3]
    # The target alone: one forward per token, no candidates.
    log.starts, log.sizes = [0, 5, 6, 7], [5, 1, 1, 1]
    assert [(r.emitted, r.tree_size) for r in log.records(5, 4)] == [(1, 0)] * 4


def spec_bench_speed(jsonl_file: Path, jsonl_file_base: Path) -> tuple[float, float]:
    """Spec-Bench's speed computation (evaluation/speed.py), on its field names: returns
    (speedup, mean accepted tokens). Token counts of the baseline come from ``new_tokens`` here
    instead of re-tokenising ``turns``."""
    speeds, accept_lengths = [], []
    for line in jsonl_file.read_text().splitlines():
        datapoint = json.loads(line)
        tokens = sum(datapoint["choices"][0]["new_tokens"])
        times = sum(datapoint["choices"][0]["wall_time"])
        accept_lengths.extend(datapoint["choices"][0]["accept_lengths"])
        speeds.append(tokens / times)
    speeds0 = []
    for line in jsonl_file_base.read_text().splitlines():
        datapoint = json.loads(line)
        assert isinstance(datapoint["choices"][0]["turns"], list)
        tokens = sum(datapoint["choices"][0]["new_tokens"])
        speeds0.append(tokens / sum(datapoint["choices"][0]["wall_time"]))
    return float(np.mean(speeds) / np.mean(speeds0)), float(np.mean(accept_lengths))


def test_spec_bench_files_read_back(tmp_path: Path) -> None:
    ar = [record(0, 0)] * 6
    spec = [record(2, 3)] * 2
    answers = [
        answer("hf-ar", "mt", 81, ar, wall=3.0, turn=0),
        answer("hf-ar", "mt", 81, ar, wall=3.0, turn=1),
        answer("tree:2,2", "mt", 81, spec, wall=1.0, turn=0),
        answer("tree:2,2", "mt", 81, spec, wall=2.0, turn=1),
    ]
    methods = [parse_method("hf-ar"), parse_method("tree:2,2")]
    summary = summarize(answers, methods)
    paths = write_results(tmp_path, answers, methods, summary, {"command": "x"}, "model")
    assert {p.name for p in paths} == {
        "hf-ar.jsonl",
        "tree-2.2.jsonl",
        "details.jsonl",
        "summary.json",
    }
    tree_file = tmp_path / "answers" / "tree-2.2.jsonl"
    (line,) = tree_file.read_text().splitlines()
    datapoint = json.loads(line)
    assert datapoint["question_id"] == 81 and datapoint["model_id"] == "model-tree:2,2"
    assert datapoint["category"] == "cat" and isinstance(datapoint["answer_id"], str)
    choice = datapoint["choices"][0]
    assert choice["turns"] == ["text 81", "text 81"]
    assert choice["new_tokens"] == [6, 6] and choice["decoding_steps"] == [2, 2]
    assert choice["wall_time"] == [1.0, 2.0] and choice["accept_lengths"] == [3, 3, 3, 3]
    speedup, mean_accept = spec_bench_speed(tree_file, tmp_path / "answers" / "hf-ar.jsonl")
    assert speedup == pytest.approx(2.0) and mean_accept == pytest.approx(3.0)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["command"] == "x"
    assert saved["results"]["mt"]["tree:2,2"]["speedup_vs_hf-ar"] == pytest.approx(2.0)
    details = [json.loads(x) for x in (tmp_path / "details.jsonl").read_text().splitlines()]
    assert [(d["method"], d["turn"]) for d in details][:2] == [("hf-ar", 0), ("hf-ar", 1)]
    assert details[2]["mean_accepted_length"] == pytest.approx(3.0)
