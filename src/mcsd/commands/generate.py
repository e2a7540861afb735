"""``mcsd generate``: one speculative generation from the shell.

mcsd generate "def fib(n):" --tree 4,2,2 --rule mcss-wor --temperature 1 --max-new-tokens 128
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from mcsd.commands.options import (
    adaptive_from_args,
    add_adaptive_argument,
    add_decoding_arguments,
    add_model_arguments,
    announce_tree,
    load_pair_from_args,
    log_tree_budget,
    run_parallel,
    spec_from_args,
    tree_default,
)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "generate",
        help="generate text with speculative decoding",
        description="Generate a continuation of PROMPT with lossless speculative decoding.",
    )
    parser.add_argument("prompt", help="prompt text ('-' reads it from standard input)")
    add_model_arguments(parser)
    add_decoding_arguments(parser)
    add_adaptive_argument(parser)
    parser.add_argument("--chat", action="store_true", help="apply the chat template")
    parser.add_argument("--stream", action="store_true", help="print text as it is produced")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from mcsd.api import stream

    launched = run_parallel(args, run)  # --tp N: this process is rank 0 of N
    if launched is not None:
        return launched

    tree, origin = tree_default(args)
    spec = spec_from_args(args, tree)  # validate before the slow model load
    adaptive, adaptive_origin = adaptive_from_args(args, spec)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt:
        raise ValueError("prompt must not be empty")
    started = time.perf_counter()
    announce_tree(args, origin, adaptive_origin)
    print("loading models...", file=sys.stderr)
    pair = load_pair_from_args(args)
    print(
        f"loaded {pair.names} in {time.perf_counter() - started:.1f}s",
        file=sys.stderr,
    )
    if adaptive:
        log_tree_budget(pair, spec, 1)
    started = time.perf_counter()
    text, tokens, finish, stats = "", [], "length", None
    for chunk, running in stream(pair, prompt, spec, chat=args.chat, adaptive=adaptive):
        stats = running
        text += chunk.text
        tokens += chunk.token_ids
        finish = chunk.finish_reason or finish
        if args.stream and not args.json:
            print(chunk.text, end="", flush=True)
    elapsed = time.perf_counter() - started
    assert stats is not None
    if args.json:
        summary = {"text": text, "token_ids": tokens, "finish_reason": finish, "wall_time": elapsed}
        print(json.dumps(summary | {"stats": stats.to_dict()}))
        return 0
    if not args.stream:
        print(text, end="")
    print()
    rate = stats.new_tokens / elapsed if elapsed > 0 else 0.0
    print(
        f"[{_drafting(spec)}{' adaptive' if adaptive else ''} {spec.resolved_rule()}] "
        f"{stats.summary()}, "
        f"{rate:.2f} tokens/s, finish: {finish}",
        file=sys.stderr,
    )
    return 0


def _drafting(spec: Any) -> str:
    """What drafted the trees, for the summary line."""
    context = f"context <= {spec.context.max_nodes} nodes"
    if spec.proposer == "context":
        return context
    tree = spec.describe_tree()
    return f"{tree} + {context}" if spec.proposer == "mixed" else tree
