"""``mcsd tune`` (and ``mcsd bench --sweep``): find the fastest tree shape for a pair here.

Greedy decoding only: the acceptance of every candidate shape is simulated exactly from the
draft's ranks of the target's answers, its step time predicted from measured forward costs, and
the best predicted shapes are then run for real against the target alone (see
``mcsd.bench.sweep``; the optimiser's pick per budget, ``mcsd.bench.optimise``, is among them).
``mcsd tune`` saves the fastest measured tree in the cache's tuned.json, or ``none`` (the
target alone) when plain decoding was faster than every tree.

mcsd tune --n 4 --max-new-tokens 128
mcsd bench --sweep --temperature 0 --budgets 4,8,16,32,64 --verify 4 --out sweep-out

The saved tree is keyed by (target, draft, device, dtype, runtime); ``generate``, ``bench`` and
``serve`` use it when ``--tree`` is not given and say so in their first log line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from mcsd.commands.options import (
    add_bench_arguments,
    add_sweep_arguments,
    check_model_arguments,
    load_pair_from_args,
    load_questions,
    spec_from_args,
)
from mcsd.config import NO_SPECULATION, SweepDefaults


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


def _budgets(text: str) -> list[int]:
    try:
        budgets = sorted({int(b) for b in text.split(",") if b.strip()})
    except ValueError:
        raise ValueError(f"--budgets must be comma-separated integers, got {text!r}") from None
    if not budgets or budgets[0] < 1:
        raise ValueError(f"--budgets must be positive integers, got {text!r}")
    return budgets


def run_sweep(args: argparse.Namespace, *, save: bool) -> int:
    import torch
    from rich.console import Console

    from mcsd.bench import optimise, sweep
    from mcsd.bench.methods import parse_method, run_method
    from mcsd.bench.report import render_table, run_metadata, summarize, table_text, write_results
    from mcsd.bench.runner import build_prompt, run_bench
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
    print("loading models...", file=sys.stderr)
    pair = load_pair_from_args(args)
    draft_name = pair.draft_name  # tuned.json is keyed by the draft model, not its variant
    if args.draft_vocab or args.draft_int8:
        from mcsd.bench.methods import parse_count

        vocab = parse_count(args.draft_vocab, "--draft-vocab") if args.draft_vocab else None
        pair = pair.with_cheap_draft(vocab=vocab, int8=args.draft_int8)
    chat = not args.no_chat and getattr(pair.tokenizer, "chat_template", None) is not None

    # 1-2. Reference answers (a chain reproduces the target's greedy output) and draft ranks.
    chain = parse_method(SweepDefaults.chain)
    prompts, traces, chain_runs = [], [], []
    started = time.perf_counter()
    for i, question in enumerate(questions):
        prompt_ids = build_prompt(pair.tokenizer, question, [], 0, chat)
        if i == 0 and args.warmup_tokens:
            run_method(chain, pair, prompt_ids, _short(base, args.warmup_tokens))
        generation = run_method(chain, pair, prompt_ids, base)
        prompts.append(prompt_ids)
        chain_runs.append(generation)
        traces.append(sweep.draft_ranks(pair.draft, prompt_ids, generation.tokens, pair.vocab_size))
        print(
            f"reference {i + 1}/{len(questions)}: {len(generation.tokens)} tokens "
            f"({time.perf_counter() - started:.0f}s)",
            file=sys.stderr,
        )

    # 3. Forward costs after a typical context, and the step overhead seen in the chain runs.
    context = prompts[0] + chain_runs[0].tokens[: base.max_new_tokens // 2]
    costs = sweep.measure_costs(pair.target, pair.draft, context)
    chain_tree = chain.spec(base).token_tree()
    # Steps are disturbed upwards by other processes: a low quantile estimates the undisturbed one.
    steps = sorted(r.draft_time + r.target_time for g in chain_runs for r in g.records)
    measured = steps[len(steps) // 5] if steps else 0.0
    costs.overhead = max(0.0, measured - costs.step_time(chain_tree))
    costs.notes["chain_step_ms"] = 1e3 * measured

    # 4. The optimiser's pick per budget, then rank every candidate shape by simulation.
    acceptance = [sweep.rank_frequencies(traces)] * args.max_depth  # draft ranks, any depth
    step_costs = costs.step_costs(max(budgets))
    picks = {b: optimise.choose(acceptance, step_costs, b, args.max_depth) for b in budgets}
    for budget, pick in picks.items():
        print(
            f"optimiser, budget {budget}: {pick.name} (expected AL {pick.accepted_length:.2f}, "
            f"{pick.tokens_per_s:.1f} tokens/s against {pick.plain_tokens_per_s:.1f} plain)",
            file=sys.stderr,
        )
    trees = sweep.candidate_trees(traces, budgets, args.max_depth)
    trees += [p.tree for p in picks.values() if p.tree is not None and p.tree not in trees]
    candidates = sweep.rank_candidates(trees, traces, costs)
    ar_rate = 1.0 / costs.target_time(1)
    best = sweep.best_per_budget(candidates, budgets)
    console.print(_candidate_table(candidates[:15], ar_rate, "Best predicted shapes"))
    per_budget = [best[b][key] for b in best for key in ("by_accepted_length", "by_tokens_per_s")]
    console.print(_candidate_table(per_budget, ar_rate, "Best per budget (by AL, by tokens/s)"))

    # 5. Run the best predicted shapes for real, with the target alone and the best chain.
    verified: dict[str, Any] = {}
    if args.verify > 0:
        picked = list(dict.fromkeys(c.name for c in candidates[: args.verify]))
        chain_best = max(
            (c for c in candidates if c.tree.max_children == 1), key=lambda c: c.tokens_per_s
        )
        names = ["ar", f"sps:{chain_best.tree.max_depth}", *(f"tree:{n}" for n in picked)]
        methods = [parse_method(n) for n in dict.fromkeys(names)]
        answers = run_bench(
            pair,
            questions,
            methods,
            base,
            chat=chat,
            warmup_tokens=args.warmup_tokens,
            progress=not args.no_progress,
        )
        summary = summarize(answers, methods)
        meta = run_metadata(args, pair, base, methods, questions)
        out = Path(args.out)
        write_results(out, answers, methods, summary, meta, Path(pair.target_name).name)
        table = render_table(summary, methods, "Best predicted shapes, measured")
        console.print(table)
        (out / "table.txt").write_text(table_text(table))
        verified = summary["all"]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "budgets": budgets,
        "costs": costs.to_dict(),
        "ar_tokens_per_s_predicted": ar_rate,
        "rank_frequencies": sweep.rank_frequencies(traces),
        "optimiser": {
            str(b): {
                "tree": p.name,
                "expected_accepted_length": p.accepted_length,
                "tokens_per_s": p.tokens_per_s,
                "plain_tokens_per_s": p.plain_tokens_per_s,
            }
            for b, p in picks.items()
        },
        "candidates": [_candidate_dict(c) for c in candidates],
        "best_per_budget": {
            str(b): {key: _candidate_dict(c) for key, c in entry.items()}
            for b, entry in best.items()
        },
        "measured": verified,
        "references": [
            {
                "dataset": q.dataset,
                "question_id": q.question_id,
                "prompt_tokens": len(p),
                "tokens": g.tokens,
                "draft_ranks": r,
            }
            for q, p, g, r in zip(questions, prompts, chain_runs, traces, strict=True)
        ],
    }
    (out / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"sweep results in {out}/sweep.json", file=sys.stderr)

    if save:
        # Speculation that does not pay switches itself off: tree "none", the target alone.
        mcsd_rows = {k: v for k, v in verified.items() if k.startswith(("tree:", "sps:"))}
        if mcsd_rows:
            name = max(mcsd_rows, key=lambda k: mcsd_rows[k]["tokens_per_s"])
            method = parse_method(name)
            tree = ",".join(["1"] * int(name[4:])) if method.kind == "sps" else method.tree
            source = "measured"
            if (
                "ar" in verified
                and verified["ar"]["tokens_per_s"] >= verified[name]["tokens_per_s"]
            ):
                name, tree = "ar", NO_SPECULATION
        else:
            name, tree, source = candidates[0].name, candidates[0].name, "predicted"
            if candidates[0].tokens_per_s <= ar_rate:
                tree = NO_SPECULATION
        runtime = pair.target.name.split(":")[0]
        key = tuned_key(
            pair.target_name, draft_name, str(pair.target.device), str(pair.target.dtype), runtime
        )
        entry = {"tree": tree, "source": source, "tuned_for": "greedy"}
        entry["draft_vocab"] = args.draft_vocab
        entry["draft_int8"] = args.draft_int8
        if source == "measured":
            entry |= {k: verified[name][k] for k in ("tokens_per_s", "mean_accepted_length")}
            entry["speedup_vs_ar"] = verified[name].get("speedup_vs_ar")
        path = save_tuned(key, entry)
        print(f"saved tree {tree} ({source}) for {key} in {path}", file=sys.stderr)
    return 0


def _short(base: Any, tokens: int) -> Any:
    from dataclasses import replace

    return replace(base, max_new_tokens=min(tokens, base.max_new_tokens))


def _candidate_dict(candidate: Any) -> dict[str, Any]:
    return {
        "tree": candidate.name,
        "nodes": candidate.tree.num_nodes,
        "depth": candidate.tree.max_depth,
        "mean_accepted_length": candidate.simulated.mean_accepted_length,
        "step_ms": 1e3 * candidate.step_time,
        "tokens_per_s": candidate.tokens_per_s,
    }


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
