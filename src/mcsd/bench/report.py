"""Benchmark results: metrics per method and dataset, the printed table, and the files.

Files written into the output directory:

- ``answers/<method>.jsonl``  one line per question in Spec-Bench's answer format (``question_id``,
  ``category``, ``answer_id``, ``model_id``, ``choices: [{index, turns, decoding_steps,
  new_tokens, wall_time, accept_lengths}]``, ``tstamp``), so Spec-Bench's ``speed.py`` reads it;
- ``details.jsonl``           one line per answered turn with every per-turn metric;
- ``summary.json``            the run's settings, machine, versions and the metrics below.

Metrics (DESIGN 6): tokens/s = new tokens / wall time over a dataset's turns (prefill included);
speedup = tokens/s over the reference's tokens/s on the same prompts in the same run (each of
``REFERENCES`` that ran); mean accepted length AL = new tokens / target forwards; acceptance per
depth, sibling rank histogram and draft/target time share from the step records; in greedy runs
the rate of turns whose output equals the reference's (``reference_method``) token for token.
The ``all`` row pools every turn, except its speedup, which is the geometric mean of the
per-dataset speedups.
"""

from __future__ import annotations

import io
import json
import math
import os
import platform
import re
import sys
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mcsd.bench.methods import Method
from mcsd.bench.runner import REFERENCES, Answer, reference_method
from mcsd.stats import Stats

ALL = "all"  # the pooled row
MAX_DEPTH_SHOWN = 6  # acceptance-per-depth columns in the table (summary.json has them all)


def method_stats(answers: Sequence[Answer]) -> Stats:
    stats = Stats()
    for answer in answers:
        for record in answer.generation.records:
            stats.add(record)
    return stats


def metrics(answers: Sequence[Answer]) -> dict[str, Any]:
    """Metrics of one method over some answers (see the module docstring)."""
    stats = method_stats(answers)
    tokens = sum(len(a.generation.tokens) for a in answers)
    wall = sum(a.generation.wall_time for a in answers)
    equal = [a.matches_reference for a in answers if a.matches_reference is not None]
    return {
        "turns": len(answers),
        "new_tokens": tokens,
        "wall_time": wall,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "steps": stats.steps,
        "mean_accepted_length": tokens / stats.steps if stats.steps else 0.0,
        "acceptance_per_depth": stats.acceptance_per_depth(),
        "rank_histogram": stats.rank_histogram(),
        "tree_size": max((r.tree_size for r in stats.records), default=0),
        "mean_tree_size": stats.mean_tree_size,
        "plain_steps": stats.plain_steps,
        "context_share": stats.context_share,
        "draft_time": stats.draft_time,
        "target_time": stats.target_time,
        "draft_share": stats.draft_time / wall if wall > 0 else 0.0,
        "target_share": stats.target_time / wall if wall > 0 else 0.0,
        "equal_rate": sum(equal) / len(equal) if equal else None,
    }


def summarize(answers: Sequence[Answer], methods: Sequence[Method]) -> dict[str, Any]:
    """``{dataset: {method: metrics}}`` with speedups, plus the pooled ``all`` entry."""
    datasets = list(dict.fromkeys(a.dataset for a in answers))
    names = [m.name for m in methods]
    results: dict[str, dict[str, Any]] = {}
    for dataset in datasets:
        results[dataset] = {
            name: metrics([a for a in answers if a.dataset == dataset and a.method == name])
            for name in names
        }
        for reference in speedup_bases(names):
            base = results[dataset][reference]["tokens_per_s"]
            for row in results[dataset].values():
                row[f"speedup_vs_{reference}"] = row["tokens_per_s"] / base if base else 0.0
    pooled = {name: metrics([a for a in answers if a.method == name]) for name in names}
    for reference in speedup_bases(names):
        for name, row in pooled.items():
            ratios = [results[d][name][f"speedup_vs_{reference}"] for d in datasets]
            row[f"speedup_vs_{reference}"] = geometric_mean(ratios)
    results[ALL] = pooled
    return results


def speedup_bases(names: Sequence[str]) -> list[str]:
    """The methods every row gets a speedup against: the target-alone references that ran,
    then llama.cpp's own speculative decoding (``llama-spec...``) when it ran."""
    return [r for r in REFERENCES if r in names] + [n for n in names if n.startswith("llama-spec")]


def geometric_mean(values: Sequence[float]) -> float:
    values = [v for v in values if v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else 0.0


# ------------------------------------------------------------------------------ the table


def render_table(summary: dict[str, Any], methods: Sequence[Method], title: str = "") -> Any:
    """A rich ``Table``: one row per dataset and method."""
    from rich.table import Table

    names = [m.name for m in methods]
    table = Table(title=title or None, show_lines=False)
    columns = ["dataset", "method", "tok/s"]
    references = speedup_bases(names)
    columns += [f"x {reference}" for reference in references]
    columns += ["AL", "accept/depth", "tree", "draft %", "target %"]
    copying = any(m.proposer in ("context", "mixed") for m in methods)
    if copying:
        columns.append("ctx %")  # share of the accepted tokens copied from the context
    adaptive = any(m.adaptive for m in methods)
    if adaptive:
        columns.append("plain %")  # steps an adaptive budget decoded plainly
    greedy = any(
        row["equal_rate"] is not None for rows in summary.values() for row in rows.values()
    )
    if greedy:
        columns.append(f"= {reference_method(methods)}")
    for column in columns:
        left = column in ("dataset", "method")
        table.add_column(column, justify="left" if left else "right", no_wrap=True)
    for dataset, rows in summary.items():
        for i, name in enumerate(names):
            row = rows[name]
            cells = [dataset if i == 0 else "", name, f"{row['tokens_per_s']:.2f}"]
            cells += [f"{row[f'speedup_vs_{reference}']:.2f}x" for reference in references]
            rates = row["acceptance_per_depth"]
            depth = " ".join(f"{r:.2f}" for r in rates[:MAX_DEPTH_SHOWN])
            depth += " …" if len(rates) > MAX_DEPTH_SHOWN else ""
            cells += [
                f"{row['mean_accepted_length']:.2f}",
                depth or "-",
                str(row["tree_size"] or "-"),
                f"{100 * row['draft_share']:.0f}" if row["draft_time"] else "-",
                f"{100 * row['target_share']:.0f}" if row["target_time"] else "-",
            ]
            if copying:
                share = row["context_share"]
                cells.append("-" if share is None else f"{100 * share:.0f}")
            if adaptive:
                steps = row["steps"]
                cells.append(f"{100 * row['plain_steps'] / steps:.0f}" if steps else "-")
            if greedy:
                rate = row["equal_rate"]
                cells.append("-" if rate is None else f"{100 * rate:.0f}%")
            table.add_row(*cells, end_section=i == len(names) - 1)
    return table


def table_text(table: Any, width: int = 160) -> str:
    """The table as plain text (for files and the docs)."""
    from rich.console import Console

    console = Console(width=width, record=True, file=io.StringIO())
    console.print(table)
    return console.export_text()


# ------------------------------------------------------------------------------ files


def method_slug(name: str) -> str:
    """A file name for a method: ``tree:4,2,2:mcss-wor`` -> ``tree-4.2.2-mcss-wor``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name.replace(",", ".")).strip("-")


def spec_bench_records(
    answers: Sequence[Answer], method: str, model_id: str
) -> list[dict[str, Any]]:
    """Spec-Bench answer objects (one per question) for one method's answers."""
    grouped: dict[int, list[Answer]] = {}
    for answer in answers:
        if answer.method == method:
            grouped.setdefault(answer.position, []).append(answer)
    records = []
    for turns in grouped.values():
        turns.sort(key=lambda a: a.turn)
        dataset, question_id = turns[0].dataset, turns[0].question.question_id
        accept_lengths = [r.emitted for a in turns for r in a.generation.records]
        choice = {
            "index": 0,
            "turns": [a.text for a in turns],
            "decoding_steps": [len(a.generation.records) for a in turns],
            "new_tokens": [len(a.generation.tokens) for a in turns],
            "wall_time": [a.generation.wall_time for a in turns],
            "accept_lengths": accept_lengths,
        }
        records.append(
            {
                "question_id": question_id,
                "category": turns[0].question.category,
                "dataset": dataset,
                "answer_id": uuid.uuid4().hex,
                "model_id": model_id,
                "choices": [choice],
                "tstamp": time.time(),
            }
        )
    return records


def detail_record(answer: Answer) -> dict[str, Any]:
    stats = method_stats([answer])
    generation = answer.generation
    return {
        "method": answer.method,
        "dataset": answer.dataset,
        "question_id": answer.question.question_id,
        "category": answer.question.category,
        "turn": answer.turn,
        "prompt_tokens": len(answer.prompt_ids),
        "new_tokens": len(generation.tokens),
        "wall_time": generation.wall_time,
        "tokens_per_s": len(generation.tokens) / generation.wall_time
        if generation.wall_time > 0
        else 0.0,
        "finish_reason": generation.finish_reason,
        "matches_reference": answer.matches_reference,
        "load_average": answer.load,
        "token_ids": generation.tokens,
    } | stats.to_dict()


def write_results(
    out: Path,
    answers: Sequence[Answer],
    methods: Sequence[Method],
    summary: dict[str, Any],
    meta: dict[str, Any],
    model_id: str,
) -> list[Path]:
    """Write answers/, details.jsonl and summary.json into ``out``; return the paths."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "answers").mkdir(exist_ok=True)
    paths = []
    for method in methods:
        path = out / "answers" / f"{method_slug(method.name)}.jsonl"
        records = spec_bench_records(answers, method.name, f"{model_id}-{method.name}")
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        paths.append(path)
    details = out / "details.jsonl"
    details.write_text("".join(json.dumps(detail_record(a)) + "\n" for a in answers))
    loads = sorted(a.load for a in answers if a.load is not None)
    if loads:  # other processes on the machine disturb timings: say how busy it was
        meta = meta | {
            "load_average": {"min": loads[0], "median": loads[len(loads) // 2], "max": loads[-1]}
        }
    path = out / "summary.json"
    path.write_text(json.dumps(meta | {"results": summary}, indent=2) + "\n")
    return [*paths, details, path]


def run_metadata(
    args: Any, pair: Any, base: Any, methods: list[Any], questions: list[Any]
) -> dict[str, Any]:
    """Everything needed to reproduce and judge a run (machine, versions, settings)."""
    import torch
    import transformers

    from mcsd import __version__

    dtype = str(pair.target.dtype).removeprefix("torch.")
    return {
        "command": " ".join(["mcsd", *sys.argv[1:]]) if sys.argv else "",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpu": _cpu_name(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": str(pair.target.device),
            "runtime": pair.target.name.split(":")[0],
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "versions": {
            "mcsd": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "target": pair.target_name,
        "draft": pair.draft_name,
        "dtype": dtype,
        "sampling": {
            "temperature": base.target.temperature,
            "top_k": base.target.top_k,
            "top_p": base.target.top_p,
            "draft": vars(base.draft) if base.draft is not None else None,
        },
        "max_new_tokens": base.max_new_tokens,
        "seed": base.seed,
        "datasets": list(dict.fromkeys(q.dataset for q in questions)),
        "questions": [[q.dataset, q.question_id] for q in questions],
        "turns": args.turns,
        "methods": [m.describe(base) for m in methods],
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
