"""``mcsd serve``: the OpenAI-compatible HTTP server (FastAPI app under uvicorn).

mcsd serve --host 127.0.0.1 --port 8000 --tree 4,2,2 --max-queue 64

The decoding options (``--tree``, ``--rule``, ``--temperature``, ...) are the server's defaults;
a request overrides them with the OpenAI fields and the ``mcsd`` extension object.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from mcsd.commands.options import (
    add_decoding_arguments,
    add_model_arguments,
    load_pair_from_args,
    spec_from_args,
    tree_default,
)
from mcsd.config import ServeDefaults


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
        help="requests that may wait behind the running one; more get 429 (default %(default)s)",
    )
    parser.add_argument(
        "--max-batch",
        type=int,
        default=ServeDefaults.max_batch,
        help="generations decoded side by side, as rows of one batch; a new request joins at "
        "the next step (default %(default)s; > 1 needs the hf, hf-static or fast runtime)",
    )
    parser.add_argument(
        "--adaptive-tree",
        action="store_true",
        help="measure the models' step cost and shrink the tree as --max-batch grows, down to "
        "plain decoding where speculation no longer pays (still lossless)",
    )
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

    tree, origin = tree_default(args)
    spec = spec_from_args(args, tree)  # validate before the slow model load
    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    if isinstance(args.max_batch, bool) or args.max_batch < 1:
        raise ValueError(f"--max-batch must be an integer >= 1, got {args.max_batch}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    started = time.perf_counter()
    if args.tree is None:
        print(f"mcsd: {origin}", file=sys.stderr)
    print("loading models...", file=sys.stderr)
    pair = load_pair_from_args(args)
    print(
        f"loaded {pair.target.name} <- {pair.draft.name} in {time.perf_counter() - started:.1f}s",
        file=sys.stderr,
    )
    if args.max_batch > 1:  # refuse a runtime that holds one row before serving
        with_rows(pair.target, args.max_batch)
    app = create_app(
        pair,
        spec,
        model_name=args.served_model_name,
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        adaptive_tree=args.adaptive_tree,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
