"""``mcsd serve``: the OpenAI-compatible HTTP server (FastAPI app under uvicorn).

mcsd serve --host 127.0.0.1 --port 8000 --tree 4,2,2 --max-queue 64 --api-key KEY

The decoding options (``--tree``, ``--rule``, ``--temperature``, ...) are the server's defaults;
a request overrides them with the OpenAI fields and the ``mcsd`` extension object. The limit
options (``--max-body-bytes``, ``--max-prompt-tokens``, ``--max-tokens``, ``--max-stop``,
``--max-stop-length``) bound what one request may ask for; ``--api-key`` (or ``MCSD_API_KEY``)
requires ``Authorization: Bearer KEY``; SIGTERM drains for at most ``--drain-timeout`` seconds.
"""

from __future__ import annotations

import argparse
import os
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
    spec_from_args,
    tree_default,
)
from mcsd.server.defaults import ServeDefaults, ServeLimits


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "serve",
        help="serve the OpenAI API (completions, chat) with speculative decoding",
        description=(
            "Serve POST /v1/completions, POST /v1/chat/completions, GET /v1/models, /health and "
            "/metrics. Up to --max-batch generations run side by side (continuous batching); "
            "the other requests wait in a FIFO queue."
        ),
    )
    add_model_arguments(parser)
    add_decoding_arguments(parser)
    parser.add_argument(
        "--host", default=ServeDefaults.host, help="address to bind (default %(default)s)"
    )
    parser.add_argument(
        "--port", type=int, default=ServeDefaults.port, help="port (default %(default)s)"
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=ServeDefaults.max_queue,
        help="requests that may wait for a row; more get 429 (default %(default)s)",
    )
    parser.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' on every endpoint but /health (default: "
        f"${ServeDefaults.api_key_env}, else no key)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=ServeDefaults.drain_timeout_s,
        help="SIGTERM: seconds running requests may take to finish (default %(default)s)",
    )
    limits = parser.add_argument_group("request limits (400 / 413 beyond them)")
    limits.add_argument(
        "--max-body-bytes",
        type=int,
        default=ServeLimits.max_body_bytes,
        help="request body size (default %(default)s)",
    )
    limits.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=ServeLimits.max_prompt_tokens,
        help="prompt tokens (default: the models' context)",
    )
    limits.add_argument(
        "--max-tokens",
        type=int,
        default=ServeLimits.max_tokens,
        help="largest max_tokens a request may ask for (default: the models' context)",
    )
    limits.add_argument(
        "--max-stop",
        type=int,
        default=ServeLimits.max_stop,
        help="stop strings per request (default %(default)s)",
    )
    limits.add_argument(
        "--max-stop-length",
        type=int,
        default=ServeLimits.max_stop_length,
        help="characters of one stop string (default %(default)s)",
    )
    parser.add_argument(
        "--max-batch",
        type=int,
        default=ServeDefaults.max_batch,
        help="generations decoded side by side, as rows of one batch; a new request joins at "
        "the next step (default %(default)s; the llama.cpp, hf, hf-static and fast runtimes "
        "all hold rows)",
    )
    add_adaptive_argument(parser)  # the tree also shrinks as --max-batch grows
    parser.add_argument(
        "--served-model-name", default=None, help="model id clients use (default: the target)"
    )
    parser.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from mcsd.models.base import with_rows
    from mcsd.server import create_app
    from mcsd.server.auth import is_loopback
    from mcsd.server.drain import DrainingServer

    tree, origin = tree_default(args)
    spec = spec_from_args(args, tree)  # validate before the slow model load
    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    if isinstance(args.max_batch, bool) or args.max_batch < 1:
        raise ValueError(f"--max-batch must be an integer >= 1, got {args.max_batch}")
    adaptive, adaptive_origin = adaptive_from_args(args, spec)
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.drain_timeout < 0:
        raise ValueError(f"--drain-timeout must be >= 0, got {args.drain_timeout}")
    limits = _limits_from_args(args)
    api_key = args.api_key
    if api_key is None:
        api_key = os.environ.get(ServeDefaults.api_key_env)
    if api_key == "":
        raise ValueError(f"--api-key (or ${ServeDefaults.api_key_env}) must not be empty")
    if api_key is None and not is_loopback(args.host):
        print(
            f"mcsd: warning: serving on {args.host} without an API key: anyone who can reach "
            f"this address can use the models (set --api-key or ${ServeDefaults.api_key_env})",
            file=sys.stderr,
        )
    started = time.perf_counter()
    announce_tree(args, origin, adaptive_origin)
    print("loading models...", file=sys.stderr)
    pair = load_pair_from_args(args)
    print(
        f"loaded {pair.names} in {time.perf_counter() - started:.1f}s",
        file=sys.stderr,
    )
    if args.max_batch > 1:  # refuse a runtime that holds one row before serving
        with_rows(pair.target, args.max_batch)
    if adaptive:  # before serving; the engines of the default tree reuse it
        log_tree_budget(pair, spec, args.max_batch)
    app = create_app(
        pair,
        spec,
        model_name=args.served_model_name,
        max_queue=args.max_queue,
        limits=limits,
        api_key=api_key,
        max_batch=args.max_batch,
        adaptive_tree=adaptive,
    )
    # After the drain, responses still on the wire get a moment to finish before uvicorn stops.
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=ServeDefaults.graceful_shutdown_s,
    )
    server = DrainingServer(config, app.state.scheduler, drain_timeout_s=args.drain_timeout)
    server.run()
    return 0


def _limits_from_args(args: argparse.Namespace) -> ServeLimits:
    """``ServeLimits`` from the options; its errors name the option."""
    try:
        return ServeLimits(
            max_body_bytes=args.max_body_bytes,
            max_prompt_tokens=args.max_prompt_tokens,
            max_tokens=args.max_tokens,
            max_stop=args.max_stop,
            max_stop_length=args.max_stop_length,
        )
    except ValueError as error:
        name, _, rest = str(error).partition(" ")
        raise ValueError(f"--{name.replace('_', '-')} {rest}") from None
