"""``mcsd tune`` (and ``mcsd bench --sweep``): find the fastest tree shape for a pair here.

This module parses, prints and writes; the pipeline is ``mcsd.bench.tune`` (greedy decoding:
every shape simulated from the draft's ranks of the target's answers, the best run for real).
``mcsd tune`` saves the fastest measured tree, or ``none`` (the target alone), in the cache's
tuned.json, keyed by (target, draft, device, dtype, runtime); ``generate``, ``bench`` and
``serve`` use it when ``--tree`` is not given and say so in their first log line.

mcsd tune --n 4 --max-new-tokens 128
mcsd bench --sweep --temperature 0 --budgets 4,8,16,32,64 --verify 4 --out sweep-out
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mcsd.bench.defaults import SweepDefaults
from mcsd.commands.options import (
    add_bench_arguments,
    add_sweep_arguments,
    check_model_arguments,
    load_pair_from_args,
    load_questions,
    spec_from_args,
)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "tune",
        help="find the fastest tree for a pair on this machine and save it as the default",
        description="Simulate many tree shapes on real prompts (greedy), run the best ones, and "
        "save the fastest as the pair's default tree in the mcsd cache (tuned.json).",
    )
    add_bench_arguments(parser)
    add_sweep_arguments(parser)
    # The sweep simulates greedy decoding: that is what tune measures, not a default to override.
    parser.set_defaults(
        func=lambda args: run_sweep(args, save=True),
        n=SweepDefaults.n,
        out=SweepDefaults.out,
        temperature=0.0,
    )
    return parser


def _budgets(text: str) -> tuple[int, ...]:
    try:
        budgets = sorted({int(b) for b in text.split(",") if b.strip()})
    except ValueError:
        raise ValueError(f"--budgets must be comma-separated integers, got {text!r}") from None
    if not budgets or budgets[0] < 1:
        raise ValueError(f"--budgets must be positive integers, got {text!r}")
    return tuple(budgets)


def _log(message: str) -> None:
    print(message, file=sys.stderr)


def run_sweep(args: argparse.Namespace, *, save: bool) -> int:
    import torch
    from rich.console import Console

    from mcsd.bench import tune
    from mcsd.bench.methods import parse_count
    from mcsd.bench.report import render_table, run_metadata, table_text, write_results
    from mcsd.bench.tuned import save_tuned, tuned_key

    check_model_arguments(args)
    base = spec_from_args(argparse.Namespace(**{**vars(args), "tree": "1", "rule": None}))
    if not base.target.greedy:
        raise ValueError(
            "the sweep simulates greedy decoding (--temperature 0); compare sampling trees with "
            "mcsd bench --temperature T --methods sps:G tree:K:RULE ..."
        )
    budgets = _budgets(args.budgets)
    questions = load_questions(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console() if sys.stdout.isatty() else Console(width=200)
    _log("loading models...")
    pair = load_pair_from_args(args)
    draft_name = pair.draft_name  # tuned.json is keyed by the draft model, not its variant
    if args.draft_vocab or args.draft_int8:
        vocab = parse_count(args.draft_vocab, "--draft-vocab") if args.draft_vocab else None
        pair = pair.with_cheap_draft(vocab=vocab, int8=args.draft_int8)
    chat = not args.no_chat and getattr(pair.tokenizer, "chat_template", None) is not None
    config = tune.TuneConfig(
        base=base,
        budgets=budgets,
        max_depth=args.max_depth,
        verify=args.verify,
        chat=chat,
        warmup_tokens=args.warmup_tokens,
        progress=not args.no_progress,
    )

    references = tune.reference_answers(pair, questions, config, _log)
    prediction = tune.predict(pair, references, config)
    for budget, pick in prediction.picks.items():
        _log(
            f"optimiser, budget {budget}: {pick.name} (expected AL {pick.accepted_length:.2f}, "
            f"{pick.tokens_per_s:.1f} tokens/s against {pick.plain_tokens_per_s:.1f} plain)"
        )
    plain = prediction.plain_rate
    console.print(_candidate_table(prediction.candidates[:15], plain, "Best predicted shapes"))
    per_budget = [c for entry in prediction.best.values() for c in entry.values()]
    console.print(_candidate_table(per_budget, plain, "Best per budget (by AL, by tokens/s)"))

    out = Path(args.out)
    measured: dict[str, Any] = {}
    if args.verify > 0:
        methods = tune.methods_to_measure(prediction, args.verify)
        answers, summary = tune.measure(pair, questions, methods, config)
        meta = run_metadata(args, pair, base, methods, questions)
        write_results(out, answers, methods, summary, meta, Path(pair.target_name).name)
        table = render_table(summary, methods, "Best predicted shapes, measured")
        console.print(table)
        (out / "table.txt").write_text(table_text(table))
        measured = summary["all"]

    out.mkdir(parents=True, exist_ok=True)
    record = tune.sweep_record(prediction, references, questions, measured)
    (out / "sweep.json").write_text(json.dumps(record, indent=2) + "\n")
    _log(f"sweep results in {out}/sweep.json")
    if save:
        entry = tune.tuned_tree(measured, prediction)
        entry |= {"draft_vocab": args.draft_vocab, "draft_int8": args.draft_int8}
        runtime = pair.target.name.split(":")[0]
        device, dtype = str(pair.target.device), str(pair.target.dtype)
        key = tuned_key(pair.target_name, draft_name, device, dtype, runtime)
        path = save_tuned(key, entry)
        _log(f"saved tree {entry['tree']} ({entry['source']}) for {key} in {path}")
    return 0


def _candidate_table(candidates: list[Any], ar_rate: float, title: str) -> Any:
    from rich.table import Table

    table = Table(title=title)
    for column in ("tree", "nodes", "depth", "AL (simulated)", "step ms", "tok/s", "x ar"):
        table.add_column(column, justify="left" if column == "tree" else "right")
    for c in candidates:
        table.add_row(
            c.name if len(c.name) <= 60 else c.name[:57] + "...",
            str(c.tree.num_nodes),
            str(c.tree.max_depth),
            f"{c.simulated.mean_accepted_length:.2f}",
            f"{1e3 * c.step_time:.0f}",
            f"{c.tokens_per_s:.2f}",
            f"{c.tokens_per_s / ar_rate:.2f}x",
        )
    return table
