"""``mcsd generate``: one speculative generation from the shell.

mcsd generate "def fib(n):" --tree 4,2,2 --rule mcss-wor --temperature 1 --max-new-tokens 128
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mcsd.api import ModelPair

from mcsd.config import COMPILE_CHOICES, RULES, SamplingConfig, SpecConfig


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "generate",
        help="generate text with speculative decoding",
        description="Generate a continuation of PROMPT with lossless speculative decoding.",
    )
    parser.add_argument("prompt", help="prompt text ('-' reads it from standard input)")
    add_model_arguments(parser)
    add_decoding_arguments(parser)
    parser.add_argument("--chat", action="store_true", help="apply the chat template")
    parser.add_argument("--stream", action="store_true", help="print text as it is produced")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.set_defaults(func=run)
    return parser


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--target/--draft/--dtype/--device (shared with bench and serve)."""
    parser.add_argument(
        "--target", default=None, help="target model: known name, local dir or HF id"
    )
    parser.add_argument("--draft", default=None, help="draft model: known name, local dir or HF id")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float32", "float16"],
        help="weights and compute precision (auto: bfloat16 where the CPU/GPU supports it)",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: auto)")
    parser.add_argument(
        "--static-cache",
        action="store_true",
        help="mcsd's static KV cache with CUDA graphs on GPUs (the fast path)",
    )
    parser.add_argument(
        "--compile",
        default="none",
        choices=COMPILE_CHOICES,
        help="with --static-cache: torch.compile the draft or both models (~30 s per shape)",
    )


def load_pair_from_args(args: argparse.Namespace) -> ModelPair:
    """The pair named by ``add_model_arguments``' options."""
    from mcsd.api import load_pair

    if args.compile != "none" and not args.static_cache:
        raise ValueError(f"--compile {args.compile} needs --static-cache")
    return load_pair(
        args.target,
        args.draft,
        dtype=args.dtype,
        device=args.device,
        static_cache=args.static_cache,
        compile=args.compile,
    )


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    """Tree, rule and sampling options (shared with bench and serve)."""
    parser.add_argument("--tree", default=None, help="k-config like 4,2,2 (1,1,1,1 = chain)")
    parser.add_argument("--rule", default=None, choices=RULES, help="verification rule")
    parser.add_argument("--temperature", type=float, default=0.0, help="target temperature")
    parser.add_argument("--top-k", type=int, default=0, help="target top-k (0 = off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="target top-p (1 = off)")
    parser.add_argument(
        "--draft-temperature",
        type=float,
        default=None,
        help="draft temperature (default: target's)",
    )
    parser.add_argument("--draft-top-k", type=int, default=None, help="draft top-k")
    parser.add_argument("--draft-top-p", type=float, default=None, help="draft top-p")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")


def spec_from_args(args: argparse.Namespace, default_tree: str | None = None) -> SpecConfig:
    target = SamplingConfig(args.temperature, args.top_k, args.top_p)
    overrides = (args.draft_temperature, args.draft_top_k, args.draft_top_p)
    draft = None
    if any(value is not None for value in overrides):
        draft = SamplingConfig(
            target.temperature if args.draft_temperature is None else args.draft_temperature,
            target.top_k if args.draft_top_k is None else args.draft_top_k,
            target.top_p if args.draft_top_p is None else args.draft_top_p,
        )
    kwargs: dict[str, Any] = {}
    tree = args.tree or default_tree
    if tree:
        kwargs["tree"] = tree
    return SpecConfig(
        rule=args.rule,
        target=target,
        draft=draft,
        max_new_tokens=args.max_new_tokens,
        stop_strings=tuple(args.stop),
        seed=args.seed,
        **kwargs,
    )


def run(args: argparse.Namespace) -> int:
    from mcsd.api import stream

    spec = spec_from_args(args)  # validate before the slow model load
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt:
        raise ValueError("prompt must not be empty")
    started = time.perf_counter()
    print("loading models...", file=sys.stderr)
    pair = load_pair_from_args(args)
    print(f"loaded in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    started = time.perf_counter()
    text, tokens, finish, stats = "", [], "length", None
    for chunk, running in stream(pair, prompt, spec, chat=args.chat):
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
        f"[{spec.token_tree().describe()} {spec.resolved_rule()}] {stats.summary()}, "
        f"{rate:.2f} tokens/s, finish: {finish}",
        file=sys.stderr,
    )
    return 0
