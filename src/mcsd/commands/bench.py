"""``mcsd bench``: mcsd's trees against the baselines on real prompt sets, one command.

mcsd bench --dataset humaneval --dataset mt-bench --n 10 --max-new-tokens 128 \\
    --methods hf-ar hf-assisted hf-assisted:5 ar sps:4 tree:4,2,2 --out bench-out
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from mcsd.bench.defaults import BenchDefaults
from mcsd.commands.options import (
    add_bench_arguments,
    add_sweep_arguments,
    load_pair_from_args,
    load_questions,
    run_parallel,
    spec_from_args,
    tree_default,
)
from mcsd.sources.registry import DEFAULT_TARGET

EXAMPLES = """examples:
  mcsd bench --n 10 --max-new-tokens 128 --temperature 0      greedy, HumanEval + MT-bench
  mcsd bench --temperature 1 --methods hf-ar hf-assisted:5 sps:4 tree:4,2,2:mcss-wor
  mcsd bench --dataset questions.jsonl --turns 2 --methods ar tree:2,2,2,2:mcss
  mcsd bench --sweep --n 4 --temperature 0                    pick tree shapes (see mcsd tune)
  mcsd bench --runtime llama.cpp --methods ar tree:1,1,1 tree:1,1,1+adaptive
methods: hf-ar, hf-static, hf-assisted, hf-assisted:N, ar, sps:G, tree:K-CONFIG[:RULE];
  +adaptive on sps/tree: the tree budget picks each step's tree (or none);
  on --runtime llama.cpp: llama-ar, llama-spec[:N[:P]] (llama.cpp's own loops)
datasets: humaneval, mt-bench, sharegpt, or a JSON/JSONL file (turns / conversations /
  instruction+input / src / prompt)"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench",
        help="benchmark speed and acceptance against transformers baselines",
        description="Run decoding methods side by side on prompt sets, interleaved prompt by "
        "prompt after a warm-up; print a table and write Spec-Bench answer files, summary.json "
        "and PNG plots.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_bench_arguments(parser)
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="instead of --methods: simulate tree shapes under --budgets (greedy) and run the "
        "best --verify of them (mcsd tune also saves the fastest)",
    )
    add_sweep_arguments(parser)
    parser.add_argument(
        "--adaptive-tree",
        action="store_true",
        help="the same as adding +adaptive to every sps/tree method with a static tree: each "
        "step's tree picked from the measured step cost and the acceptance seen so far, down "
        "to plain decoding",
    )
    parser.add_argument(
        "--batch-size",
        type=str,
        default=None,
        metavar="B[,B...]",
        help="instead of one answer at a time: throughput of ar / sps / tree methods with B rows "
        "decoded side by side (first turns only, rows joining as others finish); tokens/s "
        "summed over the batch; several sizes (1,4,16) run one after another on one model load",
    )
    parser.add_argument(
        "--replot",
        default=None,
        metavar="DIR",
        help="only draw the PNG plots again from DIR/summary.json of a finished run",
    )
    parser.set_defaults(func=run)
    return parser


def parse_methods(args: argparse.Namespace) -> list[Any]:
    from mcsd.bench.methods import parse_method
    from mcsd.models.factory import parse_device, runtime_kind

    tree, _ = tree_default(args)
    device = parse_device(args.device)
    kind = runtime_kind(args.runtime, device, args.target or DEFAULT_TARGET, args.dtype)
    defaults = BenchDefaults.llamacpp_methods if kind.name == "llama.cpp" else BenchDefaults.methods
    names = list(args.methods or (m.format(tree=tree) for m in defaults))
    if args.tree:  # --tree/--rule of the shared decoding options add one more tree
        names.append(f"tree:{args.tree}" + (f":{args.rule}" if args.rule else ""))
    methods = [parse_method(name) for name in names]
    suffix = (f"+fr={args.draft_vocab}" if args.draft_vocab else "") + (
        "+int8" if args.draft_int8 else ""
    )
    if suffix:
        methods = [
            parse_method(m.name + suffix)
            if m.is_mcsd and m.uses_draft and m.draft_vocab is None and not m.draft_int8
            else m
            for m in methods
        ]
    if args.adaptive_tree:  # a method whose adaptive twin is listed already is that twin
        listed = {m.name for m in methods}
        adapted = []
        for m in methods:
            if m.static_tree and not m.adaptive:
                m = parse_method(m.name + "+adaptive")
                if m.name in listed:
                    continue
            adapted.append(m)
        methods = adapted
    seen = [m.name for m in methods]
    duplicates = sorted({n for n in seen if seen.count(n) > 1})
    if duplicates:
        raise ValueError(f"methods listed twice: {', '.join(duplicates)}")
    return methods


def run(args: argparse.Namespace) -> int:
    import torch

    launched = run_parallel(args, run)  # --tp N: this process is rank 0 of N
    if launched is not None:
        return launched

    if args.replot:
        from mcsd.bench.plots import replot

        for path in replot(Path(args.replot)):
            print(path)
        return 0
    if args.sweep:
        from mcsd.commands.tune import run_sweep

        return run_sweep(args, save=False)

    from mcsd.bench.report import (
        render_table,
        run_metadata,
        summarize,
        table_text,
        write_results,
    )
    from mcsd.bench.runner import run_bench

    # Sampling, lengths and seed; each method brings its own tree and rule.
    base = spec_from_args(argparse.Namespace(**{**vars(args), "tree": "1", "rule": None}))
    methods = parse_methods(args)
    for method in methods:  # a rule that does not fit the sampling fails now, not in an hour
        method.spec(base).resolved_rule()
    if args.batch_size is not None:
        return run_batch_sizes(args, base, methods)
    questions = load_questions(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    if args.methods is None:
        print(f"mcsd: {tree_default(args)[1]}", file=sys.stderr)
    print("loading models...", file=sys.stderr)
    pair = load_pair_from_args(args, load_draft=any(m.uses_draft for m in methods))
    print(
        f"loaded {pair.names} in {time.perf_counter() - started:.1f}s",
        file=sys.stderr,
    )

    _log_budgets(pair, methods, base, 1)
    answers = run_bench(
        pair,
        questions,
        methods,
        base,
        chat=False if args.no_chat else None,
        warmup_tokens=args.warmup_tokens,
        progress=not args.no_progress,
    )
    summary = summarize(answers, methods)
    out = Path(args.out)
    meta = run_metadata(args, pair, base, methods, questions)
    write_results(out, answers, methods, summary, meta, Path(pair.target_name).name)
    title = (
        f"{Path(pair.target_name).name} <- {Path(pair.draft_name).name}, {meta['dtype']}, "
        f"{pair.target.name.split(':')[0]}, "
        f"{'greedy' if base.target.greedy else f'temperature {base.target.temperature:g}'}, "
        f"{base.max_new_tokens} new tokens"
    )
    table = render_table(summary, methods, title)
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # logs of background runs: keep rows on one line
    console.print(table)
    (out / "table.txt").write_text(table_text(table))
    if not args.no_plots:
        from mcsd.bench.plots import plot_all

        rules = {m.name: m.spec(base).resolved_rule() for m in methods if m.is_mcsd}
        plot_all(summary, methods, out, rules)
    print(f"results in {out}/", file=sys.stderr)
    return 0


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """``--batch-size``: one size or a comma-separated list of them, each an integer >= 1."""
    sizes = []
    for part in text.split(","):
        try:
            size = int(part)
        except ValueError:
            size = 0
        if size < 1:
            raise ValueError(
                f"--batch-size must be an integer >= 1 or a comma-separated list of them "
                f"(e.g. 1,4,16), got {text!r}"
            )
        sizes.append(size)
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"--batch-size names a size twice: {text!r}")
    return tuple(sizes)


def run_batch_sizes(args: argparse.Namespace, base: Any, methods: list[Any]) -> int:
    """``--batch-size B[,B...]``: every method's throughput at B rows, for each B in turn on one
    model load (``mcsd.bench.batch``)."""
    import json

    from mcsd.bench.batch import batch_table, check_batch_methods, run_batch_bench
    from mcsd.bench.runner import build_prompt
    from mcsd.models.base import with_rows

    sizes = parse_batch_sizes(args.batch_size)
    if args.methods is None:  # the defaults' transformers baselines decode one row at a time
        from mcsd.bench.methods import parse_method

        methods = [parse_method("ar"), *(m for m in methods if m.kind in ("sps", "tree"))]
    check_batch_methods(methods)
    questions = load_questions(args)
    print("loading models...", file=sys.stderr)
    pair = load_pair_from_args(args)
    with_rows(pair.target, max(sizes))  # a runtime that holds one row refuses before any work
    chat = not args.no_chat and getattr(pair.tokenizer, "chat_template", None) is not None
    prompts = [build_prompt(pair.tokenizer, q, [], 0, chat) for q in questions]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for batch in sizes:
        _log_budgets(pair, methods, base, batch)
        results = run_batch_bench(pair, prompts, methods, base, batch)
        table = batch_table(results)
        print(table, flush=True)
        rows = [
            {
                "method": r.method,
                "batch_size": r.batch_size,
                "tokens": r.tokens,
                "seconds": r.seconds,
                "tokens_per_second": r.tokens_per_second,
                "mean_accepted_length": r.stats.mean_accepted_length,
                "plain_steps": r.stats.plain_steps,
                "steps": r.stats.steps,
                "matches_ar": r.matches_ar,
            }
            for r in results
        ]
        (out / f"batch-{batch}.json").write_text(json.dumps(rows, indent=2) + "\n")
        (out / f"batch-{batch}.txt").write_text(table + "\n")
    print(f"results in {out}/", file=sys.stderr)
    return 0


def _log_budgets(pair: Any, methods: list[Any], base: Any, batch: int) -> None:
    """Measure the step cost of every ``+adaptive`` method's tree now (once per tree; the runs
    reuse it: ``ModelPair.tree_budget``) and log what it implies, one line each."""
    for method in methods:
        spec = method.spec(base)
        cheaper = method.draft_vocab is not None or method.draft_int8  # its own pair, later
        if method.adaptive and spec.speculative and not cheaper:
            budget = pair.tree_budget(spec.token_tree(), batch)
            print(f"mcsd: {method.name}: {budget.describe(batch)}", file=sys.stderr)
