"""``mcsd bench``: mcsd's trees against the baselines on real prompt sets, one command.

mcsd bench --dataset humaneval --dataset mt-bench --n 10 --max-new-tokens 128 \\
    --methods hf-ar hf-assisted hf-assisted:5 ar sps:4 tree:4,2,2 --out bench-out
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mcsd.commands.generate import (
    add_decoding_arguments,
    add_model_arguments,
    load_pair_from_args,
    spec_from_args,
)

DEFAULT_DATASETS = ("humaneval", "mt-bench")
DEFAULT_METHODS = ("hf-ar", "hf-assisted", "hf-assisted:5", "ar", "sps:4", "tree:4,2,2")

EXAMPLES = """examples:
  mcsd bench --n 10 --max-new-tokens 128                      greedy, HumanEval + MT-bench
  mcsd bench --temperature 1 --methods hf-ar hf-assisted:5 sps:4 tree:4,2,2:mcss-wor
  mcsd bench --dataset questions.jsonl --turns 2 --methods ar tree:2,2,2,2:mcss
  mcsd bench --sweep --n 4                                    pick tree shapes (see mcsd tune)
methods: hf-ar, hf-assisted, hf-assisted:N, ar, sps:G, tree:K-CONFIG[:RULE]
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
    from mcsd.commands.tune import add_sweep_arguments

    parser.add_argument(
        "--sweep",
        action="store_true",
        help="instead of --methods: simulate tree shapes under --budgets (greedy) and run the "
        "best --verify of them (mcsd tune also saves the fastest)",
    )
    add_sweep_arguments(parser)
    parser.add_argument(
        "--replot",
        default=None,
        metavar="DIR",
        help="only draw the PNG plots again from DIR/summary.json of a finished run",
    )
    parser.set_defaults(func=run)
    return parser


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Everything ``bench`` and ``tune`` share."""
    add_model_arguments(parser)
    add_decoding_arguments(parser)
    parser.set_defaults(seed=0)  # a benchmark is reproducible unless asked otherwise
    parser.add_argument(
        "--dataset",
        action="append",
        default=None,
        help="humaneval, mt-bench, sharegpt or a file path (repeatable; default: humaneval "
        "and mt-bench)",
    )
    parser.add_argument("--n", type=int, default=10, help="prompts per dataset (seeded sample)")
    parser.add_argument(
        "--turns", type=int, default=1, help="user turns per question (2: MT-bench)"
    )
    parser.add_argument(
        "--methods", nargs="+", default=None, help=f"default: {' '.join(DEFAULT_METHODS)}"
    )
    parser.add_argument("--out", default="bench-out", help="output directory")
    parser.add_argument(
        "--draft-vocab",
        default=None,
        help="FR-Spec: mcsd drafts score only the K most frequent tokens (e.g. 32k); same as "
        "adding +fr=K to every sps/tree method",
    )
    parser.add_argument(
        "--draft-int8",
        action="store_true",
        help="int8 weights for mcsd drafts (CPU); same as adding +int8 to every sps/tree method",
    )
    parser.add_argument("--warmup-tokens", type=int, default=16, help="0 disables the warm-up")
    parser.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )


def load_questions(args: argparse.Namespace) -> list[Any]:
    from mcsd.bench.datasets import load_dataset

    questions = []
    for name in args.dataset or DEFAULT_DATASETS:
        questions += load_dataset(name, n=args.n, seed=args.seed, turns=args.turns)
    return questions


def parse_methods(args: argparse.Namespace) -> list[Any]:
    from mcsd.bench.methods import parse_method

    names = list(args.methods or DEFAULT_METHODS)
    if args.tree:  # --tree/--rule of the shared decoding options add one more tree
        names.append(f"tree:{args.tree}" + (f":{args.rule}" if args.rule else ""))
    methods = [parse_method(name) for name in names]
    suffix = (f"+fr={args.draft_vocab}" if args.draft_vocab else "") + (
        "+int8" if args.draft_int8 else ""
    )
    if suffix:
        methods = [
            parse_method(m.name + suffix)
            if m.is_mcsd and m.draft_vocab is None and not m.draft_int8
            else m
            for m in methods
        ]
    cheap = [m.name for m in methods if m.draft_int8 or m.draft_vocab]
    if cheap and getattr(args, "static_cache", False):
        raise ValueError(
            f"--static-cache: the +int8 / +fr drafts ({', '.join(cheap)}) run on the dynamic "
            "cache only; drop --static-cache or those modifiers"
        )
    seen = [m.name for m in methods]
    duplicates = sorted({n for n in seen if seen.count(n) > 1})
    if duplicates:
        raise ValueError(f"methods listed twice: {', '.join(duplicates)}")
    return methods


def run(args: argparse.Namespace) -> int:
    import torch

    if args.replot:
        from mcsd.bench.plots import replot

        for path in replot(Path(args.replot)):
            print(path)
        return 0
    if args.sweep:
        from mcsd.commands.tune import run_sweep

        return run_sweep(args, save=False)

    from mcsd.bench.report import render_table, summarize, table_text, write_results
    from mcsd.bench.runner import run_bench

    # Sampling, lengths and seed; each method brings its own tree and rule.
    base = spec_from_args(argparse.Namespace(**{**vars(args), "tree": "1", "rule": None}))
    methods = parse_methods(args)
    for method in methods:  # a rule that does not fit the sampling fails now, not in an hour
        method.spec(base).resolved_rule()
    questions = load_questions(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    print("loading models...", file=sys.stderr)
    pair = load_pair_from_args(args)
    print(f"loaded in {time.perf_counter() - started:.1f}s", file=sys.stderr)

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


def run_metadata(
    args: argparse.Namespace, pair: Any, base: Any, methods: list[Any], questions: list[Any]
) -> dict[str, Any]:
    """Everything needed to reproduce and judge a run (machine, versions, settings)."""
    import torch
    import transformers

    from mcsd import __version__

    dtype = str(next(pair.target.model.parameters()).dtype).removeprefix("torch.")
    return {
        "command": " ".join(["mcsd", *sys.argv[1:]]) if sys.argv else "",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpu": _cpu_name(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": str(pair.target.device),
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
