"""``mcsd check``: verify on this machine, in minutes, that the verification rules are lossless.

    mcsd check --rule mcss-wor --k 3 --vocab 8 --trials 200000 --seed 0
    mcsd check --rule all
    mcsd check --compare --ks 2,3,4         # acceptance of every rule vs the bound alpha*

For each rule and each random (p, q) case (dense, sparse with zeros, p = q, disjoint supports,
near one-hot p) it draws candidates from q, runs ``mcsd.verify.verify_node`` ``--trials`` times
and compares the emitted tokens with the target distribution (chi-square p-value and total
variation), and the measured acceptance rate with the exact one from enumerating every
candidate tuple (``mcsd.checks.node``). Exit status 0 when every case passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from mcsd.checks.compare import WITHIN, Comparison, compare, markdown, random_pairs
from mcsd.checks.defaults import CheckDefaults
from mcsd.checks.node import CASES, CheckResult, default_jobs, run_checks
from mcsd.verify.rules import RULE_NAMES

D = CheckDefaults


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "check",
        help="Monte Carlo + exact check that a verification rule is lossless",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--rule", choices=(*RULE_NAMES, "all"), default="all", help="rule to check (default: all)"
    )
    parser.add_argument("--seed", type=int, default=D.seed, help="seed of the cases and the trials")
    parser.add_argument(
        "--alpha",
        type=float,
        default=D.alpha,
        help="false-failure probability of each statistical test (default: %(default)g)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="worker processes (default: the CPU cores, 1 for small runs); results do not "
        "depend on it",
    )
    node = parser.add_argument_group("node check: one tree node, random (p, q) cases")
    node.add_argument("--k", type=int, default=D.k, help="candidates per node (sps always uses 1)")
    node.add_argument("--vocab", type=int, default=D.vocab, help="vocabulary size of the cases")
    node.add_argument("--trials", type=int, default=D.trials, help="Monte Carlo trials per case")
    node.add_argument(
        "--cases",
        default=",".join(CASES),
        help="comma-separated subset of: " + ", ".join(CASES),
    )
    engine = parser.add_argument_group(
        "engine check: toy LMs through drafting, tree masks, caches and verification"
    )
    engine.add_argument(
        "--engine",
        action="store_true",
        help="check whole-engine generations (every rule and tree) instead of single nodes",
    )
    engine.add_argument(
        "--engine-trials",
        type=int,
        default=D.engine_trials,
        help="generations per engine case (default: %(default)s; ~2 ms each)",
    )
    compare = parser.add_argument_group(
        "compare: per-node acceptance of the rules against the optimal-transport bound alpha*"
    )
    compare.add_argument(
        "--compare",
        action="store_true",
        help="print every rule's acceptance next to alpha* (random and captured (p, q) pairs)",
    )
    compare.add_argument(
        "--pairs",
        default=None,
        help=f"captured pairs (python -m mcsd.checks.capture); default: {D.pairs} when run "
        "from the repository",
    )
    compare.add_argument(
        "--ks",
        default=",".join(map(str, D.ks)),
        help="candidate counts (default: %(default)s)",
    )
    compare.add_argument(
        "--random-pairs",
        type=int,
        default=D.random_pairs,
        help="random pairs (0: none; %(default)s)",
    )
    compare.add_argument(
        "--random-vocab",
        type=int,
        default=D.random_vocab,
        help="their vocabulary (default: %(default)s)",
    )
    compare.add_argument(
        "--samples",
        type=int,
        default=D.samples,
        help="Monte Carlo chains per pair where no closed form exists (default: %(default)s)",
    )
    compare.add_argument("--markdown", action="store_true", help="also print a Markdown table")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    console = Console()
    if args.compare:
        return _compare(args, console)
    if args.engine:
        return _engine_check(args, console)
    started = time.perf_counter()
    results = _node_check(args, console)
    console.print(results_table(results))
    console.print(
        "pass = TV <= TV max, chi-square p-value >= alpha, measured acceptance within a Hoeffding "
        "bound of the exact one (enumeration of every candidate tuple), which equals the target"
    )
    failed = [r for r in results if not r.passed]
    elapsed = time.perf_counter() - started
    if failed:
        names = ", ".join(f"{r.rule}/{r.case}" for r in failed)
        console.print(f"[bold red]FAILED[/] {len(failed)} of {len(results)} checks: {names}")
    else:
        console.print(f"[bold green]passed[/] {len(results)} checks in {elapsed:.1f} s")
    return 1 if failed else 0


def _node_check(args: argparse.Namespace, console: Console) -> list[CheckResult]:
    rules = RULE_NAMES if args.rule == "all" else (args.rule,)
    cases = tuple(name.strip() for name in args.cases.split(",") if name.strip())
    for name in cases:
        if name not in CASES:
            raise ValueError(f"--cases: unknown case {name!r}; choose from {', '.join(CASES)}")
    if args.vocab < 2:
        raise ValueError(f"--vocab must be >= 2, got {args.vocab}")
    if args.vocab <= args.k:
        raise ValueError(f"--vocab must be larger than --k (got {args.vocab} and {args.k})")
    total = len(rules) * len(cases)
    jobs = default_jobs(total, args.trials) if args.jobs is None else args.jobs
    console.print(
        f"checking {', '.join(rules)} on {len(cases)} cases: k={args.k}, vocab={args.vocab}, "
        f"{args.trials} trials each, seed {args.seed}, {min(jobs, total)} processes"
    )
    finished = itertools.count(1)
    with console.status("running") as status:

        def show(result: CheckResult) -> None:
            mark = "ok" if result.passed else "FAIL"
            last = f"{result.rule}/{result.case} {mark}"
            status.update(f"running: {next(finished)}/{total} done, last {last}")

        return run_checks(
            rules,
            k=args.k,
            vocab=args.vocab,
            trials=args.trials,
            seed=args.seed,
            alpha=args.alpha,
            cases=cases,
            jobs=jobs,
            on_result=show,
        )


def results_table(results: list[CheckResult]) -> Table:
    """One row per (rule, case); fits an 80-column terminal."""
    table = Table(
        title="emitted tokens vs the target distribution",
        box=box.SIMPLE_HEAD,
        collapse_padding=True,
        pad_edge=False,
    )
    # Fixed widths for the data; only the result column (failure reasons) may wrap.
    table.add_column("rule", min_width=8, no_wrap=True)
    table.add_column("case", min_width=12, no_wrap=True)
    for column, width in (("k", 1), ("TV", 6), ("TV max", 6), ("p-value", 7)):
        table.add_column(column, justify="right", min_width=width, no_wrap=True)
    for column in ("accept", "exact"):
        table.add_column(column, justify="right", min_width=6, no_wrap=True)
    table.add_column("result", overflow="fold")
    for r in results:
        table.add_row(
            r.rule,
            r.case,
            str(r.k),
            f"{r.fit.tv:.4f}",
            f"{r.fit.tv_bound:.4f}",
            f"{r.fit.p_value:.3g}",
            f"{r.acceptance:.4f}",
            "-" if r.exact_acceptance is None else f"{r.exact_acceptance:.4f}",
            "[green]ok[/]" if r.passed else f"[bold red]FAIL {', '.join(r.failures)}[/]",
        )
    return table


def _engine_check(args: argparse.Namespace, console: Console) -> int:
    from mcsd.checks.engine import engine_cases, run_engine_case

    if args.engine_trials < 100:
        raise ValueError(f"--engine-trials must be >= 100, got {args.engine_trials}")
    cases = [c for c in engine_cases() if args.rule in ("all", c.rule)]
    started = time.perf_counter()
    table = Table(
        title="generated 3-token sequences vs the exact target distribution",
        box=box.SIMPLE_HEAD,
    )
    for column in ("case", "trials", "TV", "TV max", "p-value", "AL", "result"):
        left = column in ("case", "result")
        table.add_column(column, justify="left" if left else "right", no_wrap=column == "case")
    failed = []
    with console.status("running") as status:
        for i, case in enumerate(cases, start=1):
            status.update(f"running {case.describe()} ({i}/{len(cases)})")
            result = run_engine_case(case, args.engine_trials, seed=args.seed, alpha=args.alpha)
            if not result.passed:
                failed.append(case.describe())
            table.add_row(
                case.describe(),
                str(result.trials),
                f"{result.fit.tv:.4f}",
                f"{result.fit.tv_bound:.4f}",
                f"{result.fit.p_value:.3g}",
                f"{result.mean_accepted_length:.2f}",
                "[green]ok[/]" if result.passed else "[bold red]FAIL[/]",
            )
    console.print(table)
    elapsed = time.perf_counter() - started
    if failed:
        console.print(f"[bold red]FAILED[/] {len(failed)} of {len(cases)}: {', '.join(failed)}")
        return 1
    console.print(f"[bold green]passed[/] {len(cases)} engine checks in {elapsed:.1f} s")
    return 0


def _compare(args: argparse.Namespace, console: Console) -> int:
    started = time.perf_counter()
    ks = [int(k) for k in args.ks.split(",") if k.strip()]
    if not ks or min(ks) < 1:
        raise ValueError(f"--ks must list integers >= 1, got {args.ks!r}")
    if args.random_pairs < 0 or args.random_vocab < 2:
        raise ValueError("--random-pairs must be >= 0 and --random-vocab >= 2")
    if args.samples < 2:
        raise ValueError(f"--samples must be >= 2, got {args.samples}")
    sources = {}
    if args.random_pairs:
        name = f"random V={args.random_vocab}"
        sources[name] = random_pairs(args.random_pairs, args.random_vocab, args.seed)
    path = Path(args.pairs or D.pairs)
    if path.exists():
        from mcsd.checks.capture import load_pairs

        p, q = load_pairs(path)
        sources[f"captured {path.stem} V={p.shape[-1]}"] = (p, q)
    elif args.pairs:
        raise ValueError(f"--pairs: no file {path}")
    if not sources:
        raise ValueError("nothing to compare: no random pairs and no captured pairs")
    described = ", ".join(f"{name} ({len(pair[0])} pairs)" for name, pair in sources.items())
    console.print(
        f"comparing rules against alpha* on {described}, k = {', '.join(map(str, ks))}, "
        f"seed {args.seed}"
    )
    with console.status("computing"):
        results = compare(sources, ks, samples=args.samples, seed=args.seed)
    console.print(comparison_table(results))
    console.print(
        "acceptance: mean per-node acceptance probability; alpha*: mean optimal-transport bound "
        "for candidates drawn that way (iid: with replacement, wor: without); gap: mean alpha* - "
        f"acceptance; within: pairs with acceptance >= {1 - WITHIN:.0%} of alpha*; ± is 2 standard "
        "errors of a Monte Carlo estimate (mcss-wor, k >= 3). traversal's node rule is mcss-wor."
    )
    if args.markdown:
        console.print(markdown(results), markup=False, highlight=False, soft_wrap=True)
    console.print(f"done in {time.perf_counter() - started:.1f} s")
    return 0


def comparison_table(results: list[Comparison]) -> Table:
    table = Table(
        title="per-node acceptance vs the optimal-transport bound alpha*",
        box=box.SIMPLE_HEAD,
        collapse_padding=True,
        pad_edge=False,
    )
    for column in ("source", "draws"):
        table.add_column(column, no_wrap=True)
    table.add_column("k", justify="right")
    table.add_column("rule", no_wrap=True)
    for column in ("acceptance", "alpha*", "gap", "gap %", "within"):
        table.add_column(column, justify="right", no_wrap=True)
    for r in results:
        value = f"{r.acceptance:.4f}" + ("" if r.exact else f"±{2 * r.stderr:.4f}")
        table.add_row(
            r.source,
            r.scheme,
            str(r.k),
            r.rule,
            value,
            f"{r.alpha:.4f}",
            f"{r.gap:.4f}",
            f"{100 * r.relative_gap:.2f}",
            f"{100 * r.within:.0f}%",
        )
    return table
